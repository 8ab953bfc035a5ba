"""FSDP2: torch's fully sharded data parallel (`torch.distributed.fsdp.fully_shard`), the production ZeRO-3.

Same idea as our `zero.py` stage 3, done by torch: every parameter becomes a DTensor sharded on dim 0 over a
1-D device mesh of the data-parallel ranks; `fully_shard` on each decoder layer makes the layer one
all-gather/reduce-scatter unit (gathered for its forward, freed, gathered again for its backward, gradients
reduce-scattered), and `fully_shard` on the root covers the rest (embeddings, final norm, head). Unlike our
flat buckets, FSDP2 shards each parameter separately (per-parameter sharding), so the optimizer sees ordinary
(DTensor) parameters and any element-wise optimizer works unchanged.

    apply_fsdp2(model)        shard in place (layers, then root); returns the model
    full_state_dict(model)    every rank: the unsharded weights as CPU tensors (a collective)

Gradient accumulation: `model.set_requires_gradient_sync(False)` on all but the last micro-batch keeps
unsharded gradients locally (FSDP2's `no_sync`); `no_sync(model)` wraps that. `reshard_after_forward=True` is
ZeRO-3; False keeps parameters gathered between forward and backward (ZeRO-2-like memory, less traffic).

Not covered: mixed-precision policies (`MixedPrecisionPolicy`: bf16 compute, fp32 reduce), CPU offload,
HSDP (2-D mesh: replicate across nodes, shard within), and FSDP1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tinyllm.train.parallel.zero import decoder_layers


def apply_fsdp2(model: nn.Module, reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """fully_shard every decoder layer, then the root, over `mesh` (default: all ranks, 1-D)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        dev = next(model.parameters()).device
        mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside the block."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on every rank (DTensor.full_tensor is an all-gather)."""
    out = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = full.detach().cpu().clone()
    return out


def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """torch's clip_grad_norm_ over DTensor gradients (the norm is itself a DTensor: take the full value)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
