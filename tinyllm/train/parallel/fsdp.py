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


# ---------------------------------------------------------------- resume: checkpoints hold the unsharded state
# A checkpoint holds what one process would hold (the full weights, AdamW's state in its plain layout), so a run
# saved under FSDP2 resumes under dp/ZeRO/tp/... and back. Saving gathers each DTensor (`full_tensor`, an
# all-gather); loading cuts the full tensors to each parameter's own placements (`distribute_tensor`). Both are
# collectives: every rank walks the same tensors in the same order.

def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """Every rank: the optimizer's state dict with each DTensor state (exp_avg, exp_avg_sq) gathered whole."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        state[idx] = {k: (v.full_tensor().detach().cpu().clone() if hasattr(v, "full_tensor") else v)
                      for k, v in sd["state"][idx].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` cut the way DTensor `ref` is placed (a plain tensor stays as it is)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor):
        return full
    if tuple(full.shape) != tuple(ref.shape):
        raise ValueError(f"a checkpoint tensor of shape {tuple(full.shape)} for a parameter of shape {tuple(ref.shape)}")
    return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements)


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a plain (single-process layout) optimizer state into an optimizer over FSDP2's DTensor parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx in sorted(full["state"]):
        p = params[idx]
        state[idx] = {k: (_like(v, p) if torch.is_tensor(v) and v.dim() > 0 else v)
                      for k, v in full["state"][idx].items()}
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def load_full_weights(model: nn.Module, directory) -> None:
    """Load a checkpoint's full weights into an FSDP2-sharded model (each rank keeps its shards)."""
    from tinyllm.train.checkpoint import load_model_weights

    own = model.state_dict()
    plain_load = model.load_state_dict

    def load(sd, strict: bool = True, assign: bool = False):
        return plain_load({k: _like(v, own[k]) if k in own else v for k, v in sd.items()}, strict=strict)

    model.load_state_dict = load  # load_model_weights reads the files (HF names, ties) and calls this
    try:
        load_model_weights(model, directory)
    finally:
        del model.load_state_dict
