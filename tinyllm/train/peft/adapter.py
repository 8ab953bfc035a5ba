"""Bottleneck adapters: Houlsby (sequential) and parallel / scaled-parallel (notes ch.05.5.a, 05.5.d).

An adapter is a small residual MLP, down-project d → m, nonlinearity f, up-project m → d:

    Adapter(h) = f(h·W_down + b_down)·W_up + b_up

- sequential (Houlsby et al. 2019): after a sub-layer's output y, before the block's residual add:
  y ← y + Adapter(y); two per Transformer layer, after attention (o_proj) and after the feed-forward network;
- parallel (He et al. 2022, "Towards a unified view"): beside the sub-layer, reading the sub-layer's input x:
  y ← y + s·Adapter(x); s = 1 is the parallel adapter, s > 1 the scaled PA (the paper uses 4).

W_up starts at zero, so the adapted model starts exactly at the base. Parameters per adapter: 2dm + d + m,
so L layers with both placements train L·2·(2dm + d + m). Houlsby also trained the layer norms;
`train_norms=True` does that (default off: then only adapter weights train).

Adapters are attached from outside as forward hooks on `self_attn` / `mlp` of each decoder layer, with the
adapter module registered as their child `adapter`: the base's parameter names do not change and
`remove_adapters` restores the plain model. Unlike merged LoRA, an adapter costs inference time (two extra
small matmuls per layer). Not covered: AdapterFusion, AdapterDrop, UniPELT gating.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tinyllm.model.activation import ACTIVATIONS
from tinyllm.train.peft.select import freeze, register_config

PLACEMENTS = ("attn", "ffn")
VARIANTS = ("sequential", "parallel")


@dataclass
class AdapterConfig:
    bottleneck_size: int = 64
    variant: str = "sequential"
    placement: list[str] = field(default_factory=lambda: ["attn", "ffn"])
    scaling: float = 1.0  # s of the (scaled) parallel adapter; sequential adapters ignore it
    activation: str = "relu"
    train_norms: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size={self.bottleneck_size!r} must be a positive integer")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not one of {list(VARIANTS)}")
        self.placement = list(self.placement)
        bad = [p for p in self.placement if p not in PLACEMENTS]
        if bad or not self.placement:
            raise ValueError(f"placement={self.placement!r} must be a non-empty subset of {list(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")


class Bottleneck(nn.Module):
    def __init__(self, d: int, m: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.up = nn.Linear(m, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


def _hook(variant: str, scaling: float):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if variant == "sequential":
            return output + module.adapter(output)
        return output + scaling * module.adapter(args[0])

    return hook


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: adapters attach to decoder layers")
    return list(layers)


def apply_adapters(model: nn.Module, cfg: AdapterConfig | None = None) -> nn.Module:
    """Attach bottleneck adapters to every decoder layer (in place) and freeze the rest; returns `model`."""
    cfg = cfg or AdapterConfig()
    if getattr(model, "_adapter_hooks", None):
        raise ValueError("the model already has adapters: remove_adapters first")
    freeze(model)
    d = model.config.hidden_size
    ref = next(model.parameters())
    handles = []
    for layer in _decoder_layers(model):
        for place, sub in (("attn", layer.self_attn), ("ffn", layer.mlp)):
            if place not in cfg.placement:
                continue
            sub.adapter = Bottleneck(d, cfg.bottleneck_size, cfg.activation).to(ref.device, ref.dtype)
            handles.append(sub.register_forward_hook(_hook(cfg.variant, cfg.scaling)))
        if cfg.train_norms:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.requires_grad_(True)
    model._adapter_hooks = handles  # type: ignore[assignment]
    register_config(model, "default", cfg)
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Detach the hooks and delete the adapter modules: the plain base model again."""
    for h in getattr(model, "_adapter_hooks", []):
        h.remove()
    model._adapter_hooks = []  # type: ignore[assignment]
    for layer in _decoder_layers(model):
        for sub in (layer.self_attn, layer.mlp):
            if hasattr(sub, "adapter"):
                del sub.adapter
    getattr(model, "peft_config", {}).pop("default", None)
    return model


def adapter_parameter_count(d: int, m: int, num_layers: int, per_layer: int = 2) -> int:
    """L · per_layer · (2dm + d + m)."""
    return num_layers * per_layer * (2 * d * m + d + m)
