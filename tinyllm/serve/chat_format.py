"""From OpenAI chat messages to prompt tokens and back to tool calls (notes ch.06.4 serving, ch.08 function
calling / agents; the Hermes/Qwen `<tool_call>` convention of Hugging Face chat templates).

`render_chat` normalises OpenAI messages (content parts joined, `None` content → ""), renders them with the
checkpoint's Jinja chat template (`tinyllm.tokenizer.apply_chat_template`, generation prompt added) and encodes
the text with every special token allowed, so `<|im_start|>` stays one token. Tools are passed to the template
as its `tools` variable -- only a template that mentions `tools` can show them to the model; any other gets a
clear error instead of silently ignoring them.

`render_chat_tools` adds what a tools request needs (`tool_calls.py`): the template's tool-call convention,
`tool_choice` checked and honoured (required / named by prefilling the start of a call), assistant
`tool_calls` arguments turned back into objects for the template, and for templates that cannot show tools
either a clear error or (`tool_prompt="hermes"`) the tools written into the system message.
`parse_tool_calls` reads the model's reply back into OpenAI `tool_calls` (see `tool_calls.py`).

Not covered: grammar-constrained decoding of the arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tinyllm.serve import tool_calls as tc
from tinyllm.tokenizer import apply_chat_template


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


@dataclass
class RenderedChat:
    text: str  # the prompt, including any prefill that starts the assistant's reply
    ids: list[int]
    tools_active: bool  # tools were shown to the model: parse its reply for calls
    fmt: str  # the tool-call convention to parse (tool_calls.FORMATS)
    prefill: str  # the start of the reply already written into the prompt (tool_choice required / named)
    only: str | None = None  # tool_choice named this function: calls of any other are dropped


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                tool_choice: str | dict[str, Any] | None = None) -> tuple[str, list[int]]:
    """(rendered text, prompt token ids) of an OpenAI conversation under the tokenizer's chat template."""
    r = render_chat_tools(tokenizer, messages, tools, tool_choice)
    return r.text, r.ids


def render_chat_tools(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                      tool_choice: str | dict[str, Any] | None = None,
                      tool_prompt: str = "template") -> RenderedChat:
    """Render a conversation with tools. `tool_prompt="template"` refuses tools the template cannot show;
    "hermes" then writes them into the system message instead (`tool_calls.hermes_messages`)."""
    if tool_prompt not in ("template", "hermes"):
        raise ValueError(f"tool_prompt={tool_prompt!r} must be 'template' or 'hermes'")
    try:
        tc.check_tool_choice(tool_choice, tools)
    except ValueError as e:
        raise ChatFormatError(str(e), "tool_choice") from None
    msgs = []
    for i, m in enumerate(messages):
        msg = {k: v for k, v in m.items() if v is not None}
        msg["content"] = _content(m.get("content"), i)
        msgs.append(msg)
    msgs = tc.normalise_tool_messages(msgs)
    template = getattr(tokenizer, "chat_template", None)
    variables: dict[str, Any] = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    active = bool(tools) and tool_choice != "none"
    fmt = tc.detect_format(template)
    if active:
        assert tools is not None
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
        if name is not None:  # a named function: offer only that one
            tools = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if supports_tools(template):
            variables["tools"] = tools
        elif tool_prompt == "hermes":
            msgs, fmt = tc.hermes_messages(msgs, tools), "hermes"
        else:
            raise ChatFormatError("this model's chat template does not support tools (it never renders a "
                                  "'tools' variable); send the request without 'tools', or start the server "
                                  "with --tool-prompt hermes", "tools")
    elif tool_prompt == "hermes" and not supports_tools(template) and any(
            m.get("role") == "tool" or m.get("tool_calls") for m in msgs):
        msgs = tc.hermes_messages(msgs, [])  # earlier calls and results, written the same way
    try:
        text = apply_chat_template(msgs, template, add_generation_prompt=True, **variables)
    except ValueError as e:
        raise ChatFormatError(str(e), "messages") from None
    except Exception as e:  # jinja2's TemplateError from raise_exception in the template
        raise ChatFormatError(f"the chat template rejected the conversation: {e}", "messages") from None
    pre = tc.prefill(fmt, tool_choice) if active else ""
    text += pre
    only = (tool_choice.get("function") or {}).get("name") if active and isinstance(tool_choice, dict) else None
    return RenderedChat(text, tokenizer.encode(text, allowed_special="all"), active, fmt, pre, only)


def parse_tool_calls(text: str, fmt: str = "hermes") -> tuple[str | None, list[dict[str, Any]]]:
    """(remaining content or None, OpenAI tool_calls) of a model reply; see `tool_calls.parse_tool_calls`."""
    return tc.parse_tool_calls(text, fmt)
