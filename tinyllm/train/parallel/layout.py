"""Checkpoint layout across model-parallel shards (notes ch.04: saving a TP/PP-sharded model).

A checkpoint is always the *full* model in Hugging Face names (DESIGN §4), whatever layout trained it, so a run
saved under tp=2 loads under tp=4, pp=2 or one process:

    gather_full_state_dict(model, tp_group)   every rank gets the full tinyllm state dict of a tensor_parallel
                                              model: shards all-gathered along the dim they were split on
    load_full_state_dict(model, sd, tp_group) the inverse: each rank copies its slice of a full state dict in
    save_sharded_pretrained(model, dir, ...)  gather (over TP, and over the pipeline stages with pp_group),
                                              then rank 0 writes the HF directory (temp name + rename)

The pipeline half lives in pipeline.py: stages keep the full model's parameter names, so
`gather_pipeline_state_dict` merges the stages' pieces and `load_stage_state_dict` cuts a full one. Not covered: sharded (per-rank file) checkpoints of
distributed optimizers; gathering happens in memory, so the full model must fit on one rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.parallel.dist import collective_guard


def _params_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, group: dist.ProcessGroup | None = None,
                           grads: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a tensor_parallel model (a collective: every rank of `group` calls it).

    grads=True gathers the parameters' gradients instead (named like named_parameters(), tied weights once)."""
    params = _params_by_name(model)
    world = dist.get_world_size(group)
    out: dict[str, torch.Tensor] = {}
    items = ({n: p.grad for n, p in model.named_parameters() if p.grad is not None} if grads
             else model.state_dict())
    for name, t in items.items():
        dim = getattr(params.get(name), "_tp_shard_dim", None)
        if dim is None:
            out[name] = t.detach().clone()
            continue
        parts = [torch.empty_like(t) for _ in range(world)]
        with collective_guard(f"checkpoint gather of {name}"):
            dist.all_gather(parts, t.contiguous(), group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None,
                         strict: bool = True) -> None:
    """Copy each rank's slice of the full state dict `sd` into a tensor_parallel model (no communication)."""
    params = _params_by_name(model)
    own = model.state_dict()
    if strict:
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for name, t in own.items():
        if name not in sd:
            continue
        full = sd[name]
        dim = getattr(params.get(name), "_tp_shard_dim", None)
        if dim is not None:
            if full.shape[dim] != t.shape[dim] * world:
                raise ValueError(f"{name}: full shape {tuple(full.shape)} does not split into {world} × "
                                 f"{tuple(t.shape)} along dim {dim}")
            full = full.narrow(dim, rank * t.shape[dim], t.shape[dim])
        if full.shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(full.shape)} in the checkpoint, {tuple(t.shape)} in the model")
        t.copy_(full)


def save_sharded_pretrained(model: nn.Module, directory: str | os.PathLike, full_model: nn.Module | None = None,
                            tp_group: dist.ProcessGroup | None = None,
                            pp_group: dist.ProcessGroup | None = None) -> Path | None:
    """Gather a TP- and/or PP-sharded model (or pipeline stage) and write one HF directory from global rank 0
    (the other ranks return None). full_model: an unsharded model of the same config to receive the weights
    and be written (needed on rank 0 only)."""
    from tinyllm.model.hf import save_pretrained

    sd = gather_full_state_dict(model, tp_group) if tp_group is not None else model.state_dict()
    if pp_group is not None:
        from tinyllm.train.parallel.pipeline import gather_pipeline_state_dict

        sd = gather_pipeline_state_dict(sd, pp_group, tied=bool(getattr(model, "tied", False)))
    if dist.get_rank() != 0:
        return None
    if full_model is None:
        raise ValueError("save_sharded_pretrained: rank 0 needs full_model (an unsharded model of the same config)")
    full_model.load_state_dict(sd)
    return save_pretrained(full_model, directory)
