"""From OpenAI chat messages to prompt tokens and back to tool calls (notes ch.06.4 serving, ch.08 function
calling / agents; the Hermes/Qwen `<tool_call>` convention of Hugging Face chat templates).

`render_chat` normalises OpenAI messages (content parts joined, `None` content → ""), renders them with the
checkpoint's Jinja chat template (`tinyllm.tokenizer.apply_chat_template`, generation prompt added) and encodes
the text with every special token allowed, so `<|im_start|>` stays one token. Tools are passed to the template
as its `tools` variable -- only a template that mentions `tools` can show them to the model; any other gets a
clear error instead of silently ignoring them.

`parse_tool_calls` reads the model's reply back: every `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
block (or a reply that is exactly such a JSON object) becomes an OpenAI `tool_calls` entry with the arguments
serialised as a JSON string; the text outside the blocks stays the message content.

Not covered: other tool-call syntaxes (Llama-3 `<|python_tag|>`, Mistral `[TOOL_CALLS]`), streaming tool-call
argument deltas (a tools request streams its parsed result at the end), grammar-constrained `tool_choice`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from tinyllm.tokenizer import apply_chat_template

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class ChatFormatError(ValueError):
    """A chat request the model's template cannot express; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _content(content: str | list[dict[str, Any]] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ChatFormatError(f"messages[{i}].content part of type {part.get('type')!r} is not supported "
                                  "(text only)", f"messages[{i}].content")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                tool_choice: str | dict[str, Any] | None = None) -> tuple[str, list[int]]:
    """(rendered text, prompt token ids) of an OpenAI conversation under the tokenizer's chat template."""
    msgs = []
    for i, m in enumerate(messages):
        msg = {k: v for k, v in m.items() if v is not None}
        msg["content"] = _content(m.get("content"), i)
        msgs.append(msg)
    template = getattr(tokenizer, "chat_template", None)
    variables: dict[str, Any] = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    if tools and tool_choice != "none":
        if not supports_tools(template):
            raise ChatFormatError("this model's chat template does not support tools (it never renders a "
                                  "'tools' variable); send the request without 'tools'", "tools")
        if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}}: offer only that one
            name = (tool_choice.get("function") or {}).get("name")
            chosen = [t for t in tools if (t.get("function") or {}).get("name") == name]
            if not chosen:
                raise ChatFormatError(f"tool_choice names function {name!r}, which is not in 'tools'", "tool_choice")
            tools = chosen
        variables["tools"] = tools
    try:
        text = apply_chat_template(msgs, template, add_generation_prompt=True, **variables)
    except ValueError as e:
        raise ChatFormatError(str(e), "messages") from None
    except Exception as e:  # jinja2's TemplateError from raise_exception in the template
        raise ChatFormatError(f"the chat template rejected the conversation: {e}", "messages") from None
    return text, tokenizer.encode(text, allowed_special="all")


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(remaining content or None, OpenAI tool_calls) of a model reply; unparsable blocks stay content."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match) -> str:
        try:
            call = _call(json.loads(match.group(1)))
        except json.JSONDecodeError:
            call = None
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    rest = TOOL_CALL_RE.sub(take, text)
    if not calls and rest.strip().startswith("{"):
        try:
            call = _call(json.loads(rest))
        except json.JSONDecodeError:
            call = None
        if call is not None:
            calls, rest = [call], ""
    rest = rest.strip()
    return (rest or None) if calls else text, calls
