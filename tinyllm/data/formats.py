"""Instruction-data formats → one `Conversation` type (notes ch.03 数据格式).

Three on-disk shapes are common for SFT data; all become a list of `Message(role, content)`:

- Alpaca:   {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional),
             "history": [[user, assistant], ...] (optional)}  → [system?] + history turns + user + assistant,
             where the user turn is the instruction, followed by a blank line and the input when there is one.
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}, ...], "system": ...}.
- OpenAI messages: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}.

`to_conversation(record)` detects the format; `read_conversations(path)` reads .json (a list) or .jsonl.
Validation names the record and the problem (unknown role, empty conversation, no assistant turn).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}


class FormatError(ValueError):
    """A record does not match any supported format; the message names the record and the field."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise FormatError(f"role={self.role!r} is not one of {list(ROLES)}")

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def as_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]

    def validate(self, where: str = "conversation") -> Conversation:
        if not self.messages:
            raise FormatError(f"{where}: no messages")
        if not any(m.role == "assistant" for m in self.messages):
            raise FormatError(f"{where}: no assistant message to learn from")
        return self


def from_alpaca(rec: dict[str, Any]) -> Conversation:
    msgs: list[Message] = []
    if rec.get("system"):
        msgs.append(Message("system", str(rec["system"])))
    for turn in rec.get("history") or []:
        if len(turn) != 2:
            raise FormatError(f"alpaca history turn {turn!r} is not a [user, assistant] pair")
        msgs += [Message("user", str(turn[0])), Message("assistant", str(turn[1]))]
    instruction, inp = str(rec.get("instruction", "")), str(rec.get("input") or "")
    user = f"{instruction}\n\n{inp}" if instruction and inp else instruction or inp
    msgs += [Message("user", user), Message("assistant", str(rec.get("output", "")))]
    return Conversation(msgs)


def from_sharegpt(rec: dict[str, Any]) -> Conversation:
    msgs: list[Message] = []
    if rec.get("system"):
        msgs.append(Message("system", str(rec["system"])))
    for turn in rec["conversations"]:
        who = str(turn.get("from", turn.get("role", ""))).lower()
        if who not in _SHAREGPT_ROLES:
            raise FormatError(f"sharegpt speaker {who!r} is not one of {sorted(_SHAREGPT_ROLES)}")
        msgs.append(Message(_SHAREGPT_ROLES[who], str(turn.get("value", turn.get("content", "")))))
    return Conversation(msgs)


def from_messages(rec: dict[str, Any]) -> Conversation:
    return Conversation([Message(str(m["role"]), str(m.get("content") or "")) for m in rec["messages"]])


def to_conversation(rec: dict[str, Any], where: str = "record") -> Conversation:
    """Detect the format of one record and convert it."""
    if not isinstance(rec, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    try:
        if "messages" in rec:
            conv = from_messages(rec)
        elif "conversations" in rec:
            conv = from_sharegpt(rec)
        elif "instruction" in rec or "output" in rec:
            conv = from_alpaca(rec)
        else:
            raise FormatError(f"fields {sorted(rec)} match no format (alpaca: instruction/output; "
                              "sharegpt: conversations; openai: messages)")
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{where}: malformed record ({e!r})") from None
    return conv.validate(where)


def read_conversations(path: str | Path) -> Iterator[Conversation]:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FormatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                    yield to_conversation(rec, f"{path}:{n}")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise FormatError(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(data):
            yield to_conversation(rec, f"{path}[{i}]")
    else:
        raise FormatError(f"{path}: unsupported file type {path.suffix!r} (.json or .jsonl)")
