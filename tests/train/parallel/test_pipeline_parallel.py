"""Pipeline parallel: the schedule simulator's bubble is (p−1)/(m+p−1); our GPipe and 1F1B runners over
send/recv and torch.distributed.pipelining's schedules train like the single process on 2 gloo ranks (float64);
the measured idle fraction of a run equals the formula; checkpoints move between TP, PP and one process."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _mp import ACCUM, GBS, STEPS, reference64
from _ref import BETAS, CLIP, LR, WD, assert_close_dicts, global_batches, local_rows, tiny_model
from _spawn import run_ranks

from tinyllm.calc import gpipe_bubble
from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel import pipeline as pp

MICRO = 2  # pipeline micro-batches per accumulation micro-batch


@pytest.mark.parametrize("kind", pp.SCHEDULES)
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_simulated_bubble_is_the_formula(kind, p, m):
    ops = pp.simulate(pp.schedule(kind, p, m))
    assert pp.bubble_fraction(ops) == pytest.approx(gpipe_bubble(p, m))
    assert pp.bubble_fraction(pp.simulate(pp.schedule(kind, p, m), 1.0, 1.0)) == pytest.approx(gpipe_bubble(p, m))


def test_1f1b_keeps_fewer_activations_than_gpipe():
    def peak(ops):  # most micro-batches whose forward ran and backward did not
        live = best = 0
        for kind, _ in ops:
            live += 1 if kind == "F" else -1
            best = max(best, live)
        return best

    p, m = 4, 8
    assert [peak(o) for o in pp.schedule("gpipe", p, m)] == [m] * p
    assert [peak(o) for o in pp.schedule("1f1b", p, m)] == [p - s for s in range(p)]


def test_render_and_errors():
    text = pp.render(pp.simulate(pp.schedule("gpipe", 2, 2), 1.0, 1.0))
    assert text.splitlines()[:2] == ["stage 0: 01..ab", "stage 1: .01ab."]
    with pytest.raises(ValueError, match="schedule='zigzag'"):
        pp.schedule("zigzag", 2, 2)
    with pytest.raises(ValueError, match="stages=3 must be between 1 and num_hidden_layers=2"):
        pp.split_layers(2, 3)
    assert pp.split_layers(5, 2) == [range(0, 3), range(3, 5)]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()) / ACCUM


def _named_grads(stage: pp.PipelineStage, group) -> dict:
    every = [None] * dist.get_world_size(group)
    mine = {n: p.grad.detach().clone() for n, p in stage.named_parameters() if p.grad is not None}
    dist.all_gather_object(every, mine, group=group)
    out: dict = {}
    for d in every:
        for k, v in d.items():
            out.setdefault(k, v)
    return out


def _pp_train(rank: int, world: int, kind: str, engine: str, dp: int = 1) -> dict:
    tied = engine == "ours"  # torch.distributed.pipelining has no tied-weight support across stages
    pp_g = dp_g = None
    if dp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "pp"))
        pp_g, dp_g = mesh.get_group("pp"), mesh.get_group("dp")
    s, p = dist.get_rank(pp_g), dist.get_world_size(pp_g)
    d = dist.get_rank(dp_g) if dp_g is not None else 0
    model = tiny_model(seed=0, tie_word_embeddings=tied)
    stage = pp.PipelineStage(model, s, p)
    if engine == "ours":
        runner = pp.PipelineRunner(stage, pp_g, MICRO, kind, loss_fn=_ce)
        run = runner.step
    else:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        ref_stage = PipelineStage(stage, s, p, torch.device("cpu"), group=pp_g)
        # scale_grads=True would divide every gradient accumulated so far by MICRO at the end of each step(),
        # the earlier accumulation steps' too; the loss carries the 1/MICRO instead
        sched = (ScheduleGPipe if kind == "gpipe" else Schedule1F1B)(
            ref_stage, MICRO, loss_fn=lambda out, y: _ce(out, y) / MICRO, scale_grads=False)

        def run(x, y):
            losses: list = []
            if s == 0:
                sched.step(x)
            else:
                sched.step(target=y, losses=losses)
            return sum(v.item() for v in losses) if s == p - 1 else None

    opt = build_optimizer(list(stage.named_parameters()), LR, WD, BETAS)
    losses, grads0 = [], None
    for step, micro in enumerate(global_batches(STEPS, ACCUM, GBS)):
        total = 0.0
        for x, y in micro:
            out = run(local_rows(x, d, dp), local_rows(y, d, dp))
            total += (out or 0.0) * ACCUM
        pp.sync_tied_grads(stage, pp_g)
        if dp_g is not None:
            for prm in stage.parameters():
                dist.all_reduce(prm.grad, group=dp_g)
                prm.grad /= dp
        pp.clip_grad_norm_(stage, CLIP, pp_g)
        if step == 0:
            grads0 = _named_grads(stage, pp_g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = torch.tensor([total / ACCUM], dtype=torch.float64)
        dist.all_reduce(t)  # only the last stage of each pipeline holds a loss
        losses.append(t.item() / dp)
    params = pp.gather_pipeline_state_dict(stage.state_dict(), pp_g, tied=tied)
    # the measured bubble, in the same group (starting ranks costs more than the measurement)
    bubble = _bubble_run(rank, world, kind, 4) if engine == "ours" and dp == 1 else None
    return {"losses": losses, "grads0": grads0, "params": params, "bubble": bubble}


@pytest.mark.parametrize("engine,kind", [pytest.param("ours", "gpipe", marks=pytest.mark.slow), ("ours", "1f1b"),
                                         pytest.param("torch", "gpipe", marks=pytest.mark.slow), ("torch", "1f1b")])
def test_pipeline_equals_single_process(engine, kind):
    tied = engine == "ours"
    ref = reference64(tie_word_embeddings=tied)
    out = run_ranks(_pp_train, 2, args=(kind, engine))[0]
    torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                               torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
    got = {k: v for k, v in out["grads0"].items() if k in ref["grads0"]}
    assert set(out["grads0"]) - set(got) <= {"lm_head.weight"}  # the last stage's copy of a tied matrix
    if tied:
        torch.testing.assert_close(out["grads0"]["lm_head.weight"], ref["grads0"]["model.embed_tokens.weight"])
    assert_close_dicts(got, ref["grads0"])
    assert_close_dicts(out["params"], ref["params"])
    if engine == "ours":  # fixed-cost stages: the idle share of the timed ops is the formula's
        assert out["bubble"] == pytest.approx(gpipe_bubble(2, 4), abs=0.06)  # 0.2


@pytest.mark.slow  # four processes on two cores
def test_pp_times_dp_on_4_ranks():
    ref = reference64()
    out = run_ranks(_pp_train, 4, args=("1f1b", "ours", 2), timeout_s=150)[0]
    torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                               torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
    assert_close_dicts(out["params"], ref["params"])


# ------------------------------------------------------------------ measured bubble
class _Sleep(torch.autograd.Function):
    """A stage whose forward and backward each take `dt` of wall time (sleeping: the two cores stay free)."""

    @staticmethod
    def forward(ctx, x, dt):  # type: ignore[override]
        ctx.dt = dt
        time.sleep(dt)
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        time.sleep(ctx.dt)
        return g, None


class _SleepyStage(torch.nn.Module):
    def __init__(self, first: bool, dt: float) -> None:
        super().__init__()
        self.first, self.dt = first, dt
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = x[..., None] * self.w if self.first else x * self.w
        return _Sleep.apply(h, self.dt)


def _bubble_run(rank: int, world: int, kind: str, m: int) -> float:
    runner = pp.PipelineRunner(_SleepyStage(rank == 0, 0.04), None, m, kind,
                               loss_fn=lambda out, y: out.sum(), hidden_size=4)
    x = torch.ones(m, 3)
    runner.step(x, x)  # warm-up: first-call costs are not pipeline bubbles
    runner.step(x, x)
    return pp.measured_bubble(runner.events)


# ------------------------------------------------------------------ checkpoint moves between layouts
def _tp_save_pp_load(rank: int, world: int, directory: str) -> bool:
    from tinyllm.model.hf import load_model
    from tinyllm.train.parallel.layout import save_sharded_pretrained
    from tinyllm.train.parallel.tensor import tensor_parallel

    want = tiny_model(seed=5).state_dict()
    tp_model = tensor_parallel(tiny_model(seed=5), None)
    save_sharded_pretrained(tp_model, directory, full_model=tiny_model(seed=0) if rank == 0 else None,
                            tp_group=None if world == 1 else dist.group.WORLD)
    dist.barrier()
    loaded = load_model(directory, dtype=torch.float64)
    stage = pp.PipelineStage(tiny_model(seed=1), rank, world)
    pp.load_stage_state_dict(stage, loaded.state_dict())
    stage_dir = f"{directory}-pp"
    save_sharded_pretrained(stage, stage_dir, full_model=tiny_model(seed=0) if rank == 0 else None,
                            pp_group=dist.group.WORLD)
    dist.barrier()
    back = load_model(stage_dir, dtype=torch.float64).state_dict()
    return all(torch.equal(back[k], want[k]) for k in want)


def test_checkpoint_saved_under_tp_loads_under_pp_and_back(tmp_path):
    assert run_ranks(_tp_save_pp_load, 2, args=(str(tmp_path / "ckpt"),)) == [True, True]


def test_schedule_command_prints_timeline_and_plots(tmp_path, capsys):
    from tinyllm.cli import main

    png = tmp_path / "s.png"
    assert main(["parallel", "schedule", "--kind", "gpipe", "--stages", "2", "--micro-batches", "2",
                 "--backward-cost", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "stage 0: 01..ab\nstage 1: .01ab." in out and '"bubble": 0.333333' in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="kind='zigzag'"):
        from tinyllm.train.parallel.check import ScheduleConfig

        ScheduleConfig(kind="zigzag")


def _stage_dies(rank: int, world: int) -> None:
    import os
    import signal

    stage = pp.PipelineStage(tiny_model(seed=0), rank, world)
    runner = pp.PipelineRunner(stage, None, 2, "1f1b", loss_fn=_ce)
    x, y = global_batches(1, 1, 4)[0][0]
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    runner.step(x, y)  # stage 0 waits for a gradient that will never come


@pytest.mark.slow  # two more ranks started for a failure path
def test_dead_stage_fails_the_pipeline_fast():
    t0 = time.monotonic()
    with pytest.raises(Exception) as ei:
        run_ranks(_stage_dies, 2, timeout_s=60, group_timeout_s=20)
    errors = ei.value.errors
    assert "killed by signal 9" in errors[1]
    assert "PeerFailure" in errors[0] and "pipeline recv from stage 1" in errors[0]
    assert time.monotonic() - t0 < 40
