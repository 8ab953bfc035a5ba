"""What every request handler of the server shares: the engine loop, the tokenizer, names, limits and metrics
(notes ch.06.4 serving). Admission control lives here: a request is refused with 429 when the requests in flight
would exceed the running batch (`max_num_seqs`) plus `max_queue` waiting ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinyllm.infer.engine import LLMEngine
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.serve.async_engine import AsyncEngine, RequestStream
from tinyllm.serve.embeddings import Embedder
from tinyllm.serve.errors import APIError
from tinyllm.serve.metrics import Metrics


@dataclass
class ServerState:
    engine: LLMEngine
    model_name: str
    api_key: str | None = None
    max_queue: int = 256
    embedder: Embedder | None = None
    metrics: Metrics = field(default_factory=Metrics)
    stall_timeout: float = 300.0  # seconds one engine step may take before the loop counts as stalled
    tool_prompt: str = "template"  # "hermes": show tools in the system message when the template cannot
    loop: AsyncEngine = field(init=False)

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue} must be >= 0")
        if self.tool_prompt not in ("template", "hermes"):
            raise ValueError(f"tool_prompt={self.tool_prompt!r} must be 'template' or 'hermes'")
        if self.engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer")
        self.loop = AsyncEngine(self.engine, self.metrics, stall_timeout=self.stall_timeout)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def capacity(self) -> int:
        return self.engine.scheduler.max_num_seqs + self.max_queue

    def check_model(self, name: str, embedding: bool = False) -> None:
        names = {self.model_name}
        if embedding and self.embedder is not None:
            names = {self.embedder.name}
        if name not in names:
            raise APIError(400, f"model {name!r} is not served here; available: {sorted(names)}", "model",
                           "model_not_found")

    def check_context(self, prompt_len: int, max_tokens: int | None, param: str) -> None:
        ctx = self.max_model_len
        if prompt_len >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                f"{prompt_len} tokens, which leaves no room for a completion.", param,
                           "context_length_exceeded")
        if isinstance(max_tokens, int) and max_tokens > 0 and prompt_len + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
                                "the completion). Please reduce the prompt or max_tokens.", "max_tokens",
                           "context_length_exceeded")

    async def admit(self, requests: list[tuple[str, list[int], SamplingParams, str | None]]) -> list[RequestStream]:
        """Reserve room for `requests` (429 when full), add them to the engine (400 on its ValueError)."""
        if self.loop.num_in_flight + len(requests) > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.loop.num_in_flight} requests in flight, "
                                f"limit {self.capacity}: max_num_seqs + max_queue); retry later", None,
                           "queue_full")
        self.loop.num_in_flight += len(requests)
        streams: list[RequestStream] = []
        try:
            for rid, ids, params, prompt in requests:
                streams.append(await self.loop.add_request(rid, ids, params, prompt))
        except BaseException as e:
            for s in streams:
                s.abort()
            self.release(len(requests))
            if isinstance(e, ValueError):
                raise APIError.from_value_error(e) from None
            raise
        return streams

    def release(self, count: int) -> None:
        self.loop.num_in_flight -= count
