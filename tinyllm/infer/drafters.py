"""Drafters for speculative decoding inside the engine (notes ch.06.3.k "speculative inference"; Leviathan et
al. 2023; Saxena 2023 "prompt lookup decoding"; vLLM's `SpeculativeConfig`, n-gram and draft-model proposers).

Each step, before the target's forward, the engine asks the drafter for up to `seq.lookahead` tokens per
decoding sequence (the scheduler has reserved that many KV slots); the target then verifies them all in the
same batched forward (`speculative.verify_draft`). Two drafters:

- `NgramDrafter` (prompt lookup, no second model): find the most recent earlier occurrence of the last n
  tokens of the sequence (n from `prompt_lookup_max` down to `prompt_lookup_min`) and propose the tokens that
  followed it. Free to compute, and right whenever the output repeats its input (code edits, extraction,
  summaries quoting the source, repetitive text). The draft is deterministic: q is one-hot.
- `ModelDrafter`: a small causal LM sharing the tokenizer, by default the target itself with int4 weights
  and an int8 LM head (self-speculation via `quant.quantize_model`), optionally cut to its first N layers. It runs k batched
  decode steps over its own paged pool, which mirrors the target's: same block size and number of blocks,
  addressed through the *target's* block tables, so the scheduler, prefix caching, copy-on-write and
  preemption need no second bookkeeping. `seq.draft_computed` counts the tokens whose draft K/V are in it;
  the first proposal for a sequence recomputes its whole context (the draft is cheap), later ones only the
  tokens verified since.

Not covered: tree drafts (several candidates per step), EAGLE/Medusa heads, drafting with a different
tokenizer.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tinyllm.infer.paged import PagedKVCache
from tinyllm.infer.runner import ModelRunner
from tinyllm.infer.sequence import Sequence
from tinyllm.infer.speculative import process_row

METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """How the engine speculates.

    method: "ngram" (prompt lookup) or "draft" (a draft model).
    num_speculative_tokens: draft tokens per step k (a request may lower it with
        `SamplingParams.num_speculative_tokens`).
    prompt_lookup_min/max: n-gram sizes tried, longest first (method "ngram").
    draft_model: method "draft": a model object or anything `load_model` accepts; None = a copy of the target.
    draft_quantization: "int4", "int8" or None, applied to the draft's Linears but its LM head (to a copy: the
        target is never touched). draft_head_quantization: the same for the draft's LM head (untied).
    draft_group_size: int4 group size. draft_num_layers: keep only the draft's first N layers (None: all).
    fit_native_step: lower the drafts so that a step of decoding sequences keeps within the CPU runner's native
        step (`fast_step.max_rows` rows: 32 fp32, 16 quantized); past it a verification costs more than it saves.
        False drafts k tokens for every sequence whatever the batch. No effect where there is no native step (CUDA).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    draft_model: Any = None
    draft_quantization: str | None = "int4"
    draft_head_quantization: str | None = "int8"
    draft_group_size: int = 32
    draft_num_layers: int | None = None
    fit_native_step: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method={self.method!r} is not one of {list(METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} > prompt_lookup_max="
                             f"{self.prompt_lookup_max}")
        for name in ("draft_quantization", "draft_head_quantization"):
            if getattr(self, name) not in (None, "int8", "int4"):
                raise ValueError(f"{name}={getattr(self, name)!r} must be 'int4', 'int8' or None")
        if self.draft_num_layers is not None and (not isinstance(self.draft_num_layers, int)
                                                  or isinstance(self.draft_num_layers, bool)
                                                  or self.draft_num_layers < 1):
            raise ValueError(f"draft_num_layers={self.draft_num_layers!r} must be a positive integer or None")
        if not isinstance(self.fit_native_step, bool):
            raise ValueError(f"fit_native_step={self.fit_native_step!r} must be True or False")
        if self.draft_model is not None and not isinstance(self.draft_model, (nn.Module, str, os.PathLike)):
            raise ValueError(f"draft_model={self.draft_model!r} must be a model, a path or a model name")

    @classmethod
    def of(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """None, a config, a dict of its fields, or a method name ("ngram", "draft")."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"speculative: unknown field(s) {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"speculative={value!r} must be a SpeculativeConfig, a dict, 'ngram' or 'draft'")


# ------------------------------------------------------------------ prompt lookup
def prompt_lookup(tokens: list[int], k: int, n_min: int = 1, n_max: int = 4) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens of `tokens`,
    trying n = n_max … n_min; [] when none occurs."""
    if k <= 0 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        # windows starting at 0 … L−n−1: every occurrence but the suffix itself, each followed by a token
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k]
    return []


def prompt_lookup_reference(tokens: list[int], k: int, n_min: int = 1, n_max: int = 4) -> list[int]:
    """The plain-loop twin of `prompt_lookup` (its test reference)."""
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


class NgramDrafter:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.n_min, self.n_max = config.prompt_lookup_min, config.prompt_lookup_max

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:  # no cache of its own
        pass

    def propose(self, seqs: list[Sequence]) -> int:
        """Set `seq.draft` (≤ seq.lookahead tokens) for every sequence; returns the draft forwards run (0)."""
        for seq in seqs:
            seq.draft = prompt_lookup(seq.token_ids, seq.lookahead, self.n_min, self.n_max)
            seq.draft_probs = None
        return 0


# ------------------------------------------------------------------ draft model
@dataclass
class _View:
    """The draft model's view of a sequence, in the shape `ModelRunner.forward` reads."""

    seq: Sequence
    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    k: int
    proposed: list[int] = field(default_factory=list)
    q: list[torch.Tensor] = field(default_factory=list)
    draft: tuple = ()  # nothing under verification in the draft's own forward

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    num_scheduled_tokens = num_tokens


def build_draft_model(target: nn.Module, config: SpeculativeConfig) -> nn.Module:
    """The draft of `config` for `target`: loaded, or copied from the target; then quantized and cut."""
    from tinyllm.infer.quant import quantize_model
    from tinyllm.infer.speculative import truncated_draft

    src = config.draft_model
    if src is None:
        draft = copy.deepcopy(target)
    elif isinstance(src, nn.Module):
        draft = copy.deepcopy(src) if config.draft_quantization else src
    else:
        from tinyllm.model.hf import load_model, resolve_model_path

        p = next(target.parameters())
        draft = load_model(resolve_model_path(src), dtype=p.dtype, device=p.device)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab_size={draft.config.vocab_size} != target vocab_size="
                         f"{target.config.vocab_size}: the draft must share the target's tokenizer")
    if config.draft_quantization:
        draft = quantize_model(draft, config.draft_quantization, config.draft_group_size)
    if config.draft_head_quantization and isinstance(getattr(draft, "lm_head", None), nn.Linear):
        # untied from the embeddings of this copy: at 49k × 576 the head is a fifth of SmolLM2's fp32 bytes,
        # and a draft step is as fast as the bytes it reads; int8 keeps the draft's argmax close to the
        # target's (an int4 head cost SmolLM2's self-draft 0.87 acceptance instead of ~1)
        draft = quantize_model(draft, config.draft_head_quantization, config.draft_group_size, skip=(),
                               untie=True)
    if config.draft_num_layers is not None:
        draft = truncated_draft(draft, config.draft_num_layers)
    return draft.eval()


class ModelDrafter:
    def __init__(self, draft: nn.Module, target_cache: PagedKVCache, native: bool = True) -> None:
        cfg = draft.config
        self.model = draft
        self.cache = PagedKVCache(cfg.num_hidden_layers, target_cache.num_blocks, target_cache.block_size,
                                  cfg.num_key_value_heads, cfg.head_dim, target_cache.kv.dtype,
                                  target_cache.kv.device)
        self.cache.use_native(native)
        self.runner = ModelRunner(draft, self.cache, "paged")

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.copy_blocks(pairs)  # the target's copy-on-write, mirrored

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> int:
        """k = seq.lookahead tokens for each sequence in max(k) batched draft forwards (the first also catches
        up on the tokens verified since the last proposal); returns the number of forwards."""
        views = [_View(s, list(s.token_ids), min(s.draft_computed, s.num_computed), s.block_table, s.lookahead)
                 for s in seqs if s.lookahead > 0]
        forwards = 0
        while True:
            active = [v for v in views if len(v.proposed) < v.k]
            if not active:
                break
            num_new = [v.num_tokens - v.num_computed for v in active]
            wanted, logits = self.runner.forward(active, num_new)
            forwards += 1
            for v, n in zip(active, num_new, strict=True):
                v.num_computed += n
            for v, row in zip(wanted, logits, strict=True):
                seq = v.seq
                scores = process_row(seq, row[None], v.token_ids)
                if seq.request.params.greedy:
                    tok = int(scores.argmax(-1))
                else:
                    q = scores.float().softmax(-1)[0]
                    tok = int(torch.multinomial(q, 1, generator=seq.generator))
                    v.q.append(q)
                v.token_ids.append(tok)
                v.proposed.append(tok)
        for v in views:
            v.seq.draft = v.proposed
            v.seq.draft_probs = torch.stack(v.q) if v.q else None
            v.seq.draft_computed = v.num_computed
        return forwards


def build_drafter(config: SpeculativeConfig, target: nn.Module, target_cache: PagedKVCache,
                  native: bool = True) -> NgramDrafter | ModelDrafter:
    if config.method == "ngram":
        return NgramDrafter(config)
    return ModelDrafter(build_draft_model(target, config), target_cache, native)
