"""Conversation memory for multi-turn agents (notes ch.08 "memory": short-term buffer, summarised long-term;
ch.10 LangChain ConversationBufferWindowMemory / ConversationSummaryMemory).

- `BufferMemory(max_messages)`: the last `max_messages` messages verbatim (a window; None keeps all). The
  window never starts inside a tool exchange: an assistant tool call and its tool results leave together.
- `SummaryMemory(backend, max_messages)`: when the buffer outgrows `max_messages`, the oldest half is
  folded into a running summary by one model call ("Summarise ... keep names, numbers and decisions"); the
  summary rides along as a system message.

`messages()` is what goes in front of the next user turn; `add(message)` records one.
"""

from __future__ import annotations

from typing import Any

SUMMARY_PROMPT = ("Summarise the conversation so far in a few sentences for your own memory. Keep names, "
                  "numbers, results and decisions; drop small talk.\n\nPrevious summary: {summary}\n\n"
                  "New messages:\n{messages}")


def _cut(messages: list[dict[str, Any]], keep: int) -> int:
    """Index where the kept tail starts: at most `keep` messages, never starting at a tool result."""
    start = max(0, len(messages) - keep)
    while start < len(messages) and messages[start].get("role") == "tool":
        start += 1
    return start


class BufferMemory:
    def __init__(self, max_messages: int | None = None) -> None:
        if max_messages is not None and max_messages < 1:
            raise ValueError(f"max_messages={max_messages} must be >= 1 or None")
        self.max_messages = max_messages
        self.buffer: list[dict[str, Any]] = []

    keep_on_overflow: float = 1.0  # fraction of max_messages kept when the buffer overflows

    def add(self, message: dict[str, Any]) -> None:
        self.buffer.append(message)
        if self.max_messages is not None and len(self.buffer) > self.max_messages:
            cut = _cut(self.buffer, max(1, int(self.max_messages * self.keep_on_overflow)))
            self._evict(self.buffer[:cut])
            self.buffer = self.buffer[cut:]

    def _evict(self, old: list[dict[str, Any]]) -> None:
        pass  # a window forgets

    def messages(self) -> list[dict[str, Any]]:
        return list(self.buffer)


class SummaryMemory(BufferMemory):
    keep_on_overflow = 0.5  # summarise half the buffer at a time: one model call per max_messages / 2 turns

    def __init__(self, backend: Any, max_messages: int = 8) -> None:
        super().__init__(max_messages)
        self.backend = backend
        self.summary = ""

    def _evict(self, old: list[dict[str, Any]]) -> None:
        if not old:
            return
        lines = "\n".join(f"{m.get('role')}: {m.get('content') or m.get('tool_calls')}" for m in old)
        prompt = SUMMARY_PROMPT.format(summary=self.summary or "(none)", messages=lines)
        reply = self.backend.chat([{"role": "user", "content": prompt}], max_tokens=256)
        self.summary = (reply.content or "").strip() or self.summary

    def messages(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": f"Summary of the earlier conversation: {self.summary}"}] \
            if self.summary else []
        return head + list(self.buffer)
