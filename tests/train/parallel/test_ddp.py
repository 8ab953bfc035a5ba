"""Data parallel on 2 gloo ranks equals the single-process run on the global batch (float64): torch DDP with
no_sync accumulation, and our bucketed all-reduce DP (small buckets so several are in flight)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _ref import (
    BETAS,
    CLIP,
    LR,
    WD,
    assert_close_dicts,
    global_batches,
    lm_loss,
    local_rows,
    mean_over_ranks,
    reference,
    tiny_model,
)
from _spawn import run_ranks

from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel.ddp import BucketedDP, make_buckets, wrap_ddp

STEPS, ACCUM, GBS = 3, 2, 4


def _dp_run(rank: int, world: int, kind: str) -> dict:
    model = tiny_model(seed=rank)  # different on purpose: the wrapper must broadcast rank 0's weights
    if kind == "ddp":
        torch.manual_seed(0)
        model = tiny_model(seed=0)  # torch DDP also broadcasts, but starts from its own module
        wrapped = wrap_ddp(model)
    else:
        wrapped = BucketedDP(model, bucket_mb=0.004)  # ~1000 float64s: several buckets in flight
        assert len(wrapped.buckets) > 3
    opt = build_optimizer(list(model.named_parameters()), LR, WD, BETAS)
    losses, grads0 = [], None
    for s, micro in enumerate(global_batches(STEPS, ACCUM, GBS)):
        total = 0.0
        for i, (x, y) in enumerate(micro):
            ctx = wrapped.no_sync() if i < ACCUM - 1 else contextlib.nullcontext()
            with ctx:
                loss = lm_loss(wrapped, local_rows(x, rank, world), local_rows(y, rank, world))
                (loss / ACCUM).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if s == 0:
            grads0 = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(total / ACCUM))
    return {"losses": losses, "grads0": grads0, "params": {k: v.detach().clone()
                                                           for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def ref() -> dict:
    return reference(STEPS, ACCUM, GBS)


def _both(rank: int, world: int) -> dict:
    return {kind: _dp_run(rank, world, kind) for kind in ("ddp", "bucketed")}


def test_data_parallel_equals_single_process(ref):
    for per_rank in run_ranks(_both, 2):
        for kind, out in per_rank.items():
            torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), rtol=1e-10, atol=0,
                                       msg=kind)
            assert_close_dicts(out["grads0"], ref["grads0"])
            assert_close_dicts(out["params"], ref["params"])


def test_buckets_respect_cap_and_order():
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 100, 300, 50)]
    buckets = make_buckets(ps, bucket_mb=200 * 4 / 2**20)
    assert [[p.numel() for p in b] for b in buckets] == [[100, 100], [300], [50]]
