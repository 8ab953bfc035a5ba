"""Interview arithmetic (all chapters): parameter counts, FLOPs, KV-cache / training memory, pipeline bubbles.

Pure closed-form functions of a `ModelConfig` (or a preset name, config.json, checkpoint directory) and plain
numbers; nothing here builds a model. See params.py, flops.py and memory.py for the formulas and sources.
"""

from tinyllm.calc.flops import (
    CHINCHILLA_TABLE,
    attention_flops_per_token,
    chinchilla_tokens,
    compute_optimal,
    forward_flops_per_token,
    model_flops_utilization,
    six_nd,
    training_flops,
    utilization,
)
from tinyllm.calc.memory import (
    GB,
    GiB,
    activation_bytes_per_layer,
    gpipe_bubble,
    interleaved_bubble,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    model_state_bytes,
    naive_pipeline_bubble,
    zero_model_state_bytes,
)
from tinyllm.calc.params import ParamCount, count_parameters, factorized_embedding_params, resolve_config

__all__ = [
    "CHINCHILLA_TABLE", "GB", "GiB", "ParamCount", "activation_bytes_per_layer", "attention_flops_per_token",
    "chinchilla_tokens", "compute_optimal", "count_parameters", "factorized_embedding_params",
    "forward_flops_per_token", "gpipe_bubble", "interleaved_bubble", "kv_cache_bytes", "kv_cache_bytes_per_token",
    "model_flops_utilization", "model_state_bytes", "naive_pipeline_bubble", "resolve_config", "six_nd",
    "training_flops", "utilization", "zero_model_state_bytes",
]
