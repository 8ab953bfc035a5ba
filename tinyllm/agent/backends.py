"""Chat backends the agent loops drive (notes ch.08 agents, ch.10 LangChain "LLM wrappers"): one call,
`chat(messages, tools=..., ...) -> ChatReply(content, tool_calls)`, two implementations.

- `OpenAIChat(base_url, model)`: any OpenAI-compatible endpoint -- our server, vLLM, OpenAI -- through the
  official `openai` client. With `on_text` it streams and assembles tool-call deltas the way the client
  documents (`index` → id, name, argument fragments).
- `LocalChat(model)`: a local checkpoint through `tinyllm.LLM`, rendered and parsed with the server's own code
  (`serve.chat_format.render_chat_tools`, `serve.tool_calls`), so a local run and a run through our server
  see the same prompt and read the reply the same way (the server test checks that).

Both take `stop` (ReAct stops at "Observation:") and `max_tokens`, and decode greedily unless given a
temperature. Not covered: retries and rate limits (the `openai` client's own), vision content.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ChatReply:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI shape: id, type, function{name, arguments}

    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class ChatBackend(Protocol):
    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, stop: list[str] | None = None,
             max_tokens: int | None = None, on_text: Callable[[str], None] | None = None) -> ChatReply: ...


class OpenAIChat:
    def __init__(self, base_url: str, model: str | None = None, api_key: str = "none",
                 temperature: float = 0.0, timeout: float = 600.0) -> None:
        try:
            import openai
        except ImportError as e:
            raise ImportError("OpenAIChat needs the openai package: pip install openai") from e
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=1)
        self.base_url, self._api_error = base_url, openai.APIError
        self.temperature = temperature
        self.model = model or self._first_model()

    @contextlib.contextmanager
    def _endpoint(self) -> Iterator[None]:
        """The client's errors (refused connection, 5xx, a body that is not the API's JSON) as one
        EndpointError naming the URL, so a dead server is a user's error and not a traceback."""
        from tinyllm.rag.pipeline import EndpointError

        try:
            yield
        except self._api_error as e:
            raise EndpointError(f"{self.base_url}: {type(e).__name__}: {e}") from e

    def _first_model(self) -> str:
        with self._endpoint():
            models = self.client.models.list().data
        if not models:
            raise ValueError("the endpoint serves no models; pass model=...")
        return models[0].id

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, stop: list[str] | None = None,
             max_tokens: int | None = None, on_text: Callable[[str], None] | None = None) -> ChatReply:
        kw: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if tools:
            kw["tools"] = tools
            if tool_choice is not None:
                kw["tool_choice"] = tool_choice
        if stop:
            kw["stop"] = stop
        if max_tokens is not None:
            kw["max_tokens"] = max_tokens
        with self._endpoint():
            return self._chat(kw, on_text)

    def _chat(self, kw: dict[str, Any], on_text: Callable[[str], None] | None) -> ChatReply:
        if on_text is None:
            msg = self.client.chat.completions.create(**kw).choices[0].message
            calls = [c.model_dump() for c in (msg.tool_calls or [])]
            return ChatReply(msg.content, calls)
        text, calls = [], {}  # type: ignore[var-annotated]
        for chunk in self.client.chat.completions.create(stream=True, **kw):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta.content:
                text.append(delta.content)
                on_text(delta.content)
            for tc in delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.id or slot["id"]
                if tc.function is not None:
                    slot["function"]["name"] += tc.function.name or ""
                    slot["function"]["arguments"] += tc.function.arguments or ""
        content = "".join(text)
        return ChatReply(content or None, [calls[i] for i in sorted(calls)])


class LocalChat:
    def __init__(self, model: Any, temperature: float = 0.0, tool_prompt: str = "hermes",
                 max_tokens: int = 512, **llm_kwargs: Any) -> None:
        from tinyllm.infer.engine import LLM

        self.llm = model if isinstance(model, LLM) else LLM(model, **llm_kwargs)
        self.temperature = temperature
        self.tool_prompt = tool_prompt
        self.max_tokens = max_tokens

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, stop: list[str] | None = None,
             max_tokens: int | None = None, on_text: Callable[[str], None] | None = None) -> ChatReply:
        from tinyllm.infer.sampling_params import SamplingParams
        from tinyllm.serve.chat_format import render_chat_tools
        from tinyllm.serve.tool_calls import parse_tool_calls

        rendered = render_chat_tools(self.llm.get_tokenizer(), messages, tools, tool_choice, self.tool_prompt)
        room = self.llm.engine.max_model_len - len(rendered.ids)
        if room <= 0:
            raise ValueError(f"the conversation ({len(rendered.ids)} tokens) fills the model's context "
                             f"({self.llm.engine.max_model_len}); use a summary memory or fewer steps")
        params = SamplingParams(temperature=self.temperature, max_tokens=min(max_tokens or self.max_tokens, room),
                                stop=stop or None)
        text = self.llm.generate([rendered.ids], params, use_tqdm=False)[0].outputs[0].text
        if on_text is not None:
            on_text(text)
        if not rendered.tools_active:
            return ChatReply(text, [])
        content, calls = parse_tool_calls(rendered.prefill + text, rendered.fmt)
        return ChatReply(content if calls else text, calls)


def make_backend(model: str | None = None, base_url: str | None = None, api_key: str = "none",
                 temperature: float = 0.0) -> ChatBackend:
    if bool(model) == bool(base_url):
        raise ValueError("give exactly one of --model (a local checkpoint) or --base-url (an OpenAI-compatible "
                         f"endpoint); got model={model!r}, base_url={base_url!r}")
    if base_url:
        return OpenAIChat(base_url, api_key=api_key, temperature=temperature)
    return LocalChat(model, temperature=temperature)


def arguments_text(call: dict[str, Any]) -> str:
    args = (call.get("function") or {}).get("arguments", "")
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
