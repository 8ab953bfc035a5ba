"""Muon: momentum orthogonalised by Newton–Schulz iterations (Jordan et al. 2024; Liu et al. 2025, "Muon is
Scalable for LLM Training").

For a hidden weight matrix W with gradient G, one step (β = momentum, η = lr, λ = weight decay):

    B ← β·B + (1 − β)·G                     (an EMA; torch.optim.Muon's `lerp` form)
    U = G + β·(B − G)  if nesterov else B
    O = NS₅(U)                              quintic Newton–Schulz: X ← aX + (bA + cA²)X, A = XXᵀ, X₀ = U/‖U‖_F
    W ← (1 − ηλ)·W − η·0.2·√max(rows, cols)·O      ("match_rms_adamw": the update RMS of AdamW, so AdamW's
                                                    lr and weight decay carry over)

NS₅ pushes every singular value of U towards 1 (to ~[0.7, 1.2] with the coefficients (3.4445, −4.775, 2.0315)),
so the update moves all directions of W by a similar amount instead of a few dominant ones.

Why our own class and not `torch.optim.Muon` (which it equals, tested): torch runs the iterations in bf16,
which costs ~50× more than fp32 on CPUs without native bf16 (AVX2-only). Here the iteration dtype is chosen
from the device: bf16 on CUDA and on CPUs where bf16 matmul measures faster (`tinyllm.capability`), else fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """≈ U·Vᵀ of g = U·S·Vᵀ (the orthogonal factor), by `steps` quintic iterations in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller square
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def default_ns_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16
    from tinyllm.capability import cpu_bf16_is_fast

    return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, with AdamW-matched lr scaling; `ns_dtype=None` picks it per device."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 ns_dtype: torch.dtype | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr={lr!r} must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only; got shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - beta)
                u = g.lerp(buf, beta) if group["nesterov"] else buf
                o = newton_schulz(u, group["ns_steps"], group["eps"],
                                  dtype=self.ns_dtype or default_ns_dtype(p.device))
                p.mul_(1 - lr * wd)
                p.add_(o.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
