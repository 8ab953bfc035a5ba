"""Plan-and-execute (notes ch.08 "planning: task decomposition"; Wang et al. 2023 Plan-and-Solve, LangChain's
plan-and-execute agent): one model call writes a numbered plan, an executor agent (function calling or
ReAct) carries out each step with the results of the earlier steps in its task, and a last call writes the
answer from the plan's results. The executor's steps are folded into one trace; `max_plan_steps` caps the
plan. Not covered: re-planning after a failed step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tinyllm.agent.backends import ChatBackend
from tinyllm.agent.trace import Step, Trace

PLAN_PROMPT = ("Make a short plan for the task below: a numbered list of at most {n} concrete steps, one per "
               "line, nothing else.\n\nTask: {task}")
STEP_PROMPT = "Overall task: {task}\n\nResults so far:\n{done}\n\nDo this step now: {step}"
ANSWER_PROMPT = "Task: {task}\n\nResults of the plan's steps:\n{done}\n\nWrite the final answer to the task."


def parse_plan(text: str, limit: int) -> list[str]:
    """Numbered or bulleted lines → steps (plain lines when nothing is numbered)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    marked = [re.sub(r"^(?:\d+[.)、:]|[-*•]|step\s*\d+[.:)]?)\s*", "", ln, flags=re.I) for ln in lines
              if re.match(r"^(?:\d+[.)、:]|[-*•]|step\s*\d+)", ln, flags=re.I)]
    return [s for s in (marked or lines) if s][:limit]


class PlanAndExecute:
    def __init__(self, backend: ChatBackend, executor: Any, max_plan_steps: int = 5) -> None:
        if max_plan_steps < 1:
            raise ValueError(f"max_plan_steps={max_plan_steps} must be >= 1")
        self.backend, self.executor, self.max_plan_steps = backend, executor, max_plan_steps

    def run(self, task: str, on_step: Callable[[Step], None] | None = None,
            on_text: Callable[[str], None] | None = None) -> Trace:
        trace = Trace(on_step=on_step)
        trace.add("task", task)
        reply = self.backend.chat([{"role": "user", "content": PLAN_PROMPT.format(n=self.max_plan_steps, task=task)}],
                                  max_tokens=256, on_text=on_text)
        plan = parse_plan(reply.content or "", self.max_plan_steps) or [task]
        trace.add("plan", "\n".join(f"{i}. {s}" for i, s in enumerate(plan, 1)))
        done: list[str] = []
        for i, step in enumerate(plan, 1):
            sub = self.executor.run(STEP_PROMPT.format(task=task, done="\n".join(done) or "(none)", step=step),
                                    on_text=on_text)
            for s in sub.steps[1:]:  # the sub-task line is the prompt; the rest is the work
                if s.kind in ("thought", "action", "observation", "error"):
                    trace.steps.append(s)
                    if on_step is not None:
                        on_step(s)
            done.append(f"{i}. {step} -> {sub.answer if sub.answer is not None else '(no result: ' + sub.stopped + ')'}")
        final = self.backend.chat([{"role": "user", "content": ANSWER_PROMPT.format(task=task, done="\n".join(done))}],
                                  max_tokens=512, on_text=on_text)
        return trace.finish((final.content or "").strip(), "answer")
