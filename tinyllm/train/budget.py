"""Wall-clock budgets for training runs: how many steps fit, re-measured while the run goes.

A plan made before training (a short probe of a few steps, `recipes.tiny_zh_plan.measure_step_seconds`) times the
machine when it is quiet and the caches are warm; a long run on a shared or thermally limited CPU is often
slower (on a 2-core AVX-512 EPYC: a 0.270 s/step probe, then 10.4–17.3 k tokens/s in 23-step windows and 348 s
for a 320 s plan). `StepBudget` re-plans the step count from the run's own mean step time, so the run ends
near its budget whatever the machine does.

The learning-rate schedules are functions of (step, max_steps) (`train.optim.lr_at`), so a new max_steps moves
the rest of the schedule. The re-plan is therefore kept to where that is harmless: `replan_floor` gives the
smallest step count a schedule may be shortened to at a given step, and `replan_open` says whether the run may
still be re-planned at all:

- wsd: only during warm-up and the stable phase, and never so short that the decay would already have begun —
  the decay always runs whole, from the peak lr to min_lr (the stable phase is what shrinks);
- cosine: during the first half of the run (a shorter run moves the lr along the same cosine a little earlier);
- constant: at any step.

The budget never plans past the run's `max_steps`: the data a run was sized for (epochs, shards) stays enough,
and a run on a faster machine than planned simply ends early. Below it the estimate moves both ways while the
schedule is open: a slow stretch lowers the plan and a faster one raises it again. (A plan that could only fall
kept the first estimate's errors: on a 2-core Xeon one slow step right after settling cut a 703-step, 320 s
pretraining plan to 362 steps, and the run ended after 166 s.)
"""

from __future__ import annotations

import math


def wsd_decay_start(max_steps: int, decay_fraction: float) -> int:
    """The first step of wsd's decay (`train.optim.wsd_lr`)."""
    return max_steps - max(1, round(decay_fraction * max_steps))


def replan_open(step: int, max_steps: int, schedule: str, decay_fraction: float) -> bool:
    """Whether a run at `step` (steps completed) of `max_steps` under `schedule` may still be re-planned."""
    if schedule == "wsd":
        return step < wsd_decay_start(max_steps, decay_fraction)
    if schedule == "cosine":
        return 2 * step < max_steps
    return step < max_steps


def replan_floor(step: int, schedule: str, decay_fraction: float) -> int:
    """The fewest total steps a run at `step` may be re-planned to (see the module docstring)."""
    if schedule == "wsd" and decay_fraction < 1:  # (all decay: the run is never open to a re-plan)
        # the decay's first step never falls as n grows, and hi = ceil((step + 1) / (1 - f)) + 1 starts it at or
        # after `step`: bisect for the fewest
        lo, hi = step + 1, math.ceil((step + 1) / (1.0 - decay_fraction)) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if wsd_decay_start(mid, decay_fraction) >= step else (mid + 1, hi)
        return lo
    if schedule == "cosine":
        return 2 * step
    return step + 1


class StepBudget:
    """How many steps fit `seconds` of wall clock, from the steps this run has timed.

    `replan(step, elapsed)` after each completed step: once `settle` steps have run (the first steps pay one-off
    costs: allocation, compilation, cold caches) and `settle` more have been timed, the mean seconds per step
    since the first gives the steps that still fit, and the plan becomes min(max_steps, step + steps that fit),
    never below `floor` (what the schedule needs). A resumed run passes `spent`, the budget its earlier part used,
    `start`, the step it resumes from (the settling steps count from there), and `plan`, the step count its
    checkpoint held (the plan may rise from there back towards `max_steps`)."""

    def __init__(self, seconds: float, max_steps: int, settle: int = 5, spent: float = 0.0, start: int = 0,
                 plan: int | None = None) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds={seconds!r} must be > 0")
        if max_steps <= 0:
            raise ValueError(f"max_steps={max_steps!r} must be positive")
        if plan is not None and plan <= 0:
            raise ValueError(f"plan={plan!r} must be positive (or None: max_steps)")
        self.seconds, self.spent = float(seconds), float(spent)
        self.limit = int(max_steps)  # the most it may plan
        self.max_steps = self.limit if plan is None else min(self.limit, int(plan))  # the plan as it stands
        self.settle, self.settle_at = int(settle), start + int(settle)
        self._mark: tuple[int, float] | None = None  # (step, elapsed) where timing began

    def seconds_per_step(self, step: int, elapsed: float) -> float | None:
        if self._mark is None:
            return None
        s0, t0 = self._mark
        return (elapsed - t0) / (step - s0) if step > s0 else None

    def replan(self, step: int, elapsed: float, floor: int = 1) -> int:
        """The step count after `step` completed steps and `elapsed` seconds of this call."""
        if self._mark is None:
            if step >= self.settle_at:
                self._mark = (step, elapsed)
            return self.max_steps
        per = self.seconds_per_step(step, elapsed)
        if per is None or per <= 0 or step - self._mark[0] < max(1, self.settle):
            return self.max_steps
        left = self.seconds - self.spent - elapsed
        fits = step + max(0, math.floor(left / per))
        self.max_steps = max(min(self.limit, fits), min(floor, self.limit))
        return self.max_steps
