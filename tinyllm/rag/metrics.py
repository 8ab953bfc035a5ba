"""Retrieval metrics (notes ch.98.6.b "IR metrics": MRR, MAP, NDCG; ch.08.1.m hit-rate/recall@k).

For one query with a ranked list r₁, r₂, … and a set R of relevant documents:

    recall@k    = |R ∩ {r₁..r_k}| / |R|            (hit@k: 1 if any relevant document is in the top k)
    RR          = 1 / rank of the first relevant document (0 if none is retrieved);  MRR = mean over queries
    AP          = (1/|R|) · Σ_{i: r_i ∈ R} precision@i       MAP = mean over queries
    DCG@k       = Σ_{i ≤ k} g(rel_i) / log₂(i + 1),  g = rel ("linear") or 2^rel − 1 ("exponential")
    nDCG@k      = DCG@k / IDCG@k  (IDCG: the same sum over the ideal order of all graded documents)

AP divides by |R|, every relevant document, retrieved or not: a relevant document the ranking never returns
contributes precision 0. The course's worked example (清华大模型公开课 lecture 6), reproduced in the tests:
first relevant hits at ranks 3, 2, 1 give MRR = (1/3 + 1/2 + 1)/3 = 0.611; relevant documents at ranks
1, 2, 4, 7 (4 relevant) give AP = (1/1 + 2/2 + 3/4 + 4/7)/4 = 0.830, ranks 1, 3, 5 with 5 relevant give
AP = (1/1 + 2/3 + 3/5)/5 = 0.453, MAP = 0.642. (The lecture calls the terms of AP "reciprocal ranks"; they
are precisions at the rank of each relevant document.)

A ranking with ties is scored in the order given; duplicate ids count once, at their first position.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

GAINS = ("linear", "exponential")


def _dedupe(ranking: Iterable[Hashable]) -> list[Hashable]:
    seen: set[Hashable] = set()
    out = []
    for d in ranking:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _check_k(k: int | None) -> None:
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
        raise ValueError(f"k={k!r} must be a positive integer or None")


def _top(ranking: Iterable[Hashable], k: int | None) -> list[Hashable]:
    _check_k(k)
    r = _dedupe(ranking)
    return r if k is None else r[:k]


def recall_at_k(ranking: Sequence[Hashable], relevant: Iterable[Hashable], k: int) -> float:
    """Fraction of the relevant documents found in the top k (0 when nothing is relevant)."""
    rel = set(relevant)
    if not rel:
        return 0.0
    return len(rel.intersection(_top(ranking, k))) / len(rel)


def hit_at_k(ranking: Sequence[Hashable], relevant: Iterable[Hashable], k: int) -> float:
    """1.0 if any relevant document is in the top k."""
    rel = set(relevant)
    return float(any(d in rel for d in _top(ranking, k)))


def reciprocal_rank(ranking: Sequence[Hashable], relevant: Iterable[Hashable], k: int | None = None) -> float:
    """1 / (1-based rank of the first relevant document within the top k), or 0."""
    rel = set(relevant)
    for i, d in enumerate(_top(ranking, k), start=1):
        if d in rel:
            return 1.0 / i
    return 0.0


def average_precision(ranking: Sequence[Hashable], relevant: Iterable[Hashable], k: int | None = None) -> float:
    """Σ precision@i over ranks i that hold a relevant document, divided by the number of relevant ones."""
    rel = set(relevant)
    if not rel:
        return 0.0
    found, total = 0, 0.0
    for i, d in enumerate(_top(ranking, k), start=1):
        if d in rel:
            found += 1
            total += found / i
    return total / len(rel)


def _gain(grade: float, gain: str) -> float:
    return grade if gain == "linear" else 2.0 ** grade - 1.0


def ndcg_at_k(ranking: Sequence[Hashable], grades: Mapping[Hashable, float] | Iterable[Hashable],
              k: int | None = 10, gain: str = "linear") -> float:
    """nDCG@k with graded relevance (`grades`: doc → grade; a plain collection means grade 1 each)."""
    if gain not in GAINS:
        raise ValueError(f"gain={gain!r} is not one of {list(GAINS)}")
    g = dict(grades) if isinstance(grades, Mapping) else {d: 1.0 for d in grades}
    for d, v in g.items():
        if v < 0:
            raise ValueError(f"relevance grade {v!r} of {d!r} is negative")
    top = _top(ranking, k)
    dcg = sum(_gain(g.get(d, 0.0), gain) / math.log2(i + 1) for i, d in enumerate(top, start=1))
    ideal = sorted(g.values(), reverse=True)[:len(top) if k is None else k]
    idcg = sum(_gain(v, gain) / math.log2(i + 1) for i, v in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def mean_reciprocal_rank(rankings: Sequence[Sequence[Hashable]], relevant: Sequence[Iterable[Hashable]],
                         k: int | None = None) -> float:
    """MRR over queries (rankings[i] is scored against relevant[i])."""
    _check_pairs(rankings, relevant)
    return sum(reciprocal_rank(r, s, k) for r, s in zip(rankings, relevant)) / len(rankings)


def mean_average_precision(rankings: Sequence[Sequence[Hashable]], relevant: Sequence[Iterable[Hashable]],
                           k: int | None = None) -> float:
    """MAP over queries."""
    _check_pairs(rankings, relevant)
    return sum(average_precision(r, s, k) for r, s in zip(rankings, relevant)) / len(rankings)


def _check_pairs(rankings: Sequence, relevant: Sequence) -> None:
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings vs {len(relevant)} relevance sets")
    if not rankings:
        raise ValueError("no queries to score")


def evaluate_rankings(rankings: Sequence[Sequence[Hashable]], relevant: Sequence[Iterable[Hashable]],
                      ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10) -> dict[str, float]:
    """Mean recall@k for each k, MRR, MAP and nDCG@ndcg_k over queries (binary relevance)."""
    _check_pairs(rankings, relevant)
    rel_sets = [set(s) for s in relevant]
    n = len(rankings)
    out = {f"recall@{k}": sum(recall_at_k(r, s, k) for r, s in zip(rankings, rel_sets)) / n for k in ks}
    out["mrr"] = mean_reciprocal_rank(rankings, rel_sets)
    out["map"] = mean_average_precision(rankings, rel_sets)
    out[f"ndcg@{ndcg_k}"] = sum(ndcg_at_k(r, s, ndcg_k) for r, s in zip(rankings, rel_sets)) / n
    return out
