"""Mapping between Hugging Face `config.json` dicts and ModelConfig (one table per model_type).

Reads both the transformers-4 layout (`rope_theta` + `rope_scaling`) and the transformers-5 layout
(`rope_parameters`), and writes both, so either major version loads what we save.
"""

from __future__ import annotations

from typing import Any

from tinyllm.model.config import MODEL_TYPES, ConfigError, ModelConfig

# HF field → ModelConfig field, shared by the decoder families
_COMMON = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "partial_rotary_factor",
)
_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "relu2": "relu2"}
_ACTS_BACK = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}


def _act(name: str) -> str:
    if name not in _ACTS:
        raise ConfigError(f"hidden_act={name!r} is not supported; known: {sorted(_ACTS)}")
    return _ACTS[name]


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    params.pop("partial_rotary_factor", None)
    merged = {**scaling, **params}
    rtype = merged.get("rope_type", merged.get("type", "default"))
    if rtype == "default":
        return theta, None
    merged["rope_type"] = rtype
    merged.pop("type", None)
    return theta, merged


def _qwen2_window(hf: dict[str, Any]) -> int | None:
    """Qwen2 slides the window only in layers listed as "sliding_attention" (transformers 5 `layer_types`) or,
    in older configs, in layers i >= max_window_layers. tinyllm applies one window to all layers or none."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n)]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return None
    if sliding != len(types):
        raise ConfigError(f"qwen2 sliding window in {sliding} of {len(types)} layers (layer_types={types}); "
                          "tinyllm applies sliding_window to all layers or none")
    return hf["sliding_window"]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"model_type={mt!r} is not supported; tinyllm loads {list(MODEL_TYPES)}")
    kw: dict[str, Any] = {k: hf[k] for k in _COMMON if hf.get(k) is not None}
    kw["model_type"] = mt
    if mt == "bert":
        return ModelConfig(
            model_type="bert", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            hidden_act=_act(hf.get("hidden_act", "gelu")), mlp_type="plain", norm_type="layernorm",
            norm_position="post", rms_norm_eps=hf.get("layer_norm_eps", 1e-12), position_type="learned",
            attention_bias=True, attention_out_bias=True, mlp_bias=True,
            type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id", 0),
            initializer_range=hf.get("initializer_range", 0.02), tie_word_embeddings=True)
    kw["hidden_act"] = _act(hf.get("hidden_act", "silu"))
    kw["rope_theta"], kw["rope_scaling"] = _rope(hf)
    kw.setdefault("tie_word_embeddings", False)
    if mt == "llama":
        kw["attention_bias"] = kw["attention_out_bias"] = bool(hf.get("attention_bias", False))
        kw["mlp_bias"] = bool(hf.get("mlp_bias", False))
    elif mt == "qwen2":
        kw["attention_bias"] = True
        kw["sliding_window"] = _qwen2_window(hf)
    elif mt in ("mistral", "mixtral"):
        kw["sliding_window"] = hf.get("sliding_window")
    if mt == "mixtral":
        kw["num_local_experts"] = hf.get("num_local_experts", 8)
        kw["num_experts_per_tok"] = hf.get("num_experts_per_tok", 2)
        kw["router_aux_loss_coef"] = hf.get("router_aux_loss_coef", 0.02)
        kw["router_jitter_noise"] = hf.get("router_jitter_noise", 0.0) or 0.0
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.model_type == "bert":
        return {
            "model_type": "bert", "architectures": ["BertModel"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": _ACTS_BACK[cfg.hidden_act],
            "layer_norm_eps": cfg.rms_norm_eps, "type_vocab_size": cfg.type_vocab_size,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            "initializer_range": cfg.initializer_range, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
    _check_exportable(cfg)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
            "mixtral": "MixtralForCausalLM"}[cfg.model_type]
    hf: dict[str, Any] = {"model_type": cfg.model_type, "architectures": [arch]}
    for k in _COMMON:
        v = getattr(cfg, k)
        if v is not None:
            hf[k] = v
    # token ids are written even when None: transformers would otherwise fill in llama's 1/2 defaults
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        hf[k] = getattr(cfg, k)
    hf["hidden_act"] = _ACTS_BACK[cfg.hidden_act]
    hf["rope_theta"] = cfg.rope_theta
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling)
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    hf["rope_parameters"] = rope
    hf["attention_dropout"] = 0.0
    if cfg.model_type == "llama":
        hf["attention_bias"] = cfg.attention_bias
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "qwen2":
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["sliding_window"] = cfg.sliding_window
        # Qwen2 slides the window in layers i >= max_window_layers: 0 → every layer, as tinyllm does
        hf["max_window_layers"] = 0 if cfg.sliding_window is not None else cfg.num_hidden_layers
    if cfg.model_type in ("mistral", "mixtral"):
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "mixtral":
        hf.update(num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                  router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=cfg.router_jitter_noise,
                  output_router_logits=False)
    return hf


def _check_exportable(cfg: ModelConfig) -> None:
    """A config.json can only describe what the HF class implements; refuse the rest with the reason."""
    problems = []
    if cfg.norm_type != "rmsnorm" or cfg.norm_position != "pre":
        problems.append(f"norm_type={cfg.norm_type!r}/norm_position={cfg.norm_position!r} (HF: pre-RMSNorm)")
    if cfg.position_type != "rope":
        problems.append(f"position_type={cfg.position_type!r} (HF: rope)")
    if cfg.mlp_type != "gated":
        problems.append(f"mlp_type={cfg.mlp_type!r} (HF: gated)")
    if cfg.partial_rotary_factor != 1.0:
        problems.append(f"partial_rotary_factor={cfg.partial_rotary_factor} (HF rotates the whole head)")
    if cfg.model_type == "llama" and cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window} (HF llama has none; use mistral or qwen2)")
    if cfg.qk_norm:
        problems.append("qk_norm=True")
    if cfg.model_type == "qwen2" and (not cfg.attention_bias or cfg.attention_out_bias):
        problems.append("qwen2 has q/k/v bias and no o_proj bias")
    if cfg.model_type in ("mistral", "mixtral") and cfg.attention_bias:
        problems.append(f"{cfg.model_type} has no attention bias")
    if cfg.model_type == "llama" and cfg.attention_bias != cfg.attention_out_bias:
        problems.append("llama attention_bias covers q/k/v/o together")
    if cfg.num_local_experts and (cfg.model_type != "mixtral" or cfg.router_type != "topk" or cfg.num_shared_experts):
        problems.append("MoE exports only as mixtral (top-k softmax router, no shared experts)")
    if cfg.model_type == "mixtral" and not cfg.num_local_experts:
        problems.append("mixtral needs num_local_experts > 0")
    if problems:
        raise ConfigError(f"cannot express as HF model_type={cfg.model_type!r}: " + "; ".join(problems))
