"""Checkpoint layout across model-parallel shards (notes ch.04: saving a TP/PP-sharded model).

A checkpoint is always the *full* model in Hugging Face names (DESIGN §4), whatever layout trained it, so a run
saved under tp=2 loads under tp=4, pp=2 or one process:

    gather_full_state_dict(model, tp_group)   every rank gets the full tinyllm state dict of a tensor_parallel
                                              model: shards all-gathered along the dim they were split on
    load_full_state_dict(model, sd, tp_group) the inverse: each rank copies its slice of a full state dict in
    save_sharded_pretrained(model, dir, ...)  gather (over TP, and over the pipeline stages with pp_group),
                                              then rank 0 writes the HF directory (temp name + rename)

The pipeline half lives in pipeline.py: stages keep the full model's parameter names, so
`gather_pipeline_state_dict` merges the stages' pieces and `load_stage_state_dict` cuts a full one.

The optimizer state travels the same way, so `--resume` works under every model-parallel layout and across
layouts. A checkpoint holds the state of the plain single-process AdamW (`train.optim.build_optimizer`: index i is
the i-th trainable parameter, matrices first, tied weights once); in between it is keyed by parameter name:

    adamw_order(named)                 the names behind a plain AdamW's indices, and its group sizes
    named_optimizer_state(sd, order)   a plain state dict → {name: {"step", "exp_avg", "exp_avg_sq"}}
    plain_optimizer_state(named, ...)  the inverse
    gather_named_state(named, params, tp_group, merge, merge_group)   a rank's pieces → the full model's:
                                       TP shards concatenated along their split dim, then the pieces of the
                                       other pipeline stages / expert ranks merged in
    cut_named_state(full, params, tp_group, alias)             the inverse for one rank (no communication)

Not covered: sharded (per-rank file) checkpoints; gathering happens in memory, so the full model and its
optimizer state must fit on one rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ optimizer state by parameter name
def adamw_order(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], list[int]]:
    """The parameter names behind the indices of `build_optimizer`'s AdamW over `named` (≥ 2-D first, then the
    rest; frozen ones skipped, a tied tensor under its first name), and the sizes of its groups."""
    seen: set[int] = set()
    decay: list[str] = []
    rest: list[str] = []
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else rest).append(name)
    return decay + rest, [n for n in (len(decay), len(rest)) if n]


def named_optimizer_state(sd: dict, order: list[str]) -> dict[str, dict[str, Any]]:
    """A plain (single-optimizer) state dict's per-parameter states keyed by name; parameters without state (no
    step taken yet) are left out."""
    if "state" not in sd:
        raise ValueError(f"optimizer state with keys {sorted(sd)}: resuming under model parallel needs AdamW's "
                         "(was the run trained with --optimizer muon?)")
    n = sum(len(g["params"]) for g in sd["param_groups"])
    if n != len(order):
        raise ValueError(f"the checkpoint's optimizer covers {n} parameters; this model trains {len(order)}: not "
                         "the same model or trainable set")
    return {order[i]: st for i, st in sd["state"].items()}


def plain_optimizer_state(named: dict[str, dict[str, Any]], order: list[str], sizes: list[int],
                          template: dict[str, Any], weight_decay: float) -> dict:
    """The inverse of `named_optimizer_state`: AdamW's state dict over `order`, groups of `sizes` (the first with
    `weight_decay` when there are two, as `train.optim.param_groups` makes them) with `template`'s settings."""
    hyper = {k: v for k, v in template.items() if k not in ("params", "weight_decay")}
    decays = [weight_decay, 0.0] if len(sizes) == 2 else [template.get("weight_decay", weight_decay)]
    groups, start = [], 0
    for size, wd in zip(sizes, decays):
        groups.append({**hyper, "weight_decay": wd, "params": list(range(start, start + size))})
        start += size
    index = {name: i for i, name in enumerate(order)}
    # every tensor its own copy: a "step" shared between parameters would be advanced once per parameter
    state = {index[n]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for n, st in named.items() if n in index}
    return {"state": state, "param_groups": groups}


def _moments(st: dict[str, Any], shape: torch.Size) -> list[str]:
    return [k for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor) and v.shape == shape]


@torch.no_grad()
def gather_named_state(named: dict[str, dict[str, Any]], params: dict[str, torch.Tensor],
                       tp_group: dist.ProcessGroup | None = None, merge: bool = False,
                       merge_group: dist.ProcessGroup | None = None) -> dict[str, dict[str, Any]]:
    """A collective: this rank's per-name optimizer states → the full model's. The moments of tensor-parallel
    shards (`_tp_shard_dim`) are all-gathered over `tp_group` and concatenated; with `merge`, the dicts of
    `merge_group`'s ranks (pipeline stages, expert ranks: disjoint pieces under the full model's names) are
    merged. A group None is the world, as for `gather_full_state_dict`."""
    out: dict[str, dict[str, Any]] = {}
    world = dist.get_world_size(tp_group)
    for name, st in named.items():
        st = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        p = params[name]
        dim = getattr(p, "_tp_shard_dim", None)
        if dim is not None:
            for k in _moments(st, p.shape):
                parts = [torch.empty_like(st[k]) for _ in range(world)]
                with collective_guard(f"optimizer-state gather of {name}"):
                    dist.all_gather(parts, st[k].contiguous(), group=tp_group)
                st[k] = torch.cat(parts, dim=dim)
        out[name] = st
    if merge:
        every: list = [None] * dist.get_world_size(merge_group)
        with collective_guard("optimizer-state merge"):
            dist.all_gather_object(every, out, group=merge_group)
        out = {}
        for piece in every:
            for k, v in piece.items():
                out.setdefault(k, v)
    return out


def cut_named_state(full: dict[str, dict[str, Any]], params: dict[str, torch.Tensor],
                    tp_group: dist.ProcessGroup | None = None,
                    alias: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """This rank's per-name states out of the full model's (no communication): each local parameter's state,
    its tensor-parallel slice where the parameter is a shard; `alias` names a local copy's source (a pipeline's
    tied lm_head reads the embedding's state)."""
    alias = alias or {}
    rank, world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    out: dict[str, dict[str, Any]] = {}
    for name, p in params.items():
        st = full.get(alias.get(name, name))
        if st is None:
            continue
        st = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        dim = getattr(p, "_tp_shard_dim", None)
        if dim is not None:
            n = p.shape[dim]
            for k in _moments(st, (*p.shape[:dim], n * world, *p.shape[dim + 1:])):
                st[k] = st[k].narrow(dim, rank * n, n).clone()
        for k in _moments(st, p.shape):
            st[k] = st[k].to(p.device, p.dtype)
        bad = [k for k, v in st.items()
               if k != "step" and isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape]
        if bad:
            raise ValueError(f"{name}: optimizer state {bad[0]} of shape {tuple(st[bad[0]].shape)} for a parameter "
                             f"of shape {tuple(p.shape)} on this rank")
        out[name] = st
    return out
