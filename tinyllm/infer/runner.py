"""The model runner: one forward for a mixed batch, then batched sampling (notes ch.06.4.c: "concatenates all
input tokens of the iteration into one sequence for the model, reads previous KV via PagedAttention and writes
new KV into blocks"; ch.06.1 for the sampling parameters).

`forward` flattens the scheduled work (decodes first, then prefill chunks) into one row of new tokens with
their positions, builds the slot mapping and block tables once (`build_paged_meta`), runs the model once and
applies the LM head only at the rows whose next token is wanted (the last token of each sequence that has no
uncomputed tokens left; a non-final prefill chunk samples nothing).

`sample` turns those logits into tokens: rows that are plain greedy share one argmax; the others go through
their request's processors (`tinyllm.infer.sampling`: repetition penalty, then presence/frequency penalties,
then temperature, top-k, top-p, min-p) and draw with their own `torch.Generator` when seeded, so a seeded
request's tokens do not depend on which requests share its batch. Log-probabilities are those of the raw
model distribution.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tinyllm.infer import hugepages
from tinyllm.infer.decode_fast import DecodeStep
from tinyllm.infer.decode_fast import supports as decode_supports
from tinyllm.infer.fused import FusedForward
from tinyllm.infer.fused import apply as apply_linear
from tinyllm.infer.fused import supports as fused_supports
from tinyllm.infer.paged import PagedKVCache, build_paged_meta
from tinyllm.infer.sampling import apply_processors
from tinyllm.infer.sequence import Sequence


@dataclass
class Sampled:
    token: int
    logprob: float | None = None  # raw log-probability of the token
    top: dict[int, float] | None = None  # token → raw log-probability, the k most likely plus the chosen one


def presence_frequency(scores: torch.Tensor, output_ids: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI penalties: z_i − presence·[c_i > 0] − frequency·c_i, c_i = count of token i in the output."""
    if not output_ids:
        return scores
    counts = torch.bincount(torch.tensor(output_ids, device=scores.device), minlength=scores.shape[-1])
    counts = counts[: scores.shape[-1]].to(scores.dtype)
    return scores - presence * (counts > 0).to(scores.dtype) - frequency * counts


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, attention: str = "paged",
                 fused: bool = True, huge_pages: bool = True) -> None:
        if attention not in ("paged", "gather"):
            raise ValueError(f"attention={attention!r} must be 'paged' or 'gather'")
        self.model, self.cache = model, cache
        cfg = model.config
        # a position bias (ALiBi) is computed by the model over the keys it is given: only gather mode gives them
        self.mode = "gather" if getattr(cfg, "position_type", "rope") == "alibi" else attention
        self.window = getattr(cfg, "sliding_window", None)
        self.device = next(model.parameters()).device
        self.split_head = hasattr(model, "model") and hasattr(model, "lm_head")
        # the flat forward of fused.py for the LLaMA family; the model's own forward is the reference
        self.fused = FusedForward(model) if fused and fused_supports(model) else None
        if huge_pages and self.device.type == "cpu":  # a decode step streams every weight: 2 MiB pages, fewer misses
            hugepages.rehome(hugepages.module_tensors(model) + (self.fused.tensors() if self.fused else []))
        # up to `max_rows` tokens a step (a decode batch, a speculative verification, a short prefill): one native
        # call for all layers (decode_fast; FusedForward is its twin)
        self.fast_step = DecodeStep(model, self.fused) if fused and decode_supports(model, self.fused, cache.kv) else None

    @torch.inference_mode()
    def forward(self, seqs: Seq[Sequence], num_new: Seq[int]) -> tuple[list[Sequence], torch.Tensor]:
        """(sequences that get a next token, their logits [S, V] in fp32); a sequence with draft tokens gets
        1 + len(draft) consecutive rows (its pending token, then each draft token)."""
        order = sorted(range(len(seqs)), key=lambda i: num_new[i] != 1)  # stable: decodes first
        ids: list[int] = []
        positions: list[int] = []
        tables, starts, lengths = [], [], []
        rows: list[int] = []
        wanted: list[Sequence] = []
        for i in order:
            seq, n = seqs[i], num_new[i]
            s = seq.num_computed
            ids.extend((seq.token_ids + seq.draft if seq.draft else seq.token_ids)[s:s + n])
            positions.extend(range(s, s + n))
            tables.append(seq.block_table)
            starts.append(s)
            lengths.append(n)
            if s + n == seq.num_scheduled_tokens:
                # a speculating sequence wants the logits of its pending token and of every draft token
                rows.extend(range(len(ids) - 1 - len(seq.draft), len(ids)))
                wanted.append(seq)
        if self.fast_step is not None and len(ids) <= self.fast_step.max_rows:
            # a few tokens (a decode batch, a speculative verification, a short prefill): one native call
            row_tables = [t for t, n in zip(tables, lengths, strict=True) for _ in range(n)]
            h = self.fast_step.rows(ids, positions, row_tables, self.cache.kv)
            if not rows:
                return [], torch.empty(0)
            return wanted, self.fast_step.logits(h if len(rows) == len(ids) else h[rows])
        meta = build_paged_meta(tables, starts, lengths, self.cache.block_size, self.mode, self.window, self.device)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        if self.fused is not None:
            h = self.fused(input_ids[0], pos[0], self.cache, meta, max(positions))
            if not rows:
                return [], torch.empty(0)
            return wanted, apply_linear(self.model.lm_head, h if len(rows) == len(ids) else h[rows]).float()
        if not rows:
            if self.split_head:
                self.model.model(input_ids, pos, self.cache, meta)
            else:
                self.model(input_ids, pos, cache=self.cache, attn_meta=meta)
            return [], torch.empty(0)
        if self.split_head:  # LM head only where a token is sampled
            h = self.model.model(input_ids, pos, self.cache, meta)[0]
            logits = self.model.lm_head(h if len(rows) == len(ids) else h[rows])
        else:
            logits = self.model(input_ids, pos, cache=self.cache, attn_meta=meta)[0, rows]
        return wanted, logits.float()

    @torch.inference_mode()
    def sample(self, seqs: Seq[Sequence], rows: Seq[int], logits: torch.Tensor) -> list[Sampled]:
        """One token for every sequence seqs[j] from logits[rows[j]] (several sequences may share a row: the
        samples of a freshly forked request)."""
        out: list[Sampled | None] = [None] * len(seqs)
        plain = [j for j, s in enumerate(seqs) if s.request.plain_greedy]
        if plain:
            picks = logits[[rows[j] for j in plain]].argmax(-1).tolist()
            for j, t in zip(plain, picks, strict=True):
                out[j] = Sampled(t)
        for j, seq in enumerate(seqs):
            if out[j] is None:
                out[j] = Sampled(self._sample_one(seq, logits[rows[j]:rows[j] + 1]))
        if any(s.request.params.logprobs is not None for s in seqs):
            logp = torch.log_softmax(logits, dim=-1)
            for j, seq in enumerate(seqs):
                k = seq.request.params.logprobs
                if k is None:
                    continue
                row = logp[rows[j]]
                res = out[j]
                res.logprob = float(row[res.token])
                top = {}
                if k:
                    vals, idx = torch.topk(row, min(k, row.shape[-1]))
                    top = dict(zip(idx.tolist(), vals.tolist(), strict=True))
                top[res.token] = res.logprob
                res.top = top
        return out  # type: ignore[return-value]

    def _sample_one(self, seq: Sequence, scores: torch.Tensor) -> int:
        p = seq.request.params
        penalties, warpers = seq.request.chains
        ids = None
        if penalties:
            ids = torch.tensor([seq.token_ids], dtype=torch.long, device=scores.device)
            scores = apply_processors(penalties, ids, scores)
        if p.has_penalties:
            scores = presence_frequency(scores, seq.output_ids, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            return int(scores.argmax(-1))
        if warpers:
            if ids is None:
                ids = torch.tensor([seq.token_ids], dtype=torch.long, device=scores.device)
            scores = apply_processors(warpers, ids, scores)
        probs = scores.float().softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator))
