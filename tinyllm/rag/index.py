"""Retrieval indexes and rank fusion (notes ch.08.1.c-d vector index, ch.08.1.g hybrid search extension).

`BM25Index` (sparse keyword scoring, `tinyllm.rag.bm25`) and `DenseIndex` (exact / faiss vector search,
`tinyllm.rag.dense`) are re-exported here; this module adds the two ways to merge their result lists.

- Reciprocal rank fusion (Cormack, Clarke & Büttcher 2009): score(d) = Σ_lists 1 / (k + rank_list(d)), ranks
  from 1, k = 60. It uses only ranks, so BM25 scores (unbounded) and cosine similarities (in [−1, 1]) mix
  without calibration; a document missing from a list simply gets nothing from it. k damps the head: with
  k = 60, rank 1 earns 1/61 and rank 10 earns 1/70, so agreement between lists beats one list's top spot.
- Weighted score fusion: normalise each list's scores ("minmax" to [0, 1], "zscore", or "none"), then
  Σ w_i · score_i; a document missing from a list contributes 0 there. Sensitive to score distributions,
  which is why RRF is the default of hybrid search.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from tinyllm.rag.bm25 import BM25Index, bm25_naive_scores, tokenize_en, tokenize_zh
from tinyllm.rag.dense import DenseIndex

__all__ = ["BM25Index", "DenseIndex", "bm25_naive_scores", "reciprocal_rank_fusion", "tokenize_en",
           "tokenize_zh", "weighted_score_fusion"]

NORMALIZATIONS = ("minmax", "zscore", "none")


def _ids_of(ranking: Sequence[Any]) -> list[Hashable]:
    """A ranking is a list of ids or of (id, score) pairs."""
    return [r[0] if isinstance(r, tuple) else r for r in ranking]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Any]], k: int = 60) -> list[tuple[Hashable, float]]:
    """Fused (id, Σ 1/(k + rank)) best first; ties go to the id seen first (list order, then rank)."""
    if not isinstance(k, (int, float)) or k < 0:
        raise ValueError(f"k={k!r} must be a number >= 0")
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        ids = _ids_of(ranking)
        if len(set(ids)) != len(ids):
            raise ValueError("a ranking lists the same id twice")
        for rank, doc in enumerate(ids, 1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    order = {doc: i for i, doc in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def _normalize(values: np.ndarray, how: str) -> np.ndarray:
    if how == "none" or len(values) == 0:
        return values
    if how == "minmax":
        lo, hi = values.min(), values.max()
        return np.ones_like(values) if hi == lo else (values - lo) / (hi - lo)
    sd = values.std()
    return np.zeros_like(values) if sd == 0 else (values - values.mean()) / sd


def weighted_score_fusion(score_lists: Sequence[Sequence[tuple[Hashable, float]] | Mapping[Hashable, float]],
                          weights: Sequence[float] | None = None,
                          normalize: str = "minmax") -> list[tuple[Hashable, float]]:
    """Fused (id, Σ w_i · normalised score_i) best first; ties go to the id seen first."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} must be one of {NORMALIZATIONS}")
    weights = [1.0] * len(score_lists) if weights is None else list(weights)
    if len(weights) != len(score_lists):
        raise ValueError(f"{len(weights)} weights for {len(score_lists)} score lists")
    fused: dict[Hashable, float] = {}
    for w, lst in zip(weights, score_lists):
        pairs = list(lst.items()) if isinstance(lst, Mapping) else [tuple(p) for p in lst]
        norm = _normalize(np.array([s for _, s in pairs], dtype=np.float64), normalize)
        for (doc, _), s in zip(pairs, norm):
            fused[doc] = fused.get(doc, 0.0) + w * float(s)
    order = {doc: i for i, doc in enumerate(fused)}
    return sorted(fused.items(), key=lambda kv: (-kv[1], order[kv[0]]))
