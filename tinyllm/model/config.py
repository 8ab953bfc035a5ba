"""ModelConfig: one typed description of every architecture tinyllm builds (notes ch.02).

Field names follow Hugging Face (`hidden_size`, `num_key_value_heads`, `rope_theta`, ...) so a `config.json`
maps onto it almost one to one. The architectural *choices* (norm, positions, activation, MLP kind, attention
backend, MoE router) are plain strings validated here and turned into modules once, when the model is built
(see the registries in norm.py, position.py, activation.py, mlp.py, attention.py, moe.py).

Covers decoder-only LLaMA-family layouts (llama, qwen2, mistral, mixtral) and the BERT encoder; presets give
the classic sizes used by the notes' parameter-count questions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("llama", "qwen2", "mistral", "mixtral", "bert")
NORM_TYPES = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post", "deepnorm")
POSITION_TYPES = ("rope", "alibi", "sinusoidal", "learned", "none")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
MLP_TYPES = ("gated", "plain")
ATTN_IMPLS = ("eager", "sdpa", "tiled")
ROUTER_TYPES = ("topk", "noisy_topk", "switch")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None → MHA; 1 → MQA; else GQA
    head_dim: int | None = None  # None → hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    # building blocks (chosen once at build time)
    hidden_act: str = "silu"
    mlp_type: str = "gated"  # gated: act(x W_gate) * (x W_up) → W_down (SwiGLU/GeGLU); plain: W2 act(W1 x)
    norm_type: str = "rmsnorm"
    norm_position: str = "pre"
    rms_norm_eps: float = 1e-6  # used by both norm types (HF BERT calls it layer_norm_eps)
    position_type: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", "factor": ...}
    partial_rotary_factor: float = 1.0
    attn_implementation: str = "sdpa"
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    attention_out_bias: bool = False  # bias on o_proj (LLaMA attention_bias=True sets both)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3/OLMo-2 style)
    sliding_window: int | None = None  # attend to the last `sliding_window` keys only (Mistral)
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # mixture of experts (num_local_experts == 0 → dense MLP)
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_type: str = "topk"
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    expert_capacity_factor: float = 1.0  # Switch routing only
    router_jitter_noise: float = 0.0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    # encoder (BERT) fields
    type_vocab_size: int = 2
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # anything from config.json we keep for the round trip but do not interpret
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _choice("model_type", self.model_type, MODEL_TYPES)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            _positive(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive("head_dim", self.head_dim)
        _choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _choice("mlp_type", self.mlp_type, MLP_TYPES)
        _choice("norm_type", self.norm_type, NORM_TYPES)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("position_type", self.position_type, POSITION_TYPES)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLS)
        _choice("router_type", self.router_type, ROUTER_TYPES)
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if self.position_type == "rope":
            if not self.rope_theta > 0:
                raise ConfigError(f"rope_theta={self.rope_theta!r} must be > 0")
            if self.head_dim % 2:
                raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
            if not 0 < self.partial_rotary_factor <= 1:
                raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor!r} must be in (0, 1]")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            _choice("rope_scaling.rope_type", rtype, ROPE_TYPES)
            self.rope_scaling["rope_type"] = rtype
            self.rope_scaling.pop("type", None)
            if rtype != "default" and not float(self.rope_scaling.get("factor", 0)) > 0:
                raise ConfigError(f"rope_scaling.factor={self.rope_scaling.get('factor')!r} must be > 0")
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
        if self.num_local_experts < 0:
            raise ConfigError(f"num_local_experts={self.num_local_experts} must be >= 0")
        if self.num_local_experts:
            k = 1 if self.router_type == "switch" else self.num_experts_per_tok
            if not 1 <= k <= self.num_local_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, "
                    f"num_local_experts={self.num_local_experts}]")
            if not self.expert_capacity_factor > 0:
                raise ConfigError(f"expert_capacity_factor={self.expert_capacity_factor} must be > 0")

    # ---------------------------------------------------------------- derived
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_encoder(self) -> bool:
        return self.model_type == "bert"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with fields changed; derived sizes (MHA's KV heads, hidden/heads head_dim) follow."""
        if ("num_attention_heads" in changes and "num_key_value_heads" not in changes
                and self.num_key_value_heads == self.num_attention_heads):
            changes["num_key_value_heads"] = None
        if (("hidden_size" in changes or "num_attention_heads" in changes) and "head_dim" not in changes
                and self.head_dim * self.num_attention_heads == self.hidden_size):
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {unknown}")
        return cls(**d)

    # ---------------------------------------------------------------- HF mapping
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> ModelConfig:
        """Map a Hugging Face `config.json` (dict or path) onto a ModelConfig."""
        if not isinstance(hf, dict):
            path = Path(hf)
            if path.is_dir():
                path = path / "config.json"
            try:
                hf = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{path}: no config.json found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        from tinyllm.model.hf_config import config_from_hf

        return config_from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers loads for this architecture."""
        from tinyllm.model.hf_config import config_to_hf

        return config_to_hf(self)


# ------------------------------------------------------------------ presets
def _llama(**kw: Any) -> ModelConfig:
    base: dict[str, Any] = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048,
                                rms_norm_eps=1e-6)
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, Any] = {
    "llama-7b": lambda: _llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32),
    "llama-13b": lambda: _llama(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40),
    "llama2-7b": lambda: _llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-70b": lambda: _llama(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                                 rms_norm_eps=1e-5),
    "llama3-8b": lambda: _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
    "mixtral-8x7b": lambda: ModelConfig(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=8, max_position_embeddings=32768,
                                        rope_theta=1e6, rms_norm_eps=1e-5, num_local_experts=8,
                                        num_experts_per_tok=2),
    "smollm2-135m": lambda: _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # ChatGLM2/3-6B layout expressed in LLaMA vocabulary: MQA with 2 KV groups, qkv bias, untied head.
    "chatglm2-6b": lambda: _llama(vocab_size=65024, hidden_size=4096, intermediate_size=13696,
                                  num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=2,
                                  max_position_embeddings=32768, attention_bias=True, rms_norm_eps=1e-5),
    "bert-base": lambda: ModelConfig(model_type="bert", vocab_size=30522, hidden_size=768,
                                     intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                     max_position_embeddings=512, hidden_act="gelu", mlp_type="plain",
                                     norm_type="layernorm", norm_position="post", rms_norm_eps=1e-12,
                                     position_type="learned", attention_bias=True, attention_out_bias=True,
                                     mlp_bias=True, pad_token_id=0, tie_word_embeddings=True),
    "bert-large": lambda: PRESETS["bert-base"]().replace(hidden_size=1024, intermediate_size=4096,
                                                         num_hidden_layers=24, num_attention_heads=16,
                                                         num_key_value_heads=16, head_dim=64),
    # tiny models for tests and the CPU training recipes
    "tiny": lambda: _llama(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                           tie_word_embeddings=True, rms_norm_eps=1e-5),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration (see PRESETS), optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
