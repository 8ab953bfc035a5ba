"""Optimizer and learning-rate schedules for LLM training (notes ch.02.1 warm-up, ch.04 training practice).

AdamW (Loshchilov & Hutter 2019, decoupled weight decay) with decay only on parameters of ≥ 2 dimensions:
matrices of Linear layers *and* embedding tables decay (the nanoGPT / GPT-2 convention), while biases and
norm gains (1-D) do not — decaying a norm gain towards 0 fights the normalisation it exists to undo. A tied
embedding/lm_head matrix is one parameter and appears once. The fused kernel is used where the device has
one (CUDA and recent CPU builds), else the multi-tensor `foreach` path.

Schedules are pure functions of the optimizer step s (0-based: the lr used by update number s), so resuming
needs only the step. W = warmup steps, S = total steps, η = lr, η_min = min_lr:

- warmup (all schedules): η · s / W for s < W  (same convention as transformers' schedules: update 0 uses 0)
- cosine:   η_min + (η − η_min) · ½(1 + cos(π · p)),  p = (s − W) / (S − W) clamped to [0, 1]
            (η_min = 0 equals `transformers.get_cosine_schedule_with_warmup`)
- wsd:      warmup–stable–decay (MiniCPM, Hu et al. 2024): η until the last D = round(f·S) steps, then with
            q = (s − (S − D)) / D: linear η − (η − η_min)·q, or "sqrt" η_min + (η − η_min)·(1 − √q)
- constant: η after warm-up (= `get_constant_schedule_with_warmup`)

Muon (Jordan et al. 2024; `train/muon.py`, equal to `torch.optim.Muon`) for the hidden matrices: the momentum of each 2-D weight is
orthogonalised by a few Newton–Schulz iterations before the update, so every direction of the matrix moves by
the same amount. Embeddings, the output head and 1-D gains stay on AdamW (Muon is defined for hidden linear
maps only). With Moonshot's `match_rms_adamw` scaling (update RMS 0.2·√max(A, B)) the AdamW learning rate and
weight decay carry over unchanged, so one `lr` and one schedule drive both (`MuonAdamW`). `adamw_lr_scale`
runs the AdamW part at a multiple of that lr: each of its groups carries `lr_scale`, which the training loop
applies to the scheduled lr (a tiny model's embedding table, most of its parameters, learns faster than its
hidden matrices: see BENCHMARKS.md, speedrun round 4).

Not covered: other optimizers (Lion, Adafactor), layer-wise lr decay, per-group schedules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from tinyllm.train.muon import Muon

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "sqrt")


def param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: ≥2-D tensors with `weight_decay`, the rest (biases, norm gains) with 0."""
    decay, no_decay, seen = [], [], set()
    for _name, p in params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


OPTIMIZERS = ("adamw", "muon")
# parameters that are not hidden linear maps, by name: they stay on AdamW under Muon
_NOT_HIDDEN = ("embed_tokens", "lm_head", "wte", "wpe", "score")


class MuonAdamW:
    """Muon on the hidden 2-D weights, AdamW on the rest, behind one optimizer interface.

    `param_groups` lists both optimizers' groups (the same dicts), so the training loop's per-step lr
    assignment reaches both; `state_dict` nests the two states."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer | None) -> None:
        self.muon, self.adamw = muon, adamw
        self._opts = [o for o in (muon, adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self._opts for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self._opts for k, v in o.state.items()}

    def step(self) -> None:
        for o in self._opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError(f"optimizer state has keys {sorted(state)}; a Muon checkpoint has 'muon' and 'adamw' "
                             "(was it saved with --optimizer adamw?)")
        self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])


def check_adamw_lr_scale(scale: float, kind: str) -> None:
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"adamw_lr_scale={scale!r} must be a finite number > 0")
    if scale != 1.0 and kind != "muon":
        raise ValueError(f"adamw_lr_scale={scale!r} applies to optimizer='muon' (its AdamW part); with "
                         f"optimizer={kind!r} change lr instead")


def build_optimizer(params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None, kind: str = "adamw",
                    adamw_lr_scale: float = 1.0) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW over `params` (named), fused when the parameters' device supports it (fused=None: try);
    `kind="muon"`: Muon for hidden matrices and AdamW for embeddings, head and gains (`MuonAdamW`), the AdamW
    part at `adamw_lr_scale` × lr (its groups carry `lr_scale` for the schedule)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer={kind!r} is not one of {list(OPTIMIZERS)}")
    check_adamw_lr_scale(adamw_lr_scale, kind)
    params = list(params)
    if kind == "muon":
        hidden = [(n, p) for n, p in params
                  if p.requires_grad and p.dim() == 2 and not any(k in n for k in _NOT_HIDDEN)]
        ids = {id(p) for _, p in hidden}
        if not hidden:
            raise ValueError("optimizer='muon' found no hidden 2-D weight to orthogonalise")
        muon = Muon([p for _, p in hidden], lr=lr, weight_decay=weight_decay)
        rest = [(n, p) for n, p in params if id(p) not in ids]
        adamw = build_optimizer(rest, lr * adamw_lr_scale, weight_decay, betas, eps, fused) if any(
            p.requires_grad for _, p in rest) else None
        if adamw is not None and adamw_lr_scale != 1.0:
            for g in adamw.param_groups:
                g["lr_scale"] = adamw_lr_scale
        return MuonAdamW(muon, adamw)
    groups = param_groups(params, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters (every parameter has requires_grad=False)")
    if fused is None or fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, ValueError):
            if fused:
                raise
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def _warmup(step: int, lr: float, warmup_steps: int) -> float | None:
    return lr * step / warmup_steps if step < warmup_steps else None


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up, then cosine from lr to min_lr at max_steps (held there afterwards)."""
    w = _warmup(step, lr, warmup_steps)
    if w is not None:
        return w
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, max_steps - warmup_steps)))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def wsd_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
           decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """Warmup–stable–decay: constant lr, then decay to min_lr over the last decay_fraction of the steps."""
    w = _warmup(step, lr, warmup_steps)
    if w is not None:
        return w
    decay_steps = max(1, round(decay_fraction * max_steps))
    start = max_steps - decay_steps
    if step < start:
        return lr
    q = min(1.0, (step - start) / decay_steps)
    if decay_shape == "linear":
        return lr - (lr - min_lr) * q
    if decay_shape == "sqrt":
        return min_lr + (lr - min_lr) * (1.0 - math.sqrt(q))
    raise ValueError(f"decay_shape={decay_shape!r} is not one of {list(DECAY_SHAPES)}")


def constant_lr(step: int, lr: float, warmup_steps: int) -> float:
    w = _warmup(step, lr, warmup_steps)
    return lr if w is None else w


def lr_at(step: int, schedule: str, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """The learning rate of update `step` under `schedule` (one of SCHEDULES)."""
    if schedule == "cosine":
        return cosine_lr(step, lr, min_lr, warmup_steps, max_steps)
    if schedule == "wsd":
        return wsd_lr(step, lr, min_lr, warmup_steps, max_steps, decay_fraction, decay_shape)
    if schedule == "constant":
        return constant_lr(step, lr, warmup_steps)
    raise ValueError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
