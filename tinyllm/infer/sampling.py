"""Decoding strategies and logits processors (notes ch.02.13.b "sample_top_p", ch.02.15 "Top-k & Top-p &
Temperature"; papers: Holtzman et al. 2019 "The Curious Case of Neural Text Degeneration" (nucleus sampling),
Fan et al. 2018 (top-k), Keskar et al. 2019 "CTRL" (repetition penalty), Nguyen et al. 2024 (min-p)), and transformers' "encoder repetition
penalty" (a reward for tokens of the prompt, for input-grounded tasks such as titles and summaries).

Every processor maps `(input_ids [B, L], scores [B, V]) -> scores [B, V]` in logit space and removes tokens
by setting their score to −∞, so processors compose and the last step is one `softmax` + `multinomial`.
Conventions follow `transformers.generation.logits_process`, and the tests check equality with it:

- order: encoder repetition penalty → repetition penalty → no-repeat n-gram → temperature → top-k → top-p → min-p (transformers' order);
- temperature divides *logits* (p_i ∝ p_i^{1/T}), before top-k/top-p. The notes' worked example (02.15.e,
  0.660/0.340) divides *probabilities* instead; `tests/infer/test_sampling.py` documents the difference;
- top-p keeps the smallest set of most likely tokens whose mass reaches p (a token whose preceding mass
  equals p exactly is dropped; LLaMA's `sample_top_p` of 02.13.b keeps it).

Not covered: typical-p, epsilon/eta cutoffs, frequency/presence penalties (OpenAI style), beam sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

NEG_INF = float("-inf")


class LogitsProcessor(Protocol):
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Temperature:
    """z_i ← z_i / T. T < 1 sharpens (T → 0: argmax), T > 1 flattens (T → ∞: uniform); the Boltzmann
    distribution p_i ∝ exp(−E_i / kT) with energy −z_i."""

    temperature: float

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 (use greedy decoding for T = 0)")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


@dataclass(frozen=True)
class TopK:
    """Keep tokens with z_i ≥ z_(k) (the k-th largest logit; ties at the boundary are all kept), −∞ elsewhere."""

    top_k: int
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ValueError(f"top_k={self.top_k!r} must be a positive integer")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(max(self.top_k, self.min_tokens_to_keep), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, NEG_INF)


@dataclass(frozen=True)
class TopP:
    """Nucleus: sort p ascending, c_j = Σ_{i≤j} p_(i); drop tokens with c_j ≤ 1 − p, i.e. keep the smallest
    set of most likely tokens with mass ≥ p (at least `min_tokens_to_keep`)."""

    top_p: float
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        tail_mass = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = tail_mass <= (1.0 - self.top_p)
        drop_sorted[..., -self.min_tokens_to_keep:] = False  # the most likely tokens sit at the end
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, NEG_INF)


@dataclass(frozen=True)
class MinP:
    """Keep tokens with p_i ≥ min_p · max_j p_j: the cut scales with the model's confidence."""

    min_p: float
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        drop = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        drop.scatter_(-1, keep, False)
        return scores.masked_fill(drop, NEG_INF)


@dataclass(frozen=True)
class RepetitionPenalty:
    """CTRL: for every token already in the sequence, z_i ← z_i / θ if z_i > 0 else z_i · θ (θ > 1 discourages
    repeats, θ < 1 encourages them). Each seen token is penalised once, however often it occurred."""

    penalty: float

    def __post_init__(self) -> None:
        if not self.penalty > 0:
            raise ValueError(f"repetition_penalty={self.penalty!r} must be > 0")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.gather(scores, -1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(-1, input_ids, seen)


@dataclass(frozen=True)
class EncoderRepetitionPenalty:
    """The inverse of CTRL's penalty for the tokens of the prompt (`prompt_ids` [B, P]): z_i ← z_i · θ if z_i > 0
    else z_i / θ, so θ > 1 makes tokens the input contains more likely — a copy bias for input-grounded tasks
    (a title from its article). transformers' `encoder_repetition_penalty`; a decoder-only model's prompt plays the
    encoder input. Left padding: pass each row's real tokens, padded with any of them (a token listed twice gets
    the same value twice)."""

    penalty: float
    prompt_ids: torch.Tensor

    def __post_init__(self) -> None:
        if not self.penalty > 0:
            raise ValueError(f"encoder_repetition_penalty={self.penalty!r} must be > 0")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = self.prompt_ids.to(scores.device)
        if scores.shape[0] > ids.shape[0]:  # beams: row i's K beams sit at i·K … i·K+K−1
            ids = ids.repeat_interleave(scores.shape[0] // ids.shape[0], dim=0)
        got = torch.gather(scores, -1, ids)
        inv = 1 / self.penalty  # transformers' arithmetic (x·(1/θ), x/(1/θ)), so both round alike
        got = torch.where(got < 0, got * inv, got / inv)
        return scores.scatter(-1, ids, got)


@dataclass(frozen=True)
class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present: with the last n−1 tokens as the prefix,
    each earlier occurrence of that prefix bans the token that followed it (z ← −∞). transformers'
    `no_repeat_ngram_size` reads the whole sequence (`start=0`), prompt included, so it also forbids copying any
    n-gram of the prompt; `start=P` reads only the columns from P on — the output of a batch whose prompts fill the
    first P columns — so a title may still quote its article, once."""

    size: int
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"no_repeat_ngram_size={self.size!r} must be a positive integer")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, rows = self.size, input_ids[:, self.start:].tolist()
        if len(rows[0]) + 1 < n:
            return scores
        scores = scores.clone()
        for r, toks in enumerate(rows):
            prefix = toks[len(toks) - n + 1:] if n > 1 else []
            banned = [toks[i + n - 1] for i in range(len(toks) - n + 1) if toks[i : i + n - 1] == prefix]
            if banned:
                scores[r, banned] = NEG_INF
        return scores


def build_processors(*, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0, repetition_penalty: float = 1.0, encoder_repetition_penalty: float = 1.0,
                     prompt_ids: torch.Tensor | None = None, no_repeat_ngram_size: int = 0, no_repeat_start: int = 0,
                     min_tokens_to_keep: int = 1) -> list[LogitsProcessor]:
    """The processor chain in transformers' order; warpers (temperature, top-k/p, min-p) only when sampling.
    `encoder_repetition_penalty` ≠ 1 needs `prompt_ids`; `no_repeat_start` is `NoRepeatNGram.start`."""
    chain: list[LogitsProcessor] = []
    if encoder_repetition_penalty != 1.0:
        if prompt_ids is None:
            raise ValueError("encoder_repetition_penalty needs the prompt's token ids (prompt_ids)")
        chain.append(EncoderRepetitionPenalty(encoder_repetition_penalty, prompt_ids))
    if repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(repetition_penalty))
    if no_repeat_ngram_size:
        chain.append(NoRepeatNGram(no_repeat_ngram_size, no_repeat_start))
    if not do_sample:
        return chain
    if temperature != 1.0:
        chain.append(Temperature(temperature))
    if top_k:
        chain.append(TopK(top_k, min_tokens_to_keep))
    if top_p < 1.0:
        chain.append(TopP(top_p, min_tokens_to_keep))
    if min_p:
        chain.append(MinP(min_p, min_tokens_to_keep))
    return chain


def apply_processors(chain: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for proc in chain:
        scores = proc(input_ids, scores)
    return scores


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """argmax_i z_i per row → [B]."""
    return scores.argmax(dim=-1)


def sample(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from softmax(scores) (−∞ entries have probability 0) → [B]."""
    probs = scores.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator (reproducible draws, independent of the global RNG), or None for the global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))
