"""Chat templates (notes ch.02 / ch.05 "SFT data format"; the Jinja convention of Hugging Face chat models).

A chat model is trained on conversations serialised with role markers — ChatML writes
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message. The checkpoint ships that serialisation as a Jinja
template (`chat_template`); `apply_chat_template` renders it the way transformers does: a sandboxed
environment with `trim_blocks`/`lstrip_blocks`, the `raise_exception` helper, a `tojson` filter and the
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` variables. Checkpoints without a template fall
back to plain ChatML.

Assistant-only loss masks (`chat_segments`, `encode_chat`): render the conversation incrementally -- for the
assistant message i, render(messages[:i], add_generation_prompt=True) is the prompt and render(messages[:i+1])
the prompt plus the reply, so the difference is what the model must learn to produce. Each segment is encoded
separately (special tokens allowed), so a mask boundary never splits a token. `encode_chat` learns the reply up
to and including the template's last special token in it (`<|im_end|>`); what the template writes after it
(ChatML's "\n") is never generated, so it is not learned.

Not covered: tool / function-call schemas, transformers' `{% generation %}` markers (the incremental rendering
needs none), multimodal content parts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinyllm.tokenizer.interface import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def apply_chat_template(messages: list[dict[str, Any]], template: str | None = None,
                        add_generation_prompt: bool = True, **variables: Any) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's Jinja template
    (ChatML when None). Extra keyword arguments (bos_token, eos_token, ...) become template variables."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]={m!r} must be a dict with 'role' and 'content'")
    return _compile(template or CHATML_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables)


Render = Callable[[list[dict[str, Any]], bool], str]


class ChatTemplateError(ValueError):
    """The chat template does not render conversations as growing prefixes, so spans cannot be found."""


def chat_segments(messages: list[dict[str, Any]], render: Render,
                  add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, learned?) segments; render(messages, add_generation_prompt)."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ChatTemplateError(f"the chat template does not render message {i} as an extension of the "
                                    "previous ones; assistant-only labels need a prefix-stable template")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    final = render(messages, add_generation_prompt)
    if not final.startswith(done):
        raise ChatTemplateError("the chat template renders the whole conversation differently from its prefixes")
    out.append((final[len(done):], False))
    return [(t, learn) for t, learn in out if t]


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], template: str | None = None,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation and its loss mask (1 on assistant reply tokens and their end-of-turn
    special token, 0 elsewhere). Template: `template`, else the tokenizer's, else ChatML."""
    template = template or tokenizer.chat_template

    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        return apply_chat_template(msgs, template, add_generation_prompt=gen, bos_token=tokenizer.bos_token or "",
                                   eos_token=tokenizer.eos_token or "")

    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    ids: list[int] = []
    mask: list[int] = []
    for text, learn in chat_segments(messages, render, add_generation_prompt):
        pieces = [(text, learn)]
        if learn:  # learn up to the last special token; the template's separator after it is not generated
            end = max((text.rfind(s) + len(s) for s in specials if s in text), default=len(text))
            pieces = [(text[:end], True), (text[end:], False)]
        for piece, flag in pieces:
            piece_ids = tokenizer.encode(piece, allowed_special="all")
            ids += piece_ids
            mask += [int(flag)] * len(piece_ids)
    return ids, mask
