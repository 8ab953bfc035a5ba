"""Sequence parallel (notes ch.04 序列并行; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"): inside a tensor-parallel group, the parts of a layer that tensor parallel leaves
replicated — the norms, dropout and the residual adds — run on a 1/tp slice of the *sequence* instead of the
whole of it, so their activations are no longer stored tp times.

Tensor parallel alone brackets each attention / MLP block with f (identity forward, all-reduce backward) and
g (all-reduce forward, identity backward). Sequence parallel replaces them by a pair that also moves between
the sequence-split and the full layout (an all-reduce is a reduce-scatter followed by an all-gather, so the
communication volume is unchanged):

    [B, T/tp, d] ─ norm ─ ḡ: all-gather over T ─ [B, T, d] ─ column ∥ ... row ∥ ─ g̅: reduce-scatter over T ─ [B, T/tp, d]
                        (backward: reduce-scatter)                               (backward: all-gather)

A parameter used on a sequence slice (norm gains) gets only this slice's share of its gradient on each rank;
`sum_grad_over(param, group)` adds the shares up in backward (Megatron all-reduces these "sequence-parallel"
gradients after backward, we do it in a gradient hook so every caller gets full gradients).

These operators are used by tensor.py (`tensor_parallel(model, group, sequence_parallel=True)`); the
sequence dimension is dim 1 ([B, T, d]) and T must divide by the group size. Not covered: dropout RNG
tracking across ranks (tinyllm's decoder has no dropout), splitting the sequence of the loss computation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.parallel.dist import collective_guard

SEQ_DIM = 1


def _check_split(x: torch.Tensor, world: int) -> None:
    if x.shape[SEQ_DIM] % world:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} does not divide by the sequence-parallel group "
                         f"size {world} (pad the batch to a multiple of {world})")


def split_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous slice of the sequence dim (no communication, no autograd meaning)."""
    world, r = dist.get_world_size(group), dist.get_rank(group)
    _check_split(x, world)
    n = x.shape[SEQ_DIM] // world
    return x.narrow(SEQ_DIM, r * n, n)


def all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, T/w, ...] on each rank → [B, T, ...] (rank order along T), no autograd."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    with collective_guard("sequence-parallel all-gather"):
        dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Σ over ranks of [B, T, ...], each rank keeping its T/w slice, no autograd."""
    world = dist.get_world_size(group)
    _check_split(x, world)
    parts = [c.contiguous() for c in x.chunk(world, dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    with collective_guard("sequence-parallel reduce-scatter"):
        dist.reduce_scatter(out, parts, group=group)
    return out


class _GatherSequence(torch.autograd.Function):
    """Forward all-gather along T; backward reduce-scatter (each rank's full-T gradient is partial)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return reduce_scatter_sequence(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward reduce-scatter along T (sums the row-parallel partial outputs); backward all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return all_gather_sequence(grad, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    """Forward: keep this rank's slice of a replicated tensor; backward: all-gather the slices' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return split_sequence(x, group).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return all_gather_sequence(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ReduceScatterSequence.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return _ScatterSequence.apply(x, group)


def sum_grad_over(param: nn.Parameter, group: dist.ProcessGroup | None) -> None:
    """Make `param`'s gradient the sum of every rank's share (each rank saw a different slice of the data)."""
    if getattr(param, "_grad_summed_over", None) is not None:
        return

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        with collective_guard("sequence-parallel gradient all-reduce"):
            dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(hook)
    param._grad_summed_over = group  # type: ignore[attr-defined]
