"""Normalization layers and residual placement (notes ch.02.2).

Registry `NORMS`: name → class, chosen when the model is built.

- LayerNorm (Ba et al. 2016): y = (x − mean(x)) / sqrt(var(x) + ε) · γ + β, statistics over the last dim.
- RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x²) + ε) · g. No mean subtraction, no bias. Computed in
  fp32 and cast back, as LLaMA does.
- Residual placement (`norm_position`), see `ResidualBlock` in transformer.py:
  - pre-norm:  x + F(LN(x))                       (GPT-2, LLaMA; easier to train deep)
  - post-norm: LN(x + F(x))                        (original Transformer, BERT)
  - DeepNorm:  LN(α·x + F(x)), with F's value/output/FFN weights initialised ×β (Wang et al. 2022, DeepNet).
    Decoder-only with M layers: α = (2M)^(1/4), β = (8M)^(−1/4); encoder-only with N layers:
    α = (2N)^(1/4), β = (8N)^(−1/4).  `deepnorm_constants` returns (α, β).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + ε) · g, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(nn.Module):
    """y = (x − μ) / sqrt(σ² + ε) · γ + β over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    return NORMS[norm_type](dim, eps)


def deepnorm_constants(num_layers: int, encoder_only: bool = False) -> tuple[float, float]:
    """DeepNet (α, β) for a decoder-only (M = num_layers) or encoder-only (N = num_layers) stack."""
    n = 2 * num_layers
    return n**0.25, (4 * n) ** -0.25
