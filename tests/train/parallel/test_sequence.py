"""Sequence parallel inside tensor parallel (TP×SP) on 2 gloo ranks equals the single-process run (float64), and
its operators are each other's adjoints: all-gather ↔ reduce-scatter along the sequence."""

from __future__ import annotations

import pytest
import torch
from _mp import reference64
from _ref import assert_close_dicts
from _spawn import run_ranks
from test_tensor import _tp_train

from tinyllm.train.parallel import sequence as sp


def _ops(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 8, 3, dtype=torch.float64, generator=g)  # the same on every rank
    grad = torch.randn(2, 8, 3, dtype=torch.float64, generator=g)
    x = sp.split_sequence(full, None).clone().requires_grad_()
    y = sp.gather_sequence(x, None)  # [2, 8, 3]
    (y * grad).sum().backward()
    z = sp.reduce_scatter_to_sequence(full * (rank + 1), None)  # Σ_r (r+1)·full, this rank's slice
    try:
        sp.split_sequence(torch.zeros(1, 5), None)
        err = ""
    except ValueError as e:
        err = str(e)
    return {"y": y.detach(), "xgrad": x.grad, "z": z, "err": err, "full": full, "grad": grad}


def _sp_train(rank: int, world: int, loss: str) -> dict:
    return {"ops": _ops(rank, world), **_tp_train(rank, world, True, loss, 2)}


@pytest.mark.parametrize("loss", ["vocab", pytest.param("gathered", marks=pytest.mark.slow)])
def test_tp_with_sequence_parallel_equals_single_process(loss):
    ref = reference64()
    for r, out in enumerate(run_ranks(_sp_train, 2, args=(loss,))):
        torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
        assert_close_dicts(out["grads0"], ref["grads0"])
        assert_close_dicts(out["params"], ref["params"])
        o = out["ops"]
        torch.testing.assert_close(o["y"], o["full"])
        # backward of the all-gather sums every rank's gradient for this rank's slice: here 2× the same
        torch.testing.assert_close(o["xgrad"], 2 * o["grad"][:, r * 4:(r + 1) * 4])
        torch.testing.assert_close(o["z"], 3 * o["full"][:, r * 4:(r + 1) * 4])
        assert "sequence length 5 does not divide" in o["err"]
