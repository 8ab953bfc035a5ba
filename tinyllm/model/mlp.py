"""Feed-forward blocks (notes ch.02.6, Shazeer 2020 "GLU Variants Improve Transformer").

Registry `MLPS`: name → class.

- plain:  FFN(x) = act(x·W_up + b) · W_down + b                     (Transformer, BERT: act = GELU/ReLU)
- gated:  FFN(x) = (act(x·W_gate) ⊙ x·W_up) · W_down                (SwiGLU with act = SiLU as in LLaMA;
          GeGLU with act = GELU). LLaMA sizes the hidden dim as ⌈(2/3·4d)/multiple_of⌉·multiple_of.

Parameter names follow HF LLaMA (`gate_proj`, `up_proj`, `down_proj`); the plain MLP reuses `up_proj` and
`down_proj` so checkpoints map by name.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.model.activation import ACTIVATIONS
from tinyllm.model.config import ModelConfig


class GatedMLP(nn.Module):
    """(act(x W_gate) ⊙ x W_up) W_down — SwiGLU / GeGLU."""

    def __init__(self, hidden: int, inner: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    """act(x W_up) W_down — the original Transformer FFN."""

    def __init__(self, hidden: int, inner: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


MLPS: dict[str, type[nn.Module]] = {"gated": GatedMLP, "plain": PlainMLP}


def build_mlp(cfg: ModelConfig, inner: int | None = None) -> nn.Module:
    return MLPS[cfg.mlp_type](cfg.hidden_size, inner or cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)


def llama_ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's FFN width rule: int(2·4d/3) (× multiplier), rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
