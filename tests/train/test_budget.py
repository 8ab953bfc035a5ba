"""Wall-clock budgets (tinyllm/train/budget.py) and the training loop's `time_budget_s`."""

from __future__ import annotations

import itertools
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.train.test_loop import LMTask, cfg, random_batches, tiny_model
from tinyllm.train import train
from tinyllm.train.budget import StepBudget, replan_floor, replan_open, wsd_decay_start
from tinyllm.train.checkpoint import latest_checkpoint
from tinyllm.train.optim import lr_at

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    """A fake perf_counter: the task advances it by `dt` per training step (eval batches cost nothing)."""

    def __init__(self, dt: float) -> None:
        self.now, self.dt = 1000.0, dt

    def perf_counter(self) -> float:
        return self.now


class TimedTask(LMTask):
    def __init__(self, batches: list[Any], clock: Clock, slow_from: int | None = None) -> None:
        super().__init__(batches)
        self.clock, self.calls, self.slow_from = clock, 0, slow_from

    def loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        if model.training:
            self.calls += 1
            # the machine slows down to half speed after `slow_from` steps
            slow = self.slow_from is not None and self.calls > self.slow_from
            self.clock.now += self.clock.dt * (2 if slow else 1)
        return super().loss(model, batch)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    import tinyllm.train.loop as loop

    c = Clock(0.1)
    loop.matmul_peak_flops("cpu", torch.float32)  # measured (and cached) on the real clock
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


def test_floor_keeps_the_wsd_decay_whole_and_cosine_past_half() -> None:
    for df in (0.2, 0.4, 0.9):
        for step in range(0, 300, 7):
            n = replan_floor(step, "wsd", df)
            assert wsd_decay_start(n, df) >= step  # the decay has not begun at `step`
            assert n == step + 1 or wsd_decay_start(n - 1, df) < step  # and it is the fewest such steps
    assert replan_floor(30, "wsd", 1.0) == 31 and not replan_open(1, 100, "wsd", 1.0)
    assert replan_floor(30, "cosine", 0.2) == 60 and replan_floor(30, "constant", 0.2) == 31
    assert replan_open(59, 100, "wsd", 0.4) and not replan_open(60, 100, "wsd", 0.4)
    assert replan_open(49, 100, "cosine", 0.2) and not replan_open(50, 100, "cosine", 0.2)


def test_step_budget_settles_then_follows_the_mean_below_max_steps() -> None:
    b = StepBudget(10.0, 1000, settle=5)
    assert [b.replan(s, 0.1 * s) for s in range(1, 6)] == [1000] * 5  # settling (step 5 marks the start)
    assert [b.replan(s, 0.1 * s) for s in range(6, 10)] == [1000] * 4  # 4 steps timed: too few to plan from
    assert b.replan(10, 1.0) == 10 + 90  # 0.1 s a step, 9 s left
    assert b.replan(20, 2.0, floor=150) == 150  # a floor the schedule needs holds
    assert b.replan(20, 2.0) == 100
    assert StepBudget(1e6, 40).replan(11, 1.1) == 40  # a generous budget keeps max_steps


def test_one_slow_step_after_settling_does_not_fix_a_short_plan() -> None:
    # a 320 s budget at 0.4 s a step, one step of 3 s among the first timed ones: the plan dips, then recovers
    b, t, plans = StepBudget(320.0, 703, settle=5), 0.0, []
    for step in range(1, 301):
        t += 3.0 if step == 7 else 0.4
        plans.append(b.replan(step, t))
    assert min(plans) < 703 * 0.92  # the slow stretch lowered it
    assert plans[-1] == 703  # the mean (0.41 s a step) fits all of max_steps again
    assert max(plans) == 703  # never past max_steps
    # a resumed run starts from its checkpoint's plan and may rise from it back to max_steps
    b, t = StepBudget(320.0, 703, settle=5, plan=400), 0.0
    assert b.max_steps == 400
    for step in range(1, 21):
        t += 0.4
        last = b.replan(step, t)
    assert last == 703
    with pytest.raises(ValueError, match="plan=0"):
        StepBudget(320.0, 703, plan=0)
    # a machine that stays slow keeps the lowered plan: (320 - 10 × 0.4) / 0.8 s a step from step 10
    b, t = StepBudget(320.0, 703, settle=5), 0.0
    for step in range(1, 201):
        t += 0.4 if step <= 10 else 0.8
        last = b.replan(step, t)
    assert abs(last - (200 + (320 - t) / ((t - 2.0) / 195))) <= 1
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            StepBudget(bad, 10)
    with pytest.raises(ValueError, match="time_budget_s"):
        cfg(Path("."), time_budget_s=-1.0)


def test_wsd_run_ends_at_its_budget_with_the_whole_decay(tmp_path: Path, clock: Clock) -> None:
    task = TimedTask(random_batches(4, 2), clock, slow_from=20)
    c = cfg(tmp_path, max_steps=400, schedule="wsd", decay_fraction=0.4, warmup_steps=2, time_budget_s=10.0,
            log_interval=1)
    result = train(tiny_model(), task, c)
    # 20 steps at 0.1 s, then 0.2 s a step: (10 - 2) / 0.2 = 40 more if planned from the slow rate alone; the
    # mean-rate estimate lands between 60 (all slow) and 100 (all fast)
    assert 55 <= result.step <= 70 and result.step == task.calls
    assert abs(clock.now - 1000.0 - 10.0) < 1.5  # ended near the budget (the decay runs whole, at the slow rate)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lr" in r]
    assert rows[-1]["max_steps"] == result.step
    lrs = [r["lr"] for r in rows]
    n = result.step
    # the logged lr is the schedule of the final plan from the decay on, ending at min_lr
    start = wsd_decay_start(n, 0.4)
    for r in rows:
        if r["step"] - 1 >= start:
            assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, "wsd", c.lr, c.min_lr, 2, n, 0.4))
    assert lrs[-1] == pytest.approx(c.min_lr + (c.lr - c.min_lr) / round(0.4 * n))
    assert max(lrs) == pytest.approx(c.lr) and all(a >= b for a, b in itertools.pairwise(lrs[2:]))


def test_without_a_budget_or_with_a_large_one_max_steps_holds(tmp_path: Path, clock: Clock) -> None:
    for i, budget in enumerate((0.0, 1e4)):
        task = TimedTask(random_batches(4, 2), clock)
        result = train(tiny_model(), task, cfg(tmp_path / str(i), max_steps=30, schedule="wsd",
                                               time_budget_s=budget))
        assert result.step == 30


def test_resume_keeps_the_shortened_plan(tmp_path: Path, clock: Clock) -> None:
    task = TimedTask(random_batches(4, 2), clock)
    c = dict(max_steps=500, schedule="wsd", decay_fraction=0.4, warmup_steps=2, time_budget_s=5.0,
             save_interval=10)
    first = train(tiny_model(), task, cfg(tmp_path, **c))
    assert first.step < 60
    state = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=False)
    assert state["max_steps"] == first.step and state["budget_spent_s"] == pytest.approx(clock.now - 1000.0)
    again = train(tiny_model(), TimedTask(random_batches(4, 2), clock), cfg(tmp_path, resume=True, **c))
    assert again.start_step == again.step == first.step  # the plan was done: nothing more to run


def test_parallel_runs_refuse_a_budget(tmp_path: Path) -> None:
    from tinyllm.train.parallel.config import ParallelConfig

    with pytest.raises(ValueError, match="time_budget_s"):
        train(tiny_model(), LMTask(random_batches(2, 2)), cfg(tmp_path, time_budget_s=5.0),
              parallel=ParallelConfig(parallel="dp"))
