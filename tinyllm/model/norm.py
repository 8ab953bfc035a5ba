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
        if (x.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    """fp32 RMSNorm for training in eager mode: the same forward, a hand-derived backward.

    With x̂ = x·r, r = (mean(x²) + ε)^(−1/2) and y = x̂ ⊙ g:
      ∂L/∂g = Σ_rows ∂L/∂y ⊙ x̂,   ∂L/∂x = r·(∂L/∂y ⊙ g − x̂ · mean(∂L/∂y ⊙ g ⊙ x̂)).
    About half the passes over [N, d] of autograd's graph of pow/mean/rsqrt/mul (each pass costs a memory
    round trip on a CPU); equal to it to fp32 rounding (tested). torch.compile fuses the formula instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        d = xhat.shape[-1]
        p = grad * xhat
        grad_w = p.reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None
        dot = (p @ weight)[..., None]  # Σ_j ∂L/∂y_j g_j x̂_j, as a matrix-vector product
        grad_x = (grad * weight).mul_(rstd).addcmul_(xhat, dot * rstd / d, value=-1.0)
        return grad_x, grad_w, None


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
