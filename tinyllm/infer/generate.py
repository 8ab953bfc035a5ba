"""The reference generator: autoregressive decoding with a KV cache (notes ch.02.13.a "generate",
ch.02.15.a greedy / sampling / beam search; papers: Graves 2012 and Sutskever et al. 2014 for beam search,
Wu et al. 2016 (GNMT) for the length penalty).

`generate(model, input_ids, config)` runs one prefill over the (left-padded) prompts, then one token per step
with `last_only=True` logits, choosing tokens greedily, by sampling through the processors of
`tinyllm.infer.sampling`, or by beam search. Ragged prompts are left-padded; `attention_mask` marks real
tokens, positions are `cumsum(mask) − 1` so each row counts from its own first token, and the mask keeps
queries away from padding keys. Rows stop independently on EOS / stop tokens and are then filled with
`pad_token_id`, so the result is one [B, T + new] tensor.

Beam search follows transformers' semantics exactly: each step keeps the top `max(2, 1 + n_eos) · num_beams`
continuations of Σ log p; a continuation ending in EOS (among the top `num_beams`) becomes a finished
hypothesis scored Σ log p / len^length_penalty (len counts generated tokens, EOS included); the best
`num_beams` finished hypotheses are kept; a batch row is done when `early_stopping=True` and `num_beams`
hypotheses are finished, or when the best running beam can no longer beat the worst finished one.

Two ways to get next-token logits, token-identical by test (DESIGN rule 5): `CachedStep` (a
`ContiguousKVCache`, the fast path) and `RecomputeStep` (a full forward over the whole sequence every step,
the oracle) — `generate_recompute` uses the latter.

Not covered: beam sampling, diverse/constrained beams, stop strings (text-level), speculative decoding and
continuous batching (see the engine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tinyllm.infer.kv_cache import ContiguousKVCache
from tinyllm.infer.sampling import apply_processors, build_processors, greedy, make_generator, sample
from tinyllm.model.attention import build_attn_meta
from tinyllm.utils import require_int

Streamer = Callable[[list[int]], None]


@dataclass
class GenerationConfig:
    """Decoding settings (field names as in transformers' GenerationConfig).

    eos_token_id None means "use the model config's"; an empty list disables EOS stopping.
    pad_token_id None means the model config's, else the first EOS id, else 0.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    encoder_repetition_penalty: float = 1.0  # > 1 favours tokens of the prompt (copying, e.g. titles)
    no_repeat_ngram_size: int = 0  # ban repeating any n-gram (0 = off)
    no_repeat_ngram_scope: str = "all"  # "all": prompt and output (transformers); "output": the output only
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | list[int] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        require_int("max_new_tokens", self.max_new_tokens, 0)
        require_int("top_k", self.top_k, 0)
        require_int("num_beams", self.num_beams, 1)
        require_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.no_repeat_ngram_scope not in ("all", "output"):
            raise ValueError(f"no_repeat_ngram_scope={self.no_repeat_ngram_scope!r} must be 'all' or 'output'")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 (do_sample=False is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        if self.do_sample and self.num_beams > 1:
            raise ValueError(f"num_beams={self.num_beams} with do_sample=True (beam sampling) is not supported")
        for name in ("eos_token_id", "stop_token_ids"):
            v = getattr(self, name)
            ids = [v] if isinstance(v, int) else (v or [])
            if any(not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError(f"{name}={v!r} must hold non-negative integer token ids")
        if self.pad_token_id is not None and self.pad_token_id < 0:
            raise ValueError(f"pad_token_id={self.pad_token_id!r} must be >= 0")


# ------------------------------------------------------------------ next-token logits
def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions counting real tokens only (left padding gets position 0; it is never attended)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class CachedStep:
    """Next-token logits with a KV cache: feeds only the tokens the cache has not seen yet."""

    def __init__(self, model: torch.nn.Module, batch: int, capacity: int) -> None:
        self.model = model
        self.cache = ContiguousKVCache.for_model(model, batch, max(capacity, 1))

    def __call__(self, seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        past = self.cache.get_seq_length()
        new = seqs[:, past:]
        padded = not bool(mask.all())
        meta = build_attn_meta(new.shape[1], past, seqs.shape[0], key_padding_mask=mask if padded else None,
                               sliding_window=self.model.config.sliding_window, device=seqs.device)
        logits = self.model(new, positions=_positions(mask)[:, past:], cache=self.cache, attn_meta=meta,
                            last_only=True)
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)


class RecomputeStep:
    """Next-token logits by a full forward over the whole sequence (no cache): the oracle."""

    def __init__(self, model: torch.nn.Module, batch: int = 0, capacity: int = 0) -> None:
        self.model = model

    def __call__(self, seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padded = not bool(mask.all())
        meta = build_attn_meta(seqs.shape[1], 0, seqs.shape[0], key_padding_mask=mask if padded else None,
                               sliding_window=self.model.config.sliding_window, device=seqs.device)
        logits = self.model(seqs, positions=_positions(mask), attn_meta=meta, last_only=True)
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        pass  # nothing stored: the reordered sequences are recomputed next step


# ------------------------------------------------------------------ entry points
def _resolve(model: torch.nn.Module, config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    cfg = config or GenerationConfig()
    if overrides:
        names = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        cfg = dataclasses.replace(cfg, **overrides)
    if cfg.eos_token_id is None:
        cfg = dataclasses.replace(cfg, eos_token_id=getattr(model.config, "eos_token_id", None))
    return cfg


def _stop_ids(cfg: GenerationConfig) -> list[int]:
    eos = cfg.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos + [i for i in cfg.stop_token_ids if i not in eos]


def _pad_id(model: torch.nn.Module, cfg: GenerationConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    if getattr(model.config, "pad_token_id", None) is not None:
        return model.config.pad_token_id
    stops = _stop_ids(cfg)
    return stops[0] if stops else 0


def generate(model: torch.nn.Module, input_ids: torch.Tensor, config: GenerationConfig | None = None,
             attention_mask: torch.Tensor | None = None, streamer: Streamer | None = None,
             generator: torch.Generator | None = None, **overrides) -> torch.Tensor:
    """Prompt ids [B, T] (left-padded if ragged) → prompt + continuation [B, T + new] (LongTensor).

    streamer (batch 1 only): called with the new token ids of every step as soon as they are chosen.
    generator: the RNG for sampling; by default a fresh one seeded with `config.seed` (or the global RNG).
    """
    return _run(model, input_ids, _resolve(model, config, overrides), attention_mask, streamer, generator, CachedStep)


def generate_recompute(model: torch.nn.Module, input_ids: torch.Tensor, config: GenerationConfig | None = None,
                       attention_mask: torch.Tensor | None = None, streamer: Streamer | None = None,
                       generator: torch.Generator | None = None, **overrides) -> torch.Tensor:
    """`generate` without a cache (full forward each step): the slow oracle the cached path is tested against."""
    return _run(model, input_ids, _resolve(model, config, overrides), attention_mask, streamer, generator,
                RecomputeStep)


def _check_inputs(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq_len>0], got shape {tuple(input_ids.shape)}")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids hold ids outside [0, {vocab}): min {int(input_ids.min())}, "
                         f"max {int(input_ids.max())}")
    if mask is None:
        return torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: prompts must be left-padded (the last column must be all real tokens)")
    return mask.to(device=input_ids.device, dtype=torch.long)


@torch.inference_mode()
def _run(model: torch.nn.Module, input_ids: torch.Tensor, cfg: GenerationConfig, attention_mask: torch.Tensor | None,
         streamer: Streamer | None, generator: torch.Generator | None, step_cls: type) -> torch.Tensor:
    input_ids = input_ids.to(model.device if hasattr(model, "device") else input_ids.device).long()
    mask = _check_inputs(model, input_ids, attention_mask)
    if streamer is not None and (input_ids.shape[0] != 1 or cfg.num_beams > 1):
        raise ValueError(f"streaming needs batch 1 and num_beams 1, got batch {input_ids.shape[0]}, "
                         f"num_beams {cfg.num_beams}")
    if cfg.max_new_tokens == 0:
        return input_ids.clone()
    if cfg.num_beams > 1:
        return _beam_search(model, input_ids, mask, cfg, step_cls)
    if generator is None and cfg.do_sample:
        generator = make_generator(cfg.seed, input_ids.device)
    chain = build_processors(do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                             encoder_repetition_penalty=cfg.encoder_repetition_penalty,
                             prompt_ids=_real_prompt_ids(input_ids, mask), **_no_repeat(cfg, input_ids))
    stops = torch.tensor(_stop_ids(cfg), dtype=torch.long, device=input_ids.device)
    pad = _pad_id(model, cfg)
    b, t = input_ids.shape
    step = step_cls(model, b, t + cfg.max_new_tokens)
    seqs = input_ids
    finished = torch.zeros(b, dtype=torch.bool, device=seqs.device)
    for _ in range(cfg.max_new_tokens):
        scores = apply_processors(chain, seqs, step(seqs, mask))
        nxt = sample(scores, generator) if cfg.do_sample else greedy(scores)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
        if streamer is not None:
            streamer(nxt.tolist())
        finished |= torch.isin(nxt, stops)
        if bool(finished.all()):
            break
    return seqs


def _no_repeat(cfg: GenerationConfig, input_ids: torch.Tensor) -> dict[str, int]:
    return dict(no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                no_repeat_start=input_ids.shape[1] if cfg.no_repeat_ngram_scope == "output" else 0)


def _real_prompt_ids(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The prompt ids with each left-pad position holding the row's last token, so that a processor over the
    prompt's tokens (the encoder repetition penalty) sees only real ones."""
    return torch.where(mask.bool(), input_ids, input_ids[:, -1:])


def _beam_search(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, cfg: GenerationConfig,
                 step_cls: type) -> torch.Tensor:
    b, t = input_ids.shape
    k = cfg.num_beams
    stop_list = _stop_ids(cfg)
    stops = torch.tensor(stop_list, dtype=torch.long, device=input_ids.device)
    # enough candidates that num_beams of them are still running even if every beam picks an EOS
    n_cand = max(2, 1 + len(stop_list)) * k
    chain = build_processors(do_sample=False, repetition_penalty=cfg.repetition_penalty,
                             encoder_repetition_penalty=cfg.encoder_repetition_penalty,
                             prompt_ids=_real_prompt_ids(input_ids, mask), **_no_repeat(cfg, input_ids))
    seqs = input_ids.repeat_interleave(k, dim=0)  # [B·K, T], beams of row i at i·K … i·K+K−1
    mask = mask.repeat_interleave(k, dim=0)
    step = step_cls(model, b * k, t + cfg.max_new_tokens)
    running = torch.zeros(b, k, device=seqs.device)
    running[:, 1:] = -1e9  # all beams start identical: let only beam 0 propose at step 1
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]  # (score, generated ids)
    done = [False] * b
    row_offset = torch.arange(b, device=seqs.device)[:, None] * k
    for i in range(cfg.max_new_tokens):
        logp = apply_processors(chain, seqs, F.log_softmax(step(seqs, mask), dim=-1))
        v = logp.shape[-1]
        total = (logp.view(b, k, v) + running[..., None]).view(b, k * v)
        cand_scores, cand_idx = torch.topk(total, n_cand, dim=-1)  # [B, n_cand], best first
        cand_beam, cand_tok = cand_idx // v, cand_idx % v
        last = i == cfg.max_new_tokens - 1
        ends = torch.isin(cand_tok, stops) | last  # at max length every continuation ends
        gen_len = i + 1
        for r in range(b):
            if done[r]:
                continue
            for c in range(k):  # only the top num_beams candidates may become hypotheses
                if ends[r, c]:
                    src = int(row_offset[r, 0] + cand_beam[r, c])
                    ids = torch.cat([seqs[src, t:], cand_tok[r, c:c + 1]])
                    finished[r].append((float(cand_scores[r, c]) / gen_len ** cfg.length_penalty, ids))
            finished[r] = sorted(finished[r], key=lambda h: -h[0])[:k]
        # the best num_beams continuations that did not end keep running
        alive = cand_scores + ends.float() * -1e9
        running, sel = torch.topk(alive, k, dim=-1)
        src = (cand_beam.gather(1, sel) + row_offset).flatten()
        tok = cand_tok.gather(1, sel).flatten()
        seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
        mask = torch.cat([mask[src], torch.ones_like(tok[:, None])], dim=1)
        step.reorder(src)
        for r in range(b):
            done[r] = done[r] or _row_done(finished[r], float(running[r, 0]), gen_len, cfg)
        if all(done) or last:
            break
    pad = _pad_id(model, cfg)
    best = [max(h, key=lambda x: x[0])[1] for h in finished]
    width = max(len(x) for x in best)
    out = torch.full((b, t + width), pad, dtype=torch.long, device=input_ids.device)
    out[:, :t] = input_ids
    for r, ids in enumerate(best):
        out[r, t:t + len(ids)] = ids
    return out


def _row_done(hyps: list[tuple[float, torch.Tensor]], best_running: float, gen_len: int,
              cfg: GenerationConfig) -> bool:
    """transformers' stopping rule for one batch row of beam search."""
    if len(hyps) < cfg.num_beams:
        return False
    if cfg.early_stopping is True:
        return True
    # can the best running beam still beat the worst kept hypothesis? "never" with a positive length
    # penalty assumes the beam could grow to the maximum length (the score then only improves)
    length = cfg.max_new_tokens if cfg.early_stopping == "never" and cfg.length_penalty > 0 else gen_len
    return best_running / length ** cfg.length_penalty <= min(h[0] for h in hyps)
