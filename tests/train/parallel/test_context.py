"""Context parallel (ring attention) on 2 gloo ranks: the attention op equals full attention (values and
Q/K/V gradients, causal and not, GQA, contiguous and zig-zag chunks), and a context-parallel CausalLM trains like
the single process."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _mp import reference64, train
from _ref import assert_close_dicts, tiny_model
from _spawn import run_ranks

from tinyllm.model.attention import repeat_kv
from tinyllm.train.parallel import context as cp


def _full(q, k, v, causal):
    n = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), is_causal=causal)


def _ring_vs_full(rank: int, world: int) -> list:
    out = []
    for causal, layout in itertools.product((True, False), cp.LAYOUTS):
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(2, h, 12, 8, dtype=torch.float64, generator=g).requires_grad_() for h in (4, 2, 2))
        dout = torch.randn(2, 4, 12, 8, dtype=torch.float64, generator=g)
        ref = _full(q, k, v, causal)
        ref.backward(dout)
        sl = cp.local_positions(12, rank, world, layout)  # zigzag on 2 ranks: rank 0 holds 0-2 and 9-11
        ql, kl, vl = (t.detach()[:, :, sl].clone().requires_grad_() for t in (q, k, v))
        got = cp.ring_attention(ql, kl, vl, None, causal=causal, layout=layout)
        got.backward(dout[:, :, sl])
        out.append([(got.detach(), ref.detach()[:, :, sl])] + [(a.grad, b.grad[:, :, sl])
                                                               for a, b in ((ql, q), (kl, k), (vl, v))])
    return out


def _cp_train(rank: int, world: int) -> dict:
    ring = _ring_vs_full(rank, world)  # one group for both checks: starting ranks costs more than the checks
    model = cp.context_parallel(tiny_model(seed=0), None, "zigzag")

    def reduce_loss(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.item()

    result = train(model, lambda m, x, y: cp.cp_lm_loss(m, x, y, None, fused=False),
                   sync=lambda m: cp.all_reduce_grads(m, None), reduce_loss=reduce_loss)
    try:
        cp.context_parallel(tiny_model(sliding_window=4), None)
    except ValueError as e:
        result["error"] = str(e)
    result["ring"] = ring
    return result


def test_ring_attention_and_context_parallel_model_equal_single_process():
    ref = reference64()
    for out in run_ranks(_cp_train, 2):
        for pairs in out["ring"]:  # the op: values and dQ/dK/dV of full attention, causal and not
            for got, want in pairs:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
        assert_close_dicts(out["grads0"], ref["grads0"])
        assert_close_dicts(out["params"], ref["params"])
        assert "sliding_window=4" in out["error"]


def test_zigzag_chunks_balance_the_causal_work():
    """Rank r of C holds chunks r and 2C-1-r: every rank attends the same number of (query, key) chunk pairs
    under the causal mask, where contiguous chunks give the last rank C times the first one's."""
    def pairs(world: int, layout: str) -> list[int]:
        return [sum(1 for src in range(world) for q in cp.chunk_ids(r, world, layout)
                    for k in cp.chunk_ids(src, world, layout) if k <= q) for r in range(world)]

    for world in (2, 3, 4):
        assert pairs(world, "zigzag") == [2 * world + 1] * world
        assert pairs(world, "contiguous") == list(range(1, world + 1))
    assert cp.local_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert cp.local_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="length 10 does not divide by 4"):
        cp.local_positions(10, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="layout='ring'"):
        cp.chunk_ids(0, 2, "ring")
