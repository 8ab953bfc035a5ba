"""Expert parallel on 2 gloo ranks (float64): an expert-parallel MoE layer is moe.py's MoE on the rank's own
tokens (output, aux loss, Switch capacity drops, gradients), through all-to-all and through the all-gather
fallback; EP×DP training equals one process accumulating over the ranks' micro-batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _mp import ACCUM, GBS, train
from _ref import CLIP, assert_close_dicts, local_rows, tiny_model
from _spawn import run_ranks

from tinyllm.train.parallel import expert as ep

MOE = dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01, router_z_loss_coef=1e-3)
SWITCH = dict(MOE, router_type="switch", expert_capacity_factor=1.0)


def _layer_equal(rank: int, world: int) -> list:
    results = []
    for over in (MOE, SWITCH):
        moe = tiny_model(seed=0, **over).model.layers[0].mlp
        g = torch.Generator().manual_seed(10 + rank)  # each rank routes different tokens
        x = torch.randn(2, 6, 32, dtype=torch.float64, generator=g)
        gy = torch.randn(2, 6, 32, dtype=torch.float64, generator=g)
        xr = x.clone().requires_grad_()
        y_ref = moe(xr)
        (y_ref * gy).sum().backward()
        want = (y_ref.detach(), moe.aux_loss.detach(), moe.routing.keep, xr.grad, moe.gate.weight.grad)
        for dispatch in ("all_to_all", "all_gather"):
            layer = ep.ExpertParallelMoE(tiny_model(seed=0, **over).model.layers[0].mlp, None, dispatch)
            xe = x.clone().requires_grad_()
            y = layer(xe)
            (y * gy).sum().backward()
            got = (y.detach(), layer.aux_loss.detach(), layer.routing.keep, xe.grad, layer.gate.weight.grad)
            results.append((over.get("router_type", "topk"), dispatch, got, want))
    return results


def _check_layers(per_rank: list) -> None:
    for router, dispatch, got, want in per_rank:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, t=f"{router}/{dispatch}": f"{t}: {m}")
    assert not per_rank[-1][2][2].all()  # the Switch case really dropped tokens at capacity


def _loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x).flatten(0, 1), y.flatten()) + m.aux_loss()


def _ep_train(rank: int, world: int, dispatch: str) -> dict:
    model = ep.expert_parallel(tiny_model(seed=0, **MOE), None, dispatch)

    def grads(m):
        every = [None] * world
        dist.all_gather_object(every, {n: p.grad.clone() for n, p in m.named_parameters()})
        return {k: v for d in every for k, v in d.items()}

    def reduce_loss(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / world

    out = train(model, _loss, rows=lambda x, y: (local_rows(x, rank, world), local_rows(y, rank, world)),
                sync=lambda m: ep.sync_grads(m, None), clip=lambda m: ep.clip_grad_norm_(m, CLIP, None),
                gather_grads=grads, gather_params=lambda m: ep.gather_expert_state_dict(m, None),
                reduce_loss=reduce_loss)
    errors = []
    for bad in (dict(), dict(num_local_experts=3, num_experts_per_tok=1)):
        try:
            ep.expert_parallel(tiny_model(**bad), None)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    out["layers"] = _layer_equal(rank, world)  # in the same group: starting ranks costs more than the check
    return out


def _reference(world: int) -> dict:
    """One process, each global micro-batch run as `world` separately routed chunks (what the ranks see)."""
    def loss(m, x, y):
        return sum(_loss(m, local_rows(x, r, world), local_rows(y, r, world)) for r in range(world)) / world

    return train(tiny_model(seed=0, **MOE), loss, accum=ACCUM, gbs=GBS)


@pytest.mark.parametrize("dispatch", ["auto"])
def test_ep_layer_and_ep_times_dp_equal_single_process(dispatch):
    ref = _reference(2)
    for out in run_ranks(_ep_train, 2, args=(dispatch,)):
        torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
        assert_close_dicts(out["grads0"], ref["grads0"])
        assert_close_dicts(out["params"], ref["params"])
        _check_layers(out["layers"])
        assert "no MoE layer" in out["errors"][0] and "num_local_experts=3 does not divide by ep=2" in out["errors"][1]


def _ep_dp_4(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("edp", "ep"))  # ep groups {0,1} {2,3}
    ep_g, edp_g = mesh.get_group("ep"), mesh.get_group("edp")
    model = ep.expert_parallel(tiny_model(seed=0, **MOE), ep_g)

    def reduce_loss(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / world

    return train(model, _loss, rows=lambda x, y: (local_rows(x, rank, world), local_rows(y, rank, world)),
                 sync=lambda m: ep.sync_grads(m, ep_g, edp_g), clip=lambda m: ep.clip_grad_norm_(m, CLIP, ep_g),
                 gather_grads=lambda m: {}, gather_params=lambda m: ep.gather_expert_state_dict(m, ep_g),
                 reduce_loss=reduce_loss)


@pytest.mark.slow  # four processes on two cores
def test_ep2_times_dp2_on_4_ranks():
    ref = _reference(4)
    for out in run_ranks(_ep_dp_4, 4, timeout_s=150):
        torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
        assert_close_dicts(out["params"], ref["params"])


# ------------------------------------------------------------------ the training loop with --ep
def _loop_run(out, parallel, batches, batch_size: int, accum: int, **over) -> dict:
    from test_strategy import _cfg, _Task

    from tinyllm.train.loop import train as loop_train

    cfg = _cfg(out)
    cfg.batch_size, cfg.grad_accum_steps = batch_size, accum
    res = loop_train(tiny_model(seed=0, model_type="mixtral", **{**MOE, **over}), _Task(batches), cfg,
                     parallel=parallel)
    weights = {k: v.detach().cpu().clone() for k, v in res.model.state_dict().items()} if res.model else None
    return {"losses": res.losses, "weights": weights, "tokens": res.tokens}


def _moe_batches(rows: int) -> list[tuple]:
    from _ref import global_batches
    from test_strategy import ACCUM, GBS, STEPS

    full = [b for step in global_batches(STEPS, ACCUM, GBS, learnable=True) for b in step]
    return [(x[r:r + rows], y[r:r + rows]) for x, y in full for r in range(0, GBS, rows)]


def _loop_ep(rank: int, world: int, root: str) -> dict:
    from pathlib import Path

    from test_strategy import ACCUM, GBS

    from tinyllm.train.parallel.config import ParallelConfig

    ep = 2  # 4 ranks: two replicas of a 2-way expert split
    return {"ep": _loop_run(Path(root) / "ep", ParallelConfig("none" if world == ep else "dp", ep=ep),
                            _moe_batches(GBS), GBS, ACCUM)}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_training_loop_with_expert_parallel_equals_accumulating_process(tmp_path, world):
    from test_strategy import ACCUM, GBS, _compare

    # one process, each rank's rows as its own micro-batch: GBS/world rows, world× the accumulation steps
    want = _loop_run(tmp_path / "single", None, _moe_batches(GBS // world), GBS // world, world * ACCUM)
    per_rank = run_ranks(_loop_ep, world, args=(str(tmp_path),), timeout_s=180)
    _compare(per_rank, want, rtol=1e-10, atol=1e-12)
    assert (tmp_path / "ep" / "checkpoints" / "step-000004" / "model.safetensors").exists()


def _loop_ep_tp(rank: int, world: int, root: str) -> dict:
    from pathlib import Path

    from test_strategy import ACCUM, GBS

    from tinyllm.train.parallel.config import ParallelConfig

    return {"ep": _loop_run(Path(root) / "ep-tp", ParallelConfig("none", ep=2, tp=2), _moe_batches(GBS), GBS,
                            ACCUM)}


@pytest.mark.slow  # 4 processes on a 2-core machine
def test_training_loop_with_expert_times_tensor_parallel_equals_accumulating_process(tmp_path):
    from test_strategy import ACCUM, GBS, _compare

    # ep=2 × tp=2 on 4 ranks: two data ranks (the TP pairs share their rows), so one process with GBS/2 rows and
    # 2× the accumulation steps
    want = _loop_run(tmp_path / "single", None, _moe_batches(GBS // 2), GBS // 2, 2 * ACCUM)
    per_rank = run_ranks(_loop_ep_tp, 4, args=(str(tmp_path),), timeout_s=240)
    _compare(per_rank, want, rtol=1e-10, atol=1e-12)
    assert (tmp_path / "ep-tp" / "checkpoints" / "step-000004" / "model.safetensors").exists()


SPARSE = dict(num_local_experts=8, num_experts_per_tok=1)  # a rank's micro-batch leaves some experts idle


def _loop_dp_moe(rank: int, world: int, root: str) -> dict:
    from pathlib import Path

    from test_strategy import ACCUM, GBS

    from tinyllm.train.parallel.config import ParallelConfig

    return {"dp": _loop_run(Path(root) / "dp", ParallelConfig("dp"), _moe_batches(GBS), GBS, ACCUM, **SPARSE)}


def test_data_parallel_moe_with_idle_experts_equals_accumulating_process(tmp_path):
    """An expert no token chose gets no gradient on that rank: torch DDP must be told to expect unused
    parameters, or the ranks' bucketed all-reduces stop matching and gloo aborts."""
    from test_strategy import ACCUM, GBS, _compare

    want = _loop_run(tmp_path / "single", None, _moe_batches(GBS // 2), GBS // 2, 2 * ACCUM, **SPARSE)
    _compare(run_ranks(_loop_dp_moe, 2, args=(str(tmp_path),), timeout_s=180), want, rtol=1e-10, atol=1e-12)
