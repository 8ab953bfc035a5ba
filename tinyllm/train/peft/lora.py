"""LoRA: low-rank adaptation of frozen linear layers (notes ch.05.6.a; Hu et al. 2021).

A frozen weight W₀ [out, in] gets a trainable low-rank update:

    h = W₀x + ΔW x,   ΔW = (α / r) · B A,   A [r, in] (down), B [out, r] (up)

- init: A Kaiming-uniform (a = √5, PEFT's default; the notes' Gaussian is `init_lora_weights="gaussian"`,
  N(0, 1/r)), B = 0 — so ΔW = 0 and the adapted model starts exactly at the base;
- scale α/r (rsLoRA: α/√r) keeps the update's size stable when r changes (the notes omit it);
- dropout is applied to the LoRA branch's input only;
- trainable parameters per adapted matrix: r·(in + out) instead of in·out (1000×1000 at r = 2: 4,000 = 0.4 %);
- merge W = W₀ + ΔW makes inference exactly as fast as the base (no extra latency); unmerge subtracts it
  back (equal up to float rounding);
- several named adapters can live on one model: `set_adapter` picks the active one(s), `disable_adapters()`
  runs the plain base, `delete_adapter` removes one.

`apply_lora(model, LoraConfig(...))` wraps the target linears in place (names follow PEFT: `q_proj.base_layer`,
`q_proj.lora_A.<adapter>`), freezes every base parameter and returns the model — still a CausalLM, so the
training loop's fused lm_head loss applies unchanged. The base layer may be an NF4 linear (QLoRA, qlora.py).
Not covered: DoRA, AdaLoRA's rank allocation, LoRA on embeddings or convolutions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tinyllm.train.peft.select import (
    TargetSpec,
    find_targets,
    freeze,
    get_submodule_parent,
    register_config,
)

INIT_CHOICES = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """Field names and defaults follow `peft.LoraConfig` (r=8, lora_alpha=8, q_proj/v_proj for LLaMA)."""

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: TargetSpec = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} is not one of {list(INIT_CHOICES)}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """base_layer(x) + Σ_active (α/r)·B(A(dropout(x))) over the active, unmerged adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (a dequantized copy for an NF4 base)."""
        base = self.base_layer
        return base.weight if isinstance(base, nn.Linear) else base.dequantize()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = getattr(self.base_layer, "weight", None)
        if isinstance(w, torch.Tensor):
            dtype, device = w.dtype, w.device
        else:  # an NF4 base: fp32 factors (the trainable master weights), on the buffers' device
            dtype, device = torch.float32, next(self.base_layer.buffers()).device
        a = nn.Linear(self.in_features, cfg.r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(cfg.r, self.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            if cfg.init_lora_weights == "gaussian":
                nn.init.normal_(a.weight, std=1.0 / cfg.r)
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            if cfg.init_lora_weights is False:  # a non-zero start, for tests of merge and of I/O
                nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = (α/r)·B·A, [out, in], in fp32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            if self.merged_adapters:
                raise RuntimeError("adapters are merged into the base weight: unmerge before disabling them")
            return out
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            a = self.lora_A[name]
            xa = x if x.dtype == a.weight.dtype or torch.is_autocast_enabled(x.device.type) else x.to(a.weight.dtype)
            out = out + (self.lora_B[name](a(self.lora_dropout[name](xa))) * self.scaling[name]).to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """W₀ ← W₀ + ΔW for each adapter (default: the active ones); forward then skips their branch."""
        if not isinstance(self.base_layer, nn.Linear):
            raise ValueError("merge needs a plain nn.Linear base; an NF4 base is merged by merge_and_unload, "
                             "which dequantizes it first")
        w = self.base_layer.weight
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters:
                continue
            w += self.delta_weight(name).to(w.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W₀ ← W₀ − ΔW for every merged adapter, newest first."""
        w = self.base_layer.weight
        while self.merged_adapters:
            w -= self.delta_weight(self.merged_adapters.pop()).to(w.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapters}, merged={self.merged_adapters}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m


def _target_types() -> tuple[type, ...]:
    from tinyllm.train.peft.nf4 import NF4Linear

    return (nn.Linear, NF4Linear, LoraLinear)


def apply_lora(model: nn.Module, cfg: LoraConfig | None = None, adapter_name: str = "default") -> nn.Module:
    """Add LoRA adapter `adapter_name` to the target linears of `model` (in place) and make it the active one.

    Every parameter that is not a LoRA factor of the new adapter is frozen. Returns `model`."""
    cfg = cfg or LoraConfig()
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter_name={adapter_name!r} is already on the model")
    names = find_targets(model, cfg.target_modules, _target_types())
    freeze(model)
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, LoraLinear):
            parent, child = get_submodule_parent(model, name)
            mod = LoraLinear(mod)
            setattr(parent, child, mod)
        mod.add_adapter(adapter_name, cfg)
    register_config(model, adapter_name, cfg)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapter(s) (their sum is applied); only their factors stay trainable."""
    wanted = [names] if isinstance(names, str) else list(names)
    known = {n for _, m in lora_layers(model) for n in m.lora_A}
    for n in wanted:
        if n not in known:
            raise ValueError(f"adapter {n!r} is not on the model (have {sorted(known)})")
    for _, m in lora_layers(model):
        if m.merged_adapters:
            raise RuntimeError("unmerge the merged adapters before switching")
        m.active_adapters = [n for n in wanted if n in m.lora_A]
        for n in m.lora_A:
            on = n in wanted
            m.lora_A[n].weight.requires_grad_(on)
            m.lora_B[n].weight.requires_grad_(on)


def active_adapters(model: nn.Module) -> list[str]:
    for _, m in lora_layers(model):
        return list(m.active_adapters)
    return []


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapters(model): ...` runs the plain base model (e.g. the reference policy in DPO)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before, strict=True):
            m.disabled = b


def delete_adapter(model: nn.Module, name: str) -> None:
    for _, m in lora_layers(model):
        if name in m.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged: unmerge first")
        if name in m.lora_A:
            del m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
            m.scaling.pop(name)
            m.active_adapters = [n for n in m.active_adapters if n != name]
    getattr(model, "peft_config", {}).pop(name, None)


def merge_adapters(model: nn.Module, names: Sequence[str] | None = None) -> None:
    for _, m in lora_layers(model):
        m.merge(names)


def unmerge_adapters(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Fold the active (or named) adapters into plain nn.Linear weights and remove every LoRA wrapper.

    An NF4 base is dequantized to the LoRA factors' dtype first, so the result is an ordinary model that
    save_pretrained writes and transformers loads."""
    for name, m in list(lora_layers(model)):
        base = m.base_layer
        if not isinstance(base, nn.Linear):
            plain = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None,
                              device=base.bias.device if base.bias is not None else None)
            dtype = next(iter(m.lora_A.values())).weight.dtype if len(m.lora_A) else torch.float32
            plain.weight.data = base.dequantize().to(dtype)
            if base.bias is not None:
                plain.bias.data = base.bias.detach().to(dtype)
            m.base_layer = plain
        m.merge(names)
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, m.base_layer)
    getattr(model, "peft_config", {}).clear()
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` / `.lora_B.weight` tensors of one adapter (PEFT's saved names minus the
    `base_model.model.` prefix and with the adapter name removed)."""
    out = {}
    for name, m in lora_layers(model):
        if adapter_name in m.lora_A:
            out[f"{name}.lora_A.weight"] = m.lora_A[adapter_name].weight.detach()
            out[f"{name}.lora_B.weight"] = m.lora_B[adapter_name].weight.detach()
    if not out:
        raise ValueError(f"adapter {adapter_name!r} is not on the model")
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy tensors named as by `lora_state_dict` into adapter `adapter_name` (every factor must be given)."""
    own = lora_state_dict(model, adapter_name)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not match the adapted modules: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for name, m in lora_layers(model):
        if adapter_name not in m.lora_A:
            continue
        for part, mod in (("lora_A", m.lora_A[adapter_name]), ("lora_B", m.lora_B[adapter_name])):
            t = sd[f"{name}.{part}.weight"]
            if tuple(t.shape) != tuple(mod.weight.shape):
                raise ValueError(f"{name}.{part}.weight has shape {tuple(t.shape)}, expected "
                                 f"{tuple(mod.weight.shape)}")
            mod.weight.copy_(t.to(mod.weight.dtype))


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of one LoRA-adapted [d_out, d_in] matrix: r·(d_in + d_out)."""
    return r * (d_in + d_out)
