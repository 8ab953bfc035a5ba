"""The trace of an agent run: every thought, tool call, observation and answer, in order (notes ch.08 ReAct:
"Thought / Action / Observation"). A `Trace` streams each step to its `on_step` callback as it happens (the CLI
prints them), renders as text (`str(trace)`) and saves as JSON through `tinyllm.atomic`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tinyllm.atomic import atomic_write_json

Kind = Literal["task", "plan", "thought", "action", "observation", "error", "answer", "stop"]


@dataclass
class Step:
    kind: Kind
    text: str
    tool: str | None = None
    arguments: str | None = None
    ok: bool = True
    t: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        label = {"task": "Task", "plan": "Plan", "thought": "Thought", "action": "Action",
                 "observation": "Observation", "error": "Error", "answer": "Final Answer", "stop": "Stopped"}
        if self.kind == "action":
            return f"Action: {self.tool}({self.arguments})"
        return f"{label[self.kind]}: {self.text}"


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stopped: str = ""  # "answer" | "max_steps" | "error"
    on_step: Callable[[Step], None] | None = field(default=None, repr=False, compare=False)

    def add(self, kind: Kind, text: str, **kw: Any) -> Step:
        step = Step(kind, text, **kw)
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return step

    def finish(self, answer: str | None, stopped: str) -> Trace:
        self.answer, self.stopped = answer, stopped
        if answer is not None:
            self.add("answer", answer)
        else:
            self.add("stop", stopped)
        return self

    @property
    def tool_calls(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "action"]

    def __str__(self) -> str:
        return "\n".join(s.line() for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        t0 = self.steps[0].t if self.steps else 0.0
        steps = [{**asdict(s), "t": round(s.t - t0, 3)} for s in self.steps]
        return {"answer": self.answer, "stopped": self.stopped, "steps": steps}

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())
