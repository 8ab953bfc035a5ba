"""Parameter counts in closed form (notes ch.02.5, 02.9, 02.10.b, 02.11.d, 02.12, 02.17.c).

`count_parameters(cfg)` adds up, matrix by matrix, every parameter the model tinyllm builds from a
`ModelConfig` (and that transformers builds for the same architecture), without building anything:

  embeddings  V·h  (+ P·h learned positions, + T·h BERT token types)
  attention   h·(H + 2·H_kv)·d + H·d·h            (+ (H + 2·H_kv)·d q/k/v bias, + h o_proj bias)
  mlp         gated 3·h·I (+ 2·I + h bias) | plain 2·h·I (+ I + h bias)
  MoE         E experts of that MLP + router h·E (noisy top-k: 2·h·E) + shared experts of width I_s;
              active = everything but the E − k experts a token is not routed to (Switch: k = 1)
  norms       RMSNorm h, LayerNorm 2·h (two per layer, one final; BERT: one after the embeddings instead);
              qk-norm adds 2·d per layer
  head        h·V unless tied to the embeddings; BERT pooler h² + h

e.g. LLaMA-7B: 32·(4·4096² + 3·4096·11008 + 2·4096) + 2·32000·4096 + 4096 = 6,738,415,616.
The classic shortcut 12·L·h² (4h² attention + 8h² plain MLP with I = 4h) is the same sum with biases,
norms and embeddings dropped. `factorized_embedding_params` is ALBERT's V·E + E·h trick (02.10.b).

Covered: every ModelConfig field that changes a shape (GQA/MQA, head_dim, the three bias flags, tied head,
gated/plain MLP, RMSNorm/LayerNorm, learned positions, qk-norm, MoE with router and shared experts, the BERT
encoder with token types and pooler). Not covered: BERT's MLM/NSP heads, ALBERT-style cross-layer sharing,
and MoE placed on only some layers (ModelConfig puts it on every layer).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllm.model.config import PRESETS, ConfigError, ModelConfig, preset


@dataclass(frozen=True)
class ParamCount:
    """Parameters by component; `total` is their sum, `active` what one token touches (MoE: k experts)."""

    embeddings: int
    attention: int
    mlp: int
    experts: int
    shared_experts: int
    router: int
    norms: int
    head: int
    pooler: int
    active: int
    per_layer: int
    num_layers: int

    @property
    def total(self) -> int:
        return (self.embeddings + self.attention + self.mlp + self.experts + self.shared_experts
                + self.router + self.norms + self.head + self.pooler)

    @property
    def non_embedding(self) -> int:
        """Total minus input embeddings and the untied output head (Kaplan et al.'s N)."""
        return self.total - self.embeddings - self.head

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embeddings - self.head

    def as_dict(self) -> dict[str, int]:
        d = dataclasses.asdict(self)
        d.update(total=self.total, non_embedding=self.non_embedding)
        return d


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def attention_params(cfg: ModelConfig) -> int:
    """One attention block: q/k/v/o projections (GQA-aware), without its norms."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return (_linear(h, q, cfg.attention_bias) + 2 * _linear(h, kv, cfg.attention_bias)
            + _linear(q, h, cfg.attention_out_bias))


def mlp_params(cfg: ModelConfig, inner: int | None = None) -> int:
    """One feed-forward block of width `inner` (default intermediate_size)."""
    h, i = cfg.hidden_size, inner or cfg.intermediate_size
    n_in = 2 if cfg.mlp_type == "gated" else 1  # gate_proj and up_proj, or up_proj only
    return n_in * _linear(h, i, cfg.mlp_bias) + _linear(i, h, cfg.mlp_bias)


def shared_expert_params(cfg: ModelConfig) -> int:
    """Always-on experts: `num_shared_experts` MLPs, each `shared_expert_intermediate_size` wide
    (default intermediate_size)."""
    if not cfg.num_local_experts or not cfg.num_shared_experts:
        return 0
    return cfg.num_shared_experts * mlp_params(cfg, cfg.shared_expert_intermediate_size)


def norm_params(cfg: ModelConfig, dim: int | None = None) -> int:
    """RMSNorm has a gain only; LayerNorm a gain and a bias."""
    dim = dim or cfg.hidden_size
    return dim if cfg.norm_type == "rmsnorm" else 2 * dim


def _experts_per_token(cfg: ModelConfig) -> int:
    return 1 if cfg.router_type == "switch" else cfg.num_experts_per_tok


def count_parameters(cfg: ModelConfig | str | os.PathLike, *, include_head: bool = True,
                     include_pooler: bool = True) -> ParamCount:
    """Exact parameter count of the model built from `cfg` (a ModelConfig, preset name, config.json or
    checkpoint directory). Tied weights are counted once; `include_head=False` drops an untied lm_head,
    `include_pooler=False` drops BERT's pooler."""
    cfg = resolve_config(cfg)
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    embeddings = V * h
    if cfg.position_type == "learned":
        embeddings += cfg.max_position_embeddings * h
    if cfg.is_encoder:
        embeddings += cfg.type_vocab_size * h
    attn = attention_params(cfg)
    layer_norms = 2 * norm_params(cfg) + (2 * cfg.head_dim if cfg.qk_norm else 0)  # qk-norm is an RMSNorm
    if cfg.num_local_experts:
        expert, dense = mlp_params(cfg), 0
        experts = cfg.num_local_experts * expert
        # noisy top-k (Shazeer 2017) learns a second [E, h] matrix for the noise scale
        router = h * cfg.num_local_experts * (2 if cfg.router_type == "noisy_topk" else 1)
        shared = shared_expert_params(cfg)
    else:
        expert, dense, experts, router, shared = 0, mlp_params(cfg), 0, 0, 0
    per_layer = attn + dense + experts + router + shared + layer_norms
    # decoder: final norm after the last layer; BERT (post-norm encoder): a LayerNorm after the embeddings
    norms = L * layer_norms + norm_params(cfg)
    head = V * h if (include_head and not cfg.is_encoder and not cfg.tie_word_embeddings) else 0
    pooler = _linear(h, h, True) if (include_pooler and cfg.is_encoder) else 0
    count = ParamCount(embeddings=embeddings, attention=L * attn, mlp=L * dense, experts=L * experts,
                       shared_experts=L * shared, router=L * router, norms=norms, head=head, pooler=pooler,
                       active=0, per_layer=per_layer, num_layers=L)
    idle = (cfg.num_local_experts - _experts_per_token(cfg)) * expert if cfg.num_local_experts else 0
    return dataclasses.replace(count, active=count.total - L * idle)


def factorized_embedding_params(vocab_size: int, hidden_size: int, embedding_size: int | None = None) -> int:
    """Embedding parameters V·h, or ALBERT's factorisation V·E + E·h when `embedding_size` E is given
    (21128·768 = 16,226,304 vs 21128·128 + 128·768 = 2,802,688)."""
    for name, v in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("embedding_size", embedding_size)):
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if embedding_size is None:
        return vocab_size * hidden_size
    return vocab_size * embedding_size + embedding_size * hidden_size


def resolve_config(model: ModelConfig | str | os.PathLike | dict[str, Any]) -> ModelConfig:
    """A ModelConfig from itself, a preset name, an HF config dict, a config.json, a checkpoint directory,
    a GGUF file or a known checkpoint short name (see tinyllm.model.hf.resolve_model_path)."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return ModelConfig.from_hf(model)
    name = os.fspath(model)
    if name in PRESETS:
        return preset(name)
    from tinyllm.model.hf import resolve_model_path

    path = resolve_model_path(name)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        return ModelConfig.from_hf(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(path)
    raise ConfigError(f"model {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
                      f"config.json, checkpoint directory or .gguf file")


def _gguf_config(path: Path) -> ModelConfig:
    try:
        from tinyllm.model import gguf
    except ImportError as e:
        raise ConfigError(f"{path}: reading GGUF files needs tinyllm.model.gguf ({e})") from None
    # prefer a metadata-only reader when the GGUF module offers one; the full reader dequantizes weights
    reader = getattr(gguf, "read_gguf_config", None)
    return reader(path) if reader is not None else gguf.read_gguf(path)[0]
