"""Activation checkpointing (notes ch.04 激活重计算 / gradient checkpointing; Chen et al. 2016; selective
recomputation: Korthikanti et al. 2022), applied to a built model from outside.

Backward needs the activations the forward saved; for a decoder that is ~s·b·h·(34 + 5·a·s/h) bytes per layer
(calc/memory.py). Checkpointing trades compute for that memory:

    none        every op keeps what its backward needs
    full        each decoder layer keeps only its input; its forward runs again during backward (≈ +1 forward,
                activations ≈ 2·s·b·h per layer plus one layer's worth at a time)
    selective   each layer keeps the outputs of its matmuls and attention (costly to recompute) and recomputes
                the cheap element-wise ops (norms, RoPE, SwiGLU, residual adds) whose saved inputs are most of
                the memory of a small-hidden model; torch's selective-checkpoint policy decides per op

Gradients are identical in every mode (same ops, same order; tested in float64). `peak_memory_delta(fn)`
measures the effect as the process sees it: peak resident memory of one forward + backward above the start.

Not covered: offloading saved activations to CPU, and checkpointing units other than a decoder layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tinyllm.train.parallel.zero import decoder_layers

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
# ops whose outputs are worth keeping: recomputing them costs real FLOPs (matmuls, attention)
_SAVE = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.linear.default,
         _aten._scaled_dot_product_flash_attention_for_cpu.default,
         _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_flash_attention.default}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable, selective: bool, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    ctx_fn = functools.partial(create_selective_checkpoint_contexts, _policy) if selective else None
    extra = {"context_fn": ctx_fn} if ctx_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """Checkpoint every decoder layer of `model` in place ("full" or "selective"); "none" leaves it alone."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is not one of {list(MODES)}")
    if mode == "none":
        return model
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no `layers` ModuleList of decoder layers to checkpoint")
    for layer in layers:
        if getattr(layer, "_checkpoint_mode", None) is not None:
            raise ValueError(f"activation checkpointing already applied ({layer._checkpoint_mode!r})")
        # an instance attribute: nn.Module.__call__ (and its hooks, e.g. ZeRO-3's gather) still run once,
        # outside the checkpoint, while the recomputation calls the original forward directly
        layer.forward = functools.partial(_checkpointed, layer.forward, mode == "selective")
        layer._checkpoint_mode = mode
    return model


def peak_memory_delta(fn: Callable[[], object]) -> tuple[object, int | None]:
    """Run `fn` and return (its result, peak resident bytes above the starting point) — what the process
    actually needed, activations included. Linux only (VmHWM, reset through /proc/self/clear_refs); None elsewhere.
    Freed tensors return to the OS only when malloc serves them by mmap: run with MALLOC_MMAP_THRESHOLD_=65536
    for a stable figure (the benchmark and the test do)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident size
        base = _status_kb("VmRSS")
    except OSError:
        return fn(), None
    out = fn()
    return out, (_status_kb("VmHWM") - base) * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")
