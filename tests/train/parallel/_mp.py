"""Shared loop of the model-parallel equality tests: run STEPS optimizer steps of ACCUM micro-batches over the
same global batches as `_ref.reference`, with the strategy supplying the loss, the rows a rank sees, the
gradient synchronisation, the clipping and how to gather full gradients/parameters for the comparison."""

from __future__ import annotations

from collections.abc import Callable

import torch
from _ref import BETAS, CLIP, LR, WD, global_batches

from tinyllm.train.optim import build_optimizer

STEPS, ACCUM, GBS = 3, 2, 4


def train(model: torch.nn.Module, loss_fn: Callable, rows: Callable = lambda x, y: (x, y),
          sync: Callable = lambda m: None, clip: Callable | None = None, gather_grads: Callable | None = None,
          gather_params: Callable | None = None, reduce_loss: Callable = lambda v: v,
          steps: int = STEPS, accum: int = ACCUM, gbs: int = GBS, optimizer: Callable | None = None) -> dict:
    opt = optimizer(model) if optimizer else build_optimizer(list(model.named_parameters()), LR, WD, BETAS)
    clip = clip or (lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP))
    losses, grads0 = [], None
    for s, micro in enumerate(global_batches(steps, accum, gbs)):
        total = 0.0
        for x, y in micro:
            x, y = rows(x, y)
            loss = loss_fn(model, x, y)
            (loss / accum).backward()
            total += loss.item()
        sync(model)
        clip(model)
        if s == 0:
            grads0 = gather_grads(model) if gather_grads else {
                n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(reduce_loss(total / accum))
    params = gather_params(model) if gather_params else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "grads0": grads0, "params": params}


def exact_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy in the logits' dtype (float64 here); the fused training loss takes its softmax in fp32."""
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def reference64(accum: int = ACCUM, gbs: int = GBS, **model_over) -> dict:
    """The single-process run of `train` on the global batch with float64-exact cross entropy."""
    from _ref import tiny_model

    return train(tiny_model(seed=0, **model_over), exact_loss, accum=accum, gbs=gbs)


def all_reduce_mean_grads(model: torch.nn.Module, group) -> None:
    """Plain data parallel over `group`: average every gradient (tied weights once)."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    for p in dict.fromkeys(model.parameters()):
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= n
