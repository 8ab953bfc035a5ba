"""The function-calling agent loop (notes ch.08 "tool use" with OpenAI `tools`; ch.10 LangChain agents):

    messages = memory + [user task]
    repeat up to max_steps:
        reply = model(messages, tools)                 # one chat call
        if reply has no tool_calls: answer = reply     # stop on answer
        else for each call: observation = registry.call(name, arguments)   # never raises
             messages += [assistant(tool_calls), tool(observation) ...]

A tool's failure (unknown name, bad JSON, wrong argument, a sandbox timeout) comes back to the model as the
observation, so it can retry; running out of steps stops with `trace.stopped == "max_steps"`. The backend is
any `ChatBackend` -- our server or another OpenAI-compatible endpoint (`OpenAIChat`), or a local model
(`LocalChat`). With a memory, the task and the answer (not the intermediate tool traffic) are remembered for
the next `run`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinyllm.agent.backends import ChatBackend, arguments_text
from tinyllm.agent.memory import BufferMemory
from tinyllm.agent.tools import ToolRegistry
from tinyllm.agent.trace import Step, Trace


class FunctionCallingAgent:
    def __init__(self, backend: ChatBackend, tools: ToolRegistry, *, max_steps: int = 8,
                 system: str | None = None, memory: BufferMemory | None = None, max_tokens: int | None = None,
                 tool_choice: str | dict[str, Any] | None = None) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        self.backend, self.tools, self.max_steps = backend, tools, max_steps
        self.system, self.memory, self.max_tokens = system, memory, max_tokens
        self.tool_choice = tool_choice  # for the first step only; later steps are "auto" so the model can answer

    def run(self, task: str, on_step: Callable[[Step], None] | None = None,
            on_text: Callable[[str], None] | None = None) -> Trace:
        trace = Trace(on_step=on_step)
        trace.add("task", task)
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        messages += self.memory.messages() if self.memory else []
        messages.append({"role": "user", "content": task})
        schemas = self.tools.schemas()
        for step in range(self.max_steps):
            reply = self.backend.chat(messages, tools=schemas or None,
                                      tool_choice=self.tool_choice if step == 0 else None,
                                      max_tokens=self.max_tokens, on_text=on_text)
            if not reply.tool_calls:
                answer = (reply.content or "").strip()
                self._remember(task, answer)
                return trace.finish(answer, "answer")
            if reply.content and reply.content.strip():
                trace.add("thought", reply.content.strip())
            messages.append(reply.message())
            for call in reply.tool_calls:
                name = (call.get("function") or {}).get("name", "")
                args = arguments_text(call)
                trace.add("action", "", tool=name, arguments=args)
                result = self.tools.call(name, args)
                trace.add("observation", result.content, tool=name, ok=result.ok)
                messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "name": name,
                                 "content": result.content})
        return trace.finish(None, "max_steps")

    def _remember(self, task: str, answer: str) -> None:
        if self.memory is not None:
            self.memory.add({"role": "user", "content": task})
            self.memory.add({"role": "assistant", "content": answer})
