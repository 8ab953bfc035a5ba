"""Retrieval on top of a store: fusion, query rewriting, reranking and MMR diversification (notes ch.08.1.f
"query transformations", ch.08.1.g "post-retrieval ranking"; ch.98.6.a two-stage retrieval).

The pipeline of `Retriever.search(query, k)`:

1. query rewriting (optional, through any LLM callable `llm(prompt) -> text`):
   - multi-query: the LLM writes n paraphrases; each is searched and the lists are merged (the notes'
     "synonymous rewriting": a paraphrase reaches documents worded differently from the question);
   - HyDE (Gao et al. 2022): the LLM writes a hypothetical answer passage and that passage is searched —
     an answer looks more like the documents than a question does (and can mislead when the LLM is wrong,
     so the original query is always searched too);
2. first stage: `store.search(q, k=fetch_k, mode)` for every query (BM25, dense or hybrid; the store's
   hybrid mode fuses BM25 and dense by reciprocal rank fusion);
3. fusion of the per-query lists with `reciprocal_rank_fusion` (or `weighted_score_fusion`) from `index.py`;
4. second stage (optional): a reranker scores (query, passage) pairs jointly — here an LLM relevance score,
   log P("是"/"yes") − log P("否"/"no") after a relevance prompt, or any callable;
5. MMR (Carbonell & Goldstein 1998): pick greedily
       d* = argmax_{d ∉ S} λ·sim(q, d) − (1 − λ)·max_{s ∈ S} sim(d, s)
   λ = 1 is plain relevance order, λ = 0 pure novelty; it keeps near-duplicate chunks from filling the
   context window.

A `Hit` is the store's (doc_id, chunk_id, text, start, end, score, source, metadata); fused and reranked
hits are copies with the new score. Not covered: query decomposition / multi-step self-ask, time-weighted
scores, metadata filters (the store's job).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from tinyllm.rag.index import reciprocal_rank_fusion, weighted_score_fusion

LLMFn = Callable[[str], str]
FUSIONS = ("rrf", "weighted")

MULTI_QUERY_PROMPT = (
    "请把下面的问题改写成 {n} 个意思相同、措辞不同的搜索查询，每行一个，不要编号，不要解释。\n"
    "Rewrite the question below as {n} search queries with the same meaning and different wording, "
    "one per line, no numbering.\n问题 / Question: {question}\n")
HYDE_PROMPT = (
    "请写一段可能回答下面问题的短文（像百科或新闻的一段）。\n"
    "Write a short passage (encyclopedia or news style) that would answer the question.\n"
    "问题 / Question: {question}\n短文 / Passage:")
RELEVANCE_PROMPT = (
    "文档：{passage}\n问题：{query}\n这篇文档与问题相关吗？请回答“是”或“否”。\n答案：")


class Searchable(Protocol):
    def search(self, query: str, k: int = 10, mode: str = "hybrid") -> list[Any]: ...


def _rescored(hit: Any, score: float) -> Any:
    return dataclasses.replace(hit, score=float(score))


def fuse_hits(hit_lists: Sequence[Sequence[Any]], method: str = "rrf", k: int = 60,
              weights: Sequence[float] | None = None, normalize: str = "minmax") -> list[Any]:
    """Merge hit lists by chunk id with RRF (Σ 1/(k + rank)) or weighted normalised scores; each chunk
    appears once, with the fused score, best first. The Hit object kept is the first one seen."""
    if method not in FUSIONS:
        raise ValueError(f"fusion method={method!r} is not one of {list(FUSIONS)}")
    first: dict[str, Any] = {}
    for hits in hit_lists:
        for h in hits:
            first.setdefault(h.chunk_id, h)
    if method == "rrf":
        fused = reciprocal_rank_fusion([[h.chunk_id for h in hits] for hits in hit_lists], k=k)
    else:
        fused = weighted_score_fusion([[(h.chunk_id, h.score) for h in hits] for hits in hit_lists],
                                      weights=weights, normalize=normalize)
    return [_rescored(first[cid], s) for cid, s in fused]


# ------------------------------------------------------------------ MMR
def mmr_naive(query_vec: np.ndarray, doc_vecs: np.ndarray, k: int, lambda_: float = 0.5) -> list[int]:
    """The reference: recompute every candidate's MMR value from scratch at each pick."""
    _check_mmr(doc_vecs, k, lambda_)
    rel = doc_vecs @ query_vec
    chosen: list[int] = []
    while len(chosen) < min(k, len(doc_vecs)):
        best, best_val = -1, -np.inf
        for i in range(len(doc_vecs)):
            if i in chosen:
                continue
            red = max((float(doc_vecs[i] @ doc_vecs[j]) for j in chosen), default=0.0)
            val = lambda_ * float(rel[i]) - (1 - lambda_) * red
            if val > best_val:
                best, best_val = i, val
        chosen.append(best)
    return chosen


def mmr(query_vec: np.ndarray, doc_vecs: np.ndarray, k: int, lambda_: float = 0.5) -> list[int]:
    """Indices picked by maximal marginal relevance; O(n·k) with a running max-similarity vector.
    Equal to `mmr_naive` (ties go to the lowest index in both)."""
    _check_mmr(doc_vecs, k, lambda_)
    n = len(doc_vecs)
    rel = (doc_vecs @ query_vec).astype(np.float64)
    red = np.zeros(n)  # max similarity to anything chosen so far (0 before the first pick)
    taken = np.zeros(n, dtype=bool)
    chosen: list[int] = []
    for _ in range(min(k, n)):
        val = lambda_ * rel - (1 - lambda_) * red
        val[taken] = -np.inf
        i = int(np.argmax(val))
        chosen.append(i)
        taken[i] = True
        sims = (doc_vecs @ doc_vecs[i]).astype(np.float64)
        red = sims if len(chosen) == 1 else np.maximum(red, sims)
    return chosen


def _check_mmr(doc_vecs: np.ndarray, k: int, lambda_: float) -> None:
    if doc_vecs.ndim != 2:
        raise ValueError(f"doc_vecs has shape {doc_vecs.shape}, expected [n, dim]")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r} must be a positive integer")
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_={lambda_!r} must be in [0, 1]")


# ------------------------------------------------------------------ query rewriting
def parse_lines(text: str, limit: int) -> list[str]:
    """Non-empty lines with list markers ("1.", "-", "•", "（1）") stripped; duplicates dropped."""
    out: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.、)）]|[（(]\d+[)）])\s*", "", line).strip()
        if line and line not in out:
            out.append(line)
    return out[:limit]


def multi_query(question: str, llm: LLMFn, n: int = 3) -> list[str]:
    """The question followed by up to n distinct LLM paraphrases."""
    if n < 1:
        raise ValueError(f"n={n!r} must be >= 1")
    rewrites = [q for q in parse_lines(llm(MULTI_QUERY_PROMPT.format(n=n, question=question)), n) if q != question]
    return [question, *rewrites]


def hyde(question: str, llm: LLMFn) -> str:
    """The LLM's hypothetical answer passage (searched in place of, and next to, the question)."""
    return llm(HYDE_PROMPT.format(question=question)).strip()


# ------------------------------------------------------------------ rerankers
class LLMRelevanceReranker:
    """Pointwise LLM relevance: score = log P(yes-token) − log P(no-token) at the answer position of
    `RELEVANCE_PROMPT` (a cross-encoder in spirit: query and passage are read together by one model).

    `model` is a tinyllm CausalLM (`model(ids) -> logits [B, T, V]`) and `tokenizer` its tokenizer; the first
    token of each of `yes` / `no` is compared. Passages are cut to `max_passage_chars`.
    """

    def __init__(self, model: Any, tokenizer: Any, yes: str = "是", no: str = "否",
                 max_passage_chars: int = 400, template: str = RELEVANCE_PROMPT) -> None:
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.yes_id, self.no_id = tokenizer.encode(yes)[0], tokenizer.encode(no)[0]
        if self.yes_id == self.no_id:
            raise ValueError(f"yes={yes!r} and no={no!r} start with the same token")
        self.max_passage_chars = max_passage_chars

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        import torch

        out = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for p in passages:  # one at a time: no padding enters causal attention
                ids = self.tokenizer.encode(self.template.format(passage=p[:self.max_passage_chars], query=query))
                logits = self.model(torch.tensor([ids], device=device))[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                out.append(float(logp[self.yes_id] - logp[self.no_id]))
        return out


def rerank(query: str, hits: Sequence[Any], scorer: Any, top_n: int | None = None) -> list[Any]:
    """Hits re-sorted by `scorer.score(query, texts)` (or `scorer(query, texts)`), best first; stable on ties."""
    texts = [h.text for h in hits]
    scores = scorer.score(query, texts) if hasattr(scorer, "score") else scorer(query, texts)
    if len(scores) != len(hits):
        raise ValueError(f"reranker returned {len(scores)} scores for {len(hits)} hits")
    order = sorted(range(len(hits)), key=lambda i: -scores[i])
    out = [_rescored(hits[i], scores[i]) for i in order]
    return out if top_n is None else out[:top_n]


# ------------------------------------------------------------------ the retriever
@dataclasses.dataclass
class Retriever:
    """store → (rewrites) → first-stage lists → fusion → (rerank) → (MMR) → top k. See the module docstring."""

    store: Searchable
    mode: str = "hybrid"
    fetch_k: int = 20
    fusion: str = "rrf"
    rrf_k: int = 60
    llm: LLMFn | None = None
    multi_query: int = 0  # number of LLM paraphrases (0: off)
    hyde: bool = False
    reranker: Any = None
    mmr_lambda: float | None = None  # None: no MMR
    embedder: Any = None  # for MMR; defaults to the store's embedder

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r} is not one of {list(FUSIONS)}")
        if (self.multi_query or self.hyde) and self.llm is None:
            raise ValueError("multi_query / hyde rewrite the query with an LLM: pass llm=")
        if self.mmr_lambda is not None and not 0.0 <= self.mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda={self.mmr_lambda!r} must be in [0, 1]")

    def queries(self, query: str) -> list[str]:
        qs = multi_query(query, self.llm, self.multi_query) if self.multi_query else [query]
        if self.hyde:
            qs.append(hyde(query, self.llm))  # type: ignore[arg-type]
        return qs

    def search(self, query: str, k: int = 5) -> list[Any]:
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k={k!r} must be a positive integer")
        lists = [self.store.search(q, k=max(k, self.fetch_k), mode=self.mode) for q in self.queries(query)]
        hits = lists[0] if len(lists) == 1 else fuse_hits(lists, self.fusion, self.rrf_k)
        if self.reranker is not None:
            hits = rerank(query, hits, self.reranker)
        if self.mmr_lambda is not None and len(hits) > 1:
            from tinyllm.rag.embed import encode_queries

            emb = self.embedder or getattr(self.store, "embedder", None)
            if emb is None:
                raise ValueError("MMR needs an embedder: pass embedder= or use a store that has one")
            vecs = emb.encode([h.text for h in hits])
            qv = encode_queries(emb, [query])[0]
            hits = [hits[i] for i in mmr(qv, vecs, k, self.mmr_lambda)]
        return list(hits[:k])
