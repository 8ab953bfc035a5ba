"""Chat templates (notes ch.02 / ch.05 "SFT data format"; the Jinja convention of Hugging Face chat models).

A chat model is trained on conversations serialised with role markers — ChatML writes
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message. The checkpoint ships that serialisation as a Jinja
template (`chat_template`); `apply_chat_template` renders it the way transformers does: a sandboxed
environment with `trim_blocks`/`lstrip_blocks`, the `raise_exception` helper, a `tojson` filter and the
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` variables. Checkpoints without a template fall
back to plain ChatML.

Not covered: tool / function-call schemas, assistant-token masks for training (`{% generation %}`), multimodal
content parts.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

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
