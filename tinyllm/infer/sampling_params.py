"""Per-request decoding parameters of the engine (notes ch.06.1 "LLM推理常见参数", ch.06.4 vLLM `SamplingParams`).

The fields and their meaning follow vLLM's `SamplingParams`: temperature 0 means greedy decoding (as in vLLM, so
does any temperature below 1e-5, which would overflow the logits into inf/NaN); top_k ≤ 0
(vLLM writes −1) and top_p = 1 disable those filters; repetition_penalty is CTRL's (applied to prompt and
output tokens, as transformers does); encoder_repetition_penalty is transformers' reward for the prompt's own
tokens (> 1 favours copying from the prompt, e.g. a title from its article); presence/frequency penalties are OpenAI's additive ones over the output
tokens only: z_i ← z_i − presence·[c_i > 0] − frequency·c_i with c_i the count of token i in the output.
Processing order: encoder repetition → repetition → no-repeat n-gram → presence/frequency → temperature → top-k →
top-p → min-p.

`seed` gives the request its own `torch.Generator`, so its samples do not depend on which other requests
share the batch; with n > 1, sample i draws from a generator seeded with seed + i.
`logprobs=k` returns, for every generated token, the log-probabilities under the *raw* model distribution
(log_softmax of the logits before any processing) of the chosen token and the k most likely tokens.

`num_speculative_tokens` caps the draft tokens verified per step for this request when the engine speculates
(0 turns speculation off for it; None uses the engine's `SpeculativeConfig`).

Not covered: best_of, beam search in the engine, guided decoding, bad_words, logit_bias, min_tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tinyllm.infer.sampling import LogitsProcessor, build_processors
from tinyllm.utils import require_int

GREEDY_TEMPERATURE = 1e-5  # below this, sampling is argmax (vLLM's _SAMPLING_EPS)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    encoder_repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # ban any n-gram from occurring twice (0 = off)
    no_repeat_ngram_scope: str = "all"  # "all": prompt and output (transformers); "output": the output only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    num_speculative_tokens: int | None = None  # draft tokens per step for this request; None: the engine's k

    def __post_init__(self) -> None:
        require_int("n", self.n, 1)
        require_int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= -1 (-1 or 0 disables it)")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        for name in ("temperature", "repetition_penalty", "encoder_repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be finite")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name}={v!r} must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed <= 2**64 - self.n):
            raise ValueError(f"seed={self.seed!r} must be an integer in [-2**63, 2**64 - n] or None")
        if self.logprobs is not None:
            require_int("logprobs", self.logprobs, 0)
        require_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.no_repeat_ngram_scope not in ("all", "output"):
            raise ValueError(f"no_repeat_ngram_scope={self.no_repeat_ngram_scope!r} must be 'all' or 'output'")
        if self.num_speculative_tokens is not None:
            require_int("num_speculative_tokens", self.num_speculative_tokens, 0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must hold non-empty strings")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must hold non-negative integer token ids")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def processors(self, prompt_token_ids: list[int] | None = None
                   ) -> tuple[list[LogitsProcessor], list[LogitsProcessor]]:
        """(penalties, warpers): the transformers-ordered chains of `tinyllm.infer.sampling` for this request;
        the presence/frequency penalties go between the two. The encoder repetition penalty and the output-only
        no-repeat rule need the prompt."""
        prompt = None  # built only for the encoder penalty: most requests never read their prompt here
        if self.encoder_repetition_penalty != 1.0 and prompt_token_ids is not None:
            prompt = torch.tensor([prompt_token_ids], dtype=torch.long)
        start = 0
        if self.no_repeat_ngram_size and self.no_repeat_ngram_scope == "output":
            if prompt_token_ids is None:
                raise ValueError("no_repeat_ngram_scope='output' needs the prompt's token ids")
            start = len(prompt_token_ids)
        penalties = build_processors(do_sample=False, repetition_penalty=self.repetition_penalty,
                                     encoder_repetition_penalty=self.encoder_repetition_penalty, prompt_ids=prompt,
                                     no_repeat_ngram_size=self.no_repeat_ngram_size, no_repeat_start=start)
        warpers = [] if self.greedy else build_processors(
            do_sample=True, temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
            min_p=self.min_p)
        return penalties, warpers
