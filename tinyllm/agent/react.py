"""ReAct in text mode (notes ch.08 "ReAct = Reason + Act"; Yao et al. 2022, arXiv:2210.03629): the model
writes `Thought / Action / Action Input`, the loop runs the tool and appends `Observation`, until the model
writes `Final Answer` or the step budget runs out. It needs no function-calling support from the model or
the endpoint, only text generation with a stop string, so it works with any chat model.

The scratchpad is one growing user message (as LangChain's `create_react_agent` does with a chat model):
instructions and tool list, `Question: ...`, then every earlier step with its observation; generation
stops at "Observation:", so the model cannot invent tool results.

`parse_react(text)` tolerates the noise small models produce: any letter case, markdown bold/headers/list
markers, full-width colons, Chinese labels (思考 / 行动 / 行动输入 / 最终答案), a numbered "Action 1:", the input
inline (`calculator[2+3]`, `calculator(2+3)`, `calculator: 2+3`), the input in a code fence or back-ticks,
a hallucinated "Observation:" and everything after it (dropped), and text with no labels at all (taken as
the answer when `lenient`). An action input that is not a JSON object is given to the tool's single
required parameter. A reply that cannot be read becomes an error observation asking for the format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tinyllm.agent.backends import ChatBackend
from tinyllm.agent.memory import BufferMemory
from tinyllm.agent.tools import Tool, ToolRegistry, ToolResult
from tinyllm.agent.trace import Step, Trace

REACT_PROMPT = """Answer the question as well as you can. You have access to these tools:

{tools}

Use this format:

Question: the question you must answer
Thought: think about what to do next
Action: the tool to use, one of [{names}]
Action Input: the tool's input as a JSON object
Observation: the tool's result
... (Thought / Action / Action Input / Observation can repeat)
Thought: I now know the final answer
Final Answer: the final answer to the question

Begin!

Question: {question}
"""

_LABELS = {
    "thought": r"thought|思考|想法",
    "input": r"action[ _-]?input|行动输入|动作输入|输入",
    "action": r"action|行动|动作|工具",
    "final": r"final[ _-]?answer|最终答案|答案",
    "observation": r"observation|观察|结果",
}
_LABEL_RE = re.compile(
    r"^[ \t>#*\-_]*(?P<label>" + "|".join(f"(?P<{k}>{v})" for k, v in _LABELS.items()) + r")[ \t*_]*\d*[ \t*_]*[:：]",
    re.I | re.M)
_INLINE_RE = re.compile(r"^`?(?P<name>[\w.\-]+)`?\s*(?:\[(?P<sq>.*)\]|\((?P<par>.*)\)|[:\s]\s*(?P<rest>.+))?$",
                        re.S)
_FENCE_RE = re.compile(r"^```[\w-]*\s*(.*?)\s*```$", re.S)


@dataclass
class ReActStep:
    thought: str = ""
    action: str | None = None
    action_input: str | None = None
    final: str | None = None
    error: str | None = None


def _clean(value: str) -> str:
    value = value.strip().strip("*_").strip()
    m = _FENCE_RE.match(value)
    if m:
        value = m.group(1)
    if len(value) >= 2 and value[0] == value[-1] == "`":
        value = value.strip("`")
    return value.strip()


def parse_react(text: str, lenient: bool = True) -> ReActStep:
    """One ReAct turn of model text → thought, action + input, or final answer (or an error)."""
    fields: dict[str, str] = {}
    marks = [(m.start(), m.end(), next(k for k in _LABELS if m.group(k))) for m in _LABEL_RE.finditer(text)]
    for i, (_, end, kind) in enumerate(marks):
        if kind == "observation":
            break  # the model made up an observation: nothing after it is its own
        nxt = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        if kind in fields:
            if kind == "final" or "action" in fields or "final" in fields:
                break  # a second action or answer: the first one stands
            continue
        fields[kind] = _clean(text[end:nxt])
    step = ReActStep(thought=fields.get("thought", ""))
    if not marks:
        if lenient and text.strip():
            step.final = _clean(text)
            return step
        step.error = "no Thought/Action/Final Answer found"
        return step
    kinds = [k for _, _, k in marks]
    action_first = "action" in fields and ("final" not in fields or kinds.index("action") < kinds.index("final"))
    if action_first:
        m = _INLINE_RE.match(fields["action"].splitlines()[0].strip() if fields["action"] else "")
        if not m:
            step.error = f"cannot read the tool name from Action: {fields['action'][:80]!r}"
            return step
        step.action = m.group("name")
        inline = m.group("sq") or m.group("par") or m.group("rest")
        step.action_input = fields.get("input", inline if inline is not None else "")
        return step
    if "final" in fields:
        step.final = fields["final"]
        return step
    if "input" in fields:
        step.error = "Action Input without an Action"
    else:
        step.error = "no Action or Final Answer after the Thought"
    return step


def _find_tool(tools: ToolRegistry, name: str) -> Tool | None:
    if name in tools:
        return tools.tools[name]
    lowered = {n.lower(): t for n, t in tools.tools.items()}
    return lowered.get(name.lower().strip("`'\"."))


def tool_arguments(tool: Tool, raw: str) -> str | dict[str, Any]:
    """The tool's arguments from an Action Input: a JSON object as is, anything else to the single
    required parameter (a JSON string is unquoted first)."""
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, dict):
        return value
    required = tool.parameters.get("required", [])
    props = tool.parameters.get("properties", {})
    names = required if len(required) == 1 else list(props)[:1] if len(props) == 1 else []
    if not names:
        return raw  # let validation explain what the tool expects
    kind = props.get(names[0], {}).get("type")
    if kind == "string" and not isinstance(value, str):
        value = raw
    return {names[0]: value}


def format_tools(tools: ToolRegistry) -> str:
    lines = []
    for t in tools.tools.values():
        params = ", ".join(f"{n}: {p.get('type', 'any')}" for n, p in t.parameters.get("properties", {}).items())
        lines.append(f"{t.name}({params}): {t.description}")
    return "\n".join(lines)


class ReActAgent:
    def __init__(self, backend: ChatBackend, tools: ToolRegistry, *, max_steps: int = 8,
                 memory: BufferMemory | None = None, max_tokens: int = 256, lenient: bool = True,
                 prompt: str = REACT_PROMPT) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        self.backend, self.tools, self.max_steps = backend, tools, max_steps
        self.memory, self.max_tokens, self.lenient, self.prompt = memory, max_tokens, lenient, prompt

    def run(self, task: str, on_step: Callable[[Step], None] | None = None,
            on_text: Callable[[str], None] | None = None) -> Trace:
        trace = Trace(on_step=on_step)
        trace.add("task", task)
        pad = self.prompt.format(tools=format_tools(self.tools), names=", ".join(self.tools.names), question=task)
        history = self.memory.messages() if self.memory else []
        for _ in range(self.max_steps):
            reply = self.backend.chat([*history, {"role": "user", "content": pad}], stop=["\nObservation:",
                                      "Observation:"], max_tokens=self.max_tokens, on_text=on_text)
            text = reply.content or ""
            step = parse_react(text, self.lenient)
            if step.thought:
                trace.add("thought", step.thought)
            if step.final is not None:
                if self.memory is not None:
                    self.memory.add({"role": "user", "content": task})
                    self.memory.add({"role": "assistant", "content": step.final})
                return trace.finish(step.final, "answer")
            if step.error is not None:
                result = ToolResult(False, f"error: could not read your reply ({step.error}). Write 'Action: "
                                           "<tool>' and 'Action Input: <JSON>', or 'Final Answer: <answer>'.")
                trace.add("error", result.content, ok=False)
            else:
                assert step.action is not None
                tool = _find_tool(self.tools, step.action)
                args = tool_arguments(tool, step.action_input or "") if tool else step.action_input or ""
                shown = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                trace.add("action", "", tool=step.action, arguments=shown)
                result = tool(args) if tool else self.tools.call(step.action, args)
                trace.add("observation", result.content, tool=step.action, ok=result.ok)
            pad = f"{pad}{text.rstrip()}\nObservation: {result.content}\n"
        return trace.finish(None, "max_steps")
