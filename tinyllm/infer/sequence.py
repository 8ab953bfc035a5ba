"""Requests, sequences and their outputs in the engine (notes ch.06.4.c; vLLM's `Sequence`, `SequenceGroup`,
`RequestOutput`).

A `Request` holds one prompt and its `SamplingParams`; it owns n `Sequence`s (one until its prompt has been
computed, then forked into n that share the prompt's KV blocks). A sequence's tokens are prompt + output;
`num_computed` counts those whose K/V sit in the paged cache; the rest are what the next forward must feed
(the whole prompt at first, one token per step while decoding, everything again after a preemption).

Outputs mirror vLLM: `RequestOutput(request_id, prompt, prompt_token_ids, outputs, finished)` with one
`CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)` per
sample; finish_reason is "stop" (EOS, a stop token or a stop string), "length", "abort", or "error" when an
engine fault ended the request (`RequestOutput.error` says why). The delta fields carry what the last step
added, for streaming.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyllm.infer.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    generator: torch.Generator | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    text: str = ""
    emitted_text: int = 0  # characters of `text` already reported
    emitted_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # speculative decoding (`speculative.py`): the drafter's proposal for this step, fed after the pending token
    # and verified by the target in the same forward; never part of token_ids until accepted
    lookahead: int = 0  # KV slots the scheduler reserves this step for draft tokens
    draft: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [len(draft), V] the draft's distribution (None: deterministic)
    draft_computed: int = 0  # tokens whose K/V the draft model holds (a draft-model drafter's own pool)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens a forward may feed: token_ids plus the draft under verification."""
        return len(self.token_ids) + len(self.draft)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: the prompt's sequence has been split into n samples
    chains: tuple[list[Any], list[Any]] = ((), ())  # (penalties, warpers) of `SamplingParams.processors`
    plain_greedy: bool = False  # argmax of the raw logits: no processor at all
    error: str | None = None  # why the engine failed it (finish_reason "error")

    def __post_init__(self) -> None:
        self.chains = self.params.processors(self.prompt_token_ids)
        p = self.params
        self.plain_greedy = p.greedy and not self.chains[0] and not p.has_penalties

    @property
    def finished(self) -> bool:
        # before the fork the single sequence can only finish by abort, which ends the request too
        return all(s.finished for s in self.seqs)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # set when an engine fault ended the request (its outputs say "error")
