"""Tool calls in model text, both ways (notes ch.08 function calling; the conventions of Hugging Face chat
templates: Hermes/Qwen `<tool_call>{json}</tool_call>`, Mistral `[TOOL_CALLS][{json}, ...]`, Llama-3.1 bare
`{"name": ..., "parameters": ...}` JSON).

- `detect_format(template)`: which convention a chat template speaks (Hermes unless it names another).
- `parse_tool_calls(text, fmt)`: (content or None, OpenAI `tool_calls`) of a whole reply. Blocks that are not
  valid JSON calls stay content; a reply that is exactly one JSON call object (or a list of them) is a call in
  every format, since small models often drop the tags.
- `ToolCallStreamer`: the same parse, incrementally: `feed(delta)` returns the content that is certainly not
  part of a call (text that could still be the start of `<tool_call>` is held back) and each call as soon as
  its block closes; `finish()` flushes. Concatenated, its output equals `parse_tool_calls` (tested on random
  splits).
- `prefill(fmt, tool_choice)`: how `tool_choice` is honoured without constrained decoding: "required" and a
  named function start the assistant reply with the call opener (`<tool_call>\n`), so the model can only
  complete a call (or break the JSON, which then comes back as content); a named choice also shows only
  that tool, and calls of any other name are dropped. "none" hides the tools; "auto" leaves the choice to
  the model.
- `hermes_messages(messages, tools)`: for templates that never render `tools` (SmolLM2, plain ChatML) when
  the server runs with `tool_prompt="hermes"`: the tool signatures and the calling convention go into the
  system message, earlier assistant `tool_calls` become `<tool_call>` text and `role: tool` results become a
  user turn of `<tool_response>` blocks, the way Qwen's template writes them.

Not covered: streaming a call's arguments token by token (a call arrives whole, when it closes), grammars.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

FORMATS = ("hermes", "mistral", "llama3")
_OPEN = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
_CLOSE = {"hermes": "</tool_call>"}
_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_UNCLOSED_RE = re.compile(r"<tool_call>((?:(?!<tool_call>).)*)$", re.S)


def detect_format(template: str | None) -> str:
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("tools" in t and '"parameters"' in t and "<tool_call>" not in t):
        return "llama3"
    return "hermes"


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict | str):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else
                         json.dumps(args, ensure_ascii=False)}}


def _calls_from_json(text: str) -> list[dict[str, Any]] | None:
    """The calls of a JSON object or list of objects, or None when `text` is not exactly that."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call(o) for o in items]
    if not items or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def parse_tool_calls(text: str, fmt: str = "hermes") -> tuple[str | None, list[dict[str, Any]]]:
    """(remaining content or None, OpenAI tool_calls) of a model reply; unparsable blocks stay content."""
    calls: list[dict[str, Any]] = []
    rest = text
    if fmt == "mistral" and _OPEN["mistral"] in text:
        head, _, tail = text.partition(_OPEN["mistral"])
        parsed = _calls_from_json(tail.strip())
        if parsed:
            calls, rest = parsed, head
    else:
        def take(match: re.Match) -> str:
            parsed = _calls_from_json(match.group(1))
            if parsed is None or len(parsed) != 1:
                return match.group(0)
            calls.extend(parsed)
            return ""

        rest = _HERMES_RE.sub(take, text)
        tail = _UNCLOSED_RE.search(rest)  # a last block the model ended without its closing tag
        if tail:
            parsed = _calls_from_json(tail.group(1).strip())
            if parsed and len(parsed) == 1:
                calls.extend(parsed)
                rest = rest[:tail.start()]
    if not calls and rest.strip()[:1] in ("{", "["):
        parsed = _calls_from_json(rest.strip())
        if parsed:
            calls, rest = parsed, ""
    rest = rest.strip()
    return ((rest or None) if calls else text), calls


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may yet become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallStreamer:
    """Incremental `parse_tool_calls`: feed text deltas, get ("content", str) and ("call", dict) events."""

    def __init__(self, fmt: str = "hermes") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"tool-call format {fmt!r} is not one of {FORMATS}")
        self.fmt = fmt
        self.text = ""  # everything fed
        self.pending = ""  # fed, not yet decided
        self.mode = "start"  # start → text | bare (a reply that may be one JSON call) ; text ↔ call
        self.calls = 0

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        self.text += delta
        self.pending += delta
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        while True:
            if self.mode == "start":
                head = self.pending.lstrip()
                if not head and not final:
                    return events
                self.mode = "bare" if head[:1] in ("{", "[") else "text"
            if self.mode == "bare":
                if not final:
                    return events
                calls = _calls_from_json(self.pending.strip())
                if calls:
                    return events + self._emit_calls(calls)
                self.mode = "text"  # not one JSON call after all: parse it as ordinary text
            if self.mode == "text":
                opener = _OPEN.get(self.fmt, _OPEN["hermes"])
                i = self.pending.find(opener)
                if i < 0:
                    keep = 0 if final else _held_suffix(self.pending, opener)
                    cut = len(self.pending) - keep
                    if cut:
                        events.append(("content", self.pending[:cut]))
                    self.pending = self.pending[cut:]
                    return events
                if i:
                    events.append(("content", self.pending[:i]))
                self.pending = self.pending[i + len(opener):]
                self.mode = "call"
            if self.mode == "call":
                events_call, done = self._take_call(final)
                events += events_call
                if not done:
                    return events

    def _take_call(self, final: bool) -> tuple[list[tuple[str, Any]], bool]:
        opener = _OPEN.get(self.fmt, _OPEN["hermes"])
        if self.fmt == "mistral":  # the rest of the reply is the JSON list
            if not final:
                return [], False
            calls = _calls_from_json(self.pending.strip())
            body, self.pending, self.mode = self.pending, "", "text"
            return (self._emit_calls(calls) if calls else [("content", opener + body)]), True
        closer = _CLOSE["hermes"]
        j = self.pending.find(closer)
        if j < 0 and not final:
            return [], False
        body = self.pending if j < 0 else self.pending[:j]
        self.pending = "" if j < 0 else self.pending[j + len(closer):]
        self.mode = "text"
        calls = _calls_from_json(body.strip())
        if calls and len(calls) == 1:  # closed, or the reply ended inside it with complete JSON
            return self._emit_calls(calls), True
        return [("content", opener + body + ("" if j < 0 else closer))], True

    def _emit_calls(self, calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        self.calls += len(calls)
        return [("call", c) for c in calls]


def _tool_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name")
    return None


def check_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> None:
    """ValueError naming the problem when `tool_choice` is not none/auto/required or a named tool in `tools`."""
    if tool_choice is None:
        return
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice={tool_choice!r} must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice='required' needs a non-empty 'tools'")
        return
    name = _tool_name(tool_choice)
    if not isinstance(name, str):
        raise ValueError(f"tool_choice={tool_choice!r} must name a function: {{'type': 'function', "
                         "'function': {'name': ...}}")
    if not any((t.get("function") or {}).get("name") == name for t in tools or []):
        raise ValueError(f"tool_choice names function {name!r}, which is not in 'tools'")


def prefill(fmt: str, tool_choice: Any) -> str:
    """The start of the assistant reply that makes the model call a tool ("" for auto/none). A named choice
    gets the same opener (the prompt then offers only that tool): prefilling the name too would end the prompt
    mid-JSON, where its tokens split differently from anything the model saw in training."""
    if tool_choice != "required" and _tool_name(tool_choice) is None:
        return ""
    return {"hermes": "<tool_call>\n", "mistral": "[TOOL_CALLS][", "llama3": '{"name": "'}[fmt]


def normalise_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant `tool_calls` with `arguments` parsed from their JSON string into an object, as chat
    templates expect (`{{ tool_call.arguments | tojson }}` would otherwise quote the string again)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    with contextlib.suppress(json.JSONDecodeError):  # else the template shows the string
                        fn["arguments"] = json.loads(fn["arguments"])
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to help with the user's request. The functions are "
    "described by these JSON signatures:\n<tools>\n{tools}\n</tools>\n\nTo call a function, write one JSON "
    "object per call inside <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <arguments-object>}}\n</tool_call>"
)


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation rewritten for a template that cannot show tools (see the module docstring)."""
    out: list[dict[str, Any]] = []
    rest = list(messages)
    if tools:  # no tools: only the earlier calls and results are rewritten
        system = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if rest and rest[0].get("role") == "system":
            system = f"{rest.pop(0).get('content') or ''}\n\n{system}".lstrip()
        out.append({"role": "system", "content": system})
    for m in rest:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                args = fn.get("arguments")
                with contextlib.suppress(json.JSONDecodeError):
                    args = json.loads(args) if isinstance(args, str) else args
                blocks.append("<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args},
                                                           ensure_ascii=False) + "\n</tool_call>")
            text = ((m.get("content") or "") + "\n" + "\n".join(blocks)).strip()
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return [{k: v for k, v in m.items() if k != "_tool_turn"} for m in out]
