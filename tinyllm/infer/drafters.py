"""Drafters for speculative decoding inside the engine (notes ch.06.3.k "speculative inference"; Leviathan et
al. 2023; Saxena 2023 "prompt lookup decoding"; vLLM's `SpeculativeConfig`, n-gram and draft-model proposers).

Each step, before the target's forward, the engine asks the drafter for up to `seq.lookahead` tokens per
decoding sequence (the scheduler has reserved that many KV slots); the target then verifies them all in the
same batched forward (`speculative.verify_draft`). Two drafters:

- `NgramDrafter` (prompt lookup, no second model): find the most recent earlier occurrence of the last n
  tokens of the sequence (n from `prompt_lookup_max` down to `prompt_lookup_min`) and propose the tokens that
  followed it. Free to compute, and right whenever the output repeats its input (code edits, extraction,
  summaries quoting the source, repetitive text). The draft is deterministic: q is one-hot.
- `ModelDrafter`: a small causal LM sharing the tokenizer, by default the target itself on llama.cpp's Q4_1
  blocks with a Q8_0 LM head, activations rounded to int8 as llama.cpp computes (self-speculation via
  `quant.quantize_model`; "int4"/"int8" give tinyllm's own formats), optionally cut to its first N layers. It runs k batched
  decode steps over its own paged pool, which mirrors the target's: same block size and number of blocks,
  addressed through the *target's* block tables, so the scheduler, prefix caching, copy-on-write and
  preemption need no second bookkeeping. `seq.draft_computed` counts the tokens whose draft K/V are in it;
  a proposal first catches up on the tokens verified since the last one. A self-draft (the target's own
  quantized copy) takes the target's K/V for every position the target has computed instead
  (`draft_kv_from_target`): the prompt is not prefilled a second time — on a 2-core CPU that prefill, through
  dequantized weights, cost as much as the whole 64-token decode it was meant to speed up — and the draft
  reads context the target's exact K/V, not its own rounded ones. Proposals stay proposals: the target's
  verification decides every emitted token either way.

Not covered: tree drafts (several candidates per step), EAGLE/Medusa heads, drafting with a different
tokenizer.
"""

from __future__ import annotations

import copy
import os
import warnings
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
DRAFT_QUANTIZATIONS = ("q4_1", "q8_0", "int4", "int8")
_OWN_TWIN = {"q4_1": "int4", "q8_0": "int8"}  # tinyllm's format of the same kind, for widths blocks cannot hold


@dataclass
class SpeculativeConfig:
    """How the engine speculates.

    method: "ngram" (prompt lookup) or "draft" (a draft model).
    num_speculative_tokens: draft tokens per step k (a request may lower it with
        `SamplingParams.num_speculative_tokens`).
    prompt_lookup_min/max: n-gram sizes tried, longest first (method "ngram").
    draft_model: method "draft": a model object or anything `load_model` accepts; None = a copy of the target.
    draft_quantization: "q4_1", "q8_0" (llama.cpp blocks, int8-rounded activations), "int4", "int8" (tinyllm's
        weight-only formats) or None, applied to the draft's Linears but its LM head (to a copy: the target is
        never touched). draft_head_quantization: the same for the draft's LM head (untied). On a 2-core
        AVX-512 EPYC the Q4_1 self-draft with a Q8_0 head drafts a token in ~0.3 of an fp32 step, the int4 one
        in ~0.4 (BENCHMARKS.md, speculative decoding).
    draft_group_size: int4 group size. draft_num_layers: keep only the draft's first N layers (None: all).
    draft_kv_from_target: a self-draft (draft_model None) copies the target's K/V for the positions the target has
        computed instead of computing its own (no second prefill of the prompt); False: the draft computes all.
        Ignored for another draft model, whose K/V mean something else.
    fit_native_step: lower the drafts so that a step of decoding sequences keeps within the CPU runner's native
        step (`fast_step.max_rows` rows: 32 fp32, 16 quantized); past it a verification costs more than it saves.
        False drafts k tokens for every sequence whatever the batch. No effect where there is no native step (CUDA).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    draft_model: Any = None
    draft_quantization: str | None = "q4_1"
    draft_head_quantization: str | None = "q8_0"
    draft_group_size: int = 32
    draft_num_layers: int | None = None
    draft_kv_from_target: bool = True
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
            if getattr(self, name) not in (None, *DRAFT_QUANTIZATIONS):
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {list(DRAFT_QUANTIZATIONS)} or None")
        if self.draft_num_layers is not None and (not isinstance(self.draft_num_layers, int)
                                                  or isinstance(self.draft_num_layers, bool)
                                                  or self.draft_num_layers < 1):
            raise ValueError(f"draft_num_layers={self.draft_num_layers!r} must be a positive integer or None")
        for name in ("fit_native_step", "draft_kv_from_target"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
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
    from tinyllm.infer.quant import BLOCK_METHODS, quantize_model
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
    layer_q, head_q = config.draft_quantization, config.draft_head_quantization
    odd = sorted({m.in_features for m in draft.modules() if isinstance(m, nn.Linear) and m.in_features % 32})
    if odd and (layer_q in BLOCK_METHODS or head_q in BLOCK_METHODS):  # llama.cpp blocks hold 32 columns each
        layer_q, head_q = (_OWN_TWIN.get(q, q) for q in (layer_q, head_q))
        warnings.warn(f"draft: in_features {odd} are not multiples of 32, so the draft uses tinyllm's "
                      f"{layer_q}/{head_q} formats instead of llama.cpp blocks", RuntimeWarning, stacklevel=3)
    if layer_q:
        draft = quantize_model(draft, layer_q, config.draft_group_size)
    if head_q and isinstance(getattr(draft, "lm_head", None), nn.Linear):
        # untied from the embeddings of this copy: at 49k × 576 the head is a fifth of SmolLM2's fp32 bytes,
        # and a draft step is as fast as the bytes it reads; int8 keeps the draft's argmax close to the
        # target's (an int4 head cost SmolLM2's self-draft 0.87 acceptance instead of ~1)
        draft = quantize_model(draft, head_q, config.draft_group_size, skip=(), untie=True)
    if config.draft_num_layers is not None:
        draft = truncated_draft(draft, config.draft_num_layers)
    return draft.eval()


class ModelDrafter:
    def __init__(self, draft: nn.Module, target_cache: PagedKVCache, native: bool = True,
                 kv_from_target: bool = False) -> None:
        cfg = draft.config
        self.model = draft
        self.cache = PagedKVCache(cfg.num_hidden_layers, target_cache.num_blocks, target_cache.block_size,
                                  cfg.num_key_value_heads, cfg.head_dim, target_cache.kv.dtype,
                                  target_cache.kv.device)
        self.cache.use_native(native)
        self.runner = ModelRunner(draft, self.cache, "paged")
        # the target's pool, when its first layers' K/V can stand in for the draft's (a self-draft: same geometry)
        t = target_cache.kv
        self.target_kv = t if kv_from_target and t.shape[0] >= self.cache.kv.shape[0] \
            and t.shape[1:] == self.cache.kv.shape[1:] else None

    def _take_target_kv(self, table: list[int], start: int, end: int) -> None:
        """The target's K/V of positions [start, end) of the sequence with block table `table` → the draft's pool
        (its first layers; the pools share block ids)."""
        B = self.cache.block_size
        pos = torch.arange(start, end)
        slots = (torch.tensor(table, dtype=torch.long)[pos // B] * B + pos % B).to(self.cache.kv.device)
        layers = self.cache.kv.shape[0]
        self.cache.kv.flatten(2, 3)[:, :, slots] = self.target_kv[:layers].flatten(2, 3)[:, :, slots]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.copy_blocks(pairs)  # the target's copy-on-write, mirrored

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> int:
        """k = seq.lookahead tokens for each sequence in max(k) batched draft forwards (the first also catches
        up on the tokens verified since the last proposal); returns the number of forwards."""
        views = [_View(s, list(s.token_ids), min(s.draft_computed, s.num_computed), s.block_table, s.lookahead)
                 for s in seqs if s.lookahead > 0]
        if self.target_kv is not None:  # what the target has computed is not computed again
            for v in views:
                if v.num_computed < v.seq.num_computed:
                    self._take_target_kv(v.block_table, v.num_computed, v.seq.num_computed)
                    v.num_computed = v.seq.num_computed
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
    return ModelDrafter(build_draft_model(target, config), target_cache, native,
                        kv_from_target=config.draft_kv_from_target and config.draft_model is None)
