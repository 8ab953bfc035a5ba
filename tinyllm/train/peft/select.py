"""Choosing what a PEFT method touches and counting what it trains (notes ch.05.1.b–c, 05.4.a BitFit).

Target selection follows HF PEFT's `target_modules` rule, so one config string means the same module set in
both libraries:
- a list of names matches a module whose qualified name equals a name or ends with "." + name
  (`["q_proj", "v_proj"]` hits `model.layers.3.self_attn.q_proj`);
- a single string is a regular expression that must match the whole qualified name
  (`r".*\\.(q|v)_proj"`);
- "all-linear" is every nn.Linear except the output head (`lm_head`).

Parameter accounting (the notes' "three ways to count"): `trainable_report` gives PEFT's
print_trainable_parameters line (trainable / all / %); `changed_parameters` counts entries that moved from a
snapshot of the base (θ − θ₀ ≠ 0).

BitFit (Ben Zaken et al. 2021; selective family): train only bias terms. LLaMA-family linears have no biases,
so `apply_bitfit(..., add_missing=True)` gives each target linear a zero-initialised bias — the model's output
is unchanged at start and the trained biases are the only delta. Norm gains are not biases and stay frozen
(BERT's LayerNorm β would count; RMSNorm has none).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

TargetSpec = str | Sequence[str]
OUTPUT_HEADS = ("lm_head",)
# sub-modules that PEFT methods add: never themselves targets (a second apply must not wrap them)
PEFT_PARTS = frozenset({"base_layer", "lora_A", "lora_B", "lora_dropout", "adapter", "down", "up"})


def matches_target(name: str, target: TargetSpec) -> bool:
    """PEFT's rule: list → exact name or `.name` suffix; str → re.fullmatch on the qualified name."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def find_targets(model: nn.Module, target: TargetSpec, types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Qualified names of the modules of `types` selected by `target` (ValueError when none is)."""
    if isinstance(target, (list, tuple)) and not target:
        raise ValueError("target_modules=[] selects nothing")
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, types) or not name or PEFT_PARTS.intersection(name.split(".")):
            continue
        if target == "all-linear":
            if name.split(".")[-1] not in OUTPUT_HEADS:
                names.append(name)
        elif matches_target(name, target):
            names.append(name)
    if not names:
        raise ValueError(f"target_modules={target!r} matches no {'/'.join(t.__name__ for t in types)} module")
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _unique(params: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for n, p in params:
        if id(p) not in seen:  # tied weights count once
            seen.add(id(p))
            out.append((n, p))
    return out


@dataclass
class TrainableReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_report(model: nn.Module) -> TrainableReport:
    """Trainable / all parameters (tied weights once; an NF4-packed base counts its logical weights)."""
    trainable = total = 0
    for _, p in _unique(model.named_parameters()):
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():  # frozen quantized weights are buffers, not parameters
        total += int(getattr(m, "quantized_numel", 0))
    return TrainableReport(trainable, total)


def print_trainable_parameters(model: nn.Module) -> TrainableReport:
    """Print PEFT's one-line summary: `trainable params: N || all params: M || trainable%: P`."""
    report = trainable_report(model)
    print(report)
    return report


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs with requires_grad: what a Task hands the optimizer."""
    return [(n, p) for n, p in _unique(model.named_parameters()) if p.requires_grad]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, to measure θ − θ₀ later."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_parameters(model: nn.Module, before: dict[str, torch.Tensor]) -> int:
    """Entries of parameters present in `before` whose value changed (the notes' "parameters changed")."""
    return sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters() if n in before)


# ------------------------------------------------------------------ BitFit
@dataclass
class BitFitConfig:
    target_modules: TargetSpec = field(default="all-linear")
    add_missing: bool = True  # give bias-free target linears a zero bias (LLaMA has none)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)


def apply_bitfit(model: nn.Module, cfg: BitFitConfig | None = None) -> nn.Module:
    """Freeze everything, then train the biases of the target linears (added as zeros where missing).

    In place; returns `model`. The added biases are recorded in `model.bitfit_added` (their module names) so
    an export can say which biases are new."""
    cfg = cfg or BitFitConfig()
    freeze(model)
    added = []
    for name in find_targets(model, cfg.target_modules):
        lin = model.get_submodule(name)
        if lin.bias is None:
            if not cfg.add_missing:
                continue
            w = lin.weight
            lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            added.append(name)
        lin.bias.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"BitFit: target_modules={cfg.target_modules!r} selects no bias (add_missing=False)")
    model.bitfit_added = added  # type: ignore[assignment]
    register_config(model, "default", cfg)
    return model


def register_config(model: nn.Module, name: str, cfg: object) -> None:
    """Record a method's config on the model (`model.peft_config[name]`, as PEFT keeps it): io.save_adapter
    reads it back."""
    configs = getattr(model, "peft_config", None)
    if configs is None:
        configs = {}
        model.peft_config = configs  # type: ignore[assignment]
    configs[name] = cfg
