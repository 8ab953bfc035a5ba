"""Retrieval metrics: the course's worked example exactly, nDCG against scikit-learn, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyllm.rag.metrics import (
    average_precision,
    evaluate_rankings,
    hit_at_k,
    mean_average_precision,
    mean_reciprocal_rank,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ranking_with_hits(hit_ranks: list[int], length: int, prefix: str) -> list[str]:
    """A ranking of `length` ids where positions in hit_ranks (1-based) hold relevant ids r0, r1, ..."""
    out, j = [], 0
    for i in range(1, length + 1):
        if i in hit_ranks:
            out.append(f"{prefix}r{j}")
            j += 1
        else:
            out.append(f"{prefix}n{i}")
    return out


def test_course_worked_example_mrr():
    # cat, torus, virus: first relevant document at ranks 3, 2, 1
    rankings = [_ranking_with_hits([3], 5, "cat"), _ranking_with_hits([2], 5, "torus"),
                _ranking_with_hits([1], 5, "virus")]
    relevant = [{"catr0"}, {"torusr0"}, {"virusr0"}]
    assert mean_reciprocal_rank(rankings, relevant) == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert round(mean_reciprocal_rank(rankings, relevant), 3) == 0.611


def test_course_worked_example_map():
    q1 = _ranking_with_hits([1, 2, 4, 7], 10, "a")          # 4 relevant, all retrieved
    q2 = _ranking_with_hits([1, 3, 5], 10, "b")             # 5 relevant, only 3 retrieved
    rel1 = {f"ar{i}" for i in range(4)}
    rel2 = {f"br{i}" for i in range(5)}
    ap1, ap2 = average_precision(q1, rel1), average_precision(q2, rel2)
    assert ap1 == pytest.approx((1 + 1 + 3 / 4 + 4 / 7) / 4)
    assert ap2 == pytest.approx((1 + 2 / 3 + 3 / 5) / 5)
    assert (round(ap1, 3), round(ap2, 3)) == (0.830, 0.453)
    assert round(mean_average_precision([q1, q2], [rel1, rel2]), 3) == 0.642
    # the lecture's wording ("reciprocal ranks") would give (1 + 1/2 + 1/4 + 1/7)/4 — not AP
    assert ap1 != pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 7) / 4)


def test_recall_hit_and_cutoffs():
    r = ["a", "b", "c", "d"]
    assert recall_at_k(r, {"b", "d", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(r, {"b", "d", "z"}, 4) == pytest.approx(2 / 3)
    assert hit_at_k(r, {"c"}, 2) == 0.0 and hit_at_k(r, {"c"}, 3) == 1.0
    assert reciprocal_rank(r, {"c"}, k=2) == 0.0 and reciprocal_rank(r, {"c"}) == pytest.approx(1 / 3)
    assert reciprocal_rank(["a", "a", "b"], {"b"}) == pytest.approx(1 / 2)  # duplicates count once
    assert recall_at_k(r, set(), 3) == 0.0


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_ndcg_equals_sklearn(k):
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the nDCG reference")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 12
        grades = rng.integers(0, 4, size=n).astype(float)
        scores = rng.permutation(n).astype(float)  # distinct scores: no tie handling differences
        ranking = list(np.argsort(-scores))
        ours = ndcg_at_k(ranking, {i: g for i, g in enumerate(grades)}, k=k)
        ref = sk.ndcg_score(grades[None], scores[None], k=k)
        assert ours == pytest.approx(ref, abs=1e-12)


def test_ndcg_closed_form_and_gain():
    # relevant at rank 2 only: 1/log2(3)
    assert ndcg_at_k(["x", "a"], {"a"}, k=10) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(["a", "b"], {"a": 2, "b": 1}, gain="exponential") == pytest.approx(1.0)
    got = ndcg_at_k(["b", "a"], {"a": 2, "b": 1}, gain="exponential")
    assert got == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))


def test_evaluate_rankings_keys_and_bad_input():
    out = evaluate_rankings([["a", "b"], ["c", "d"]], [{"b"}, {"z"}], ks=(1, 2))
    assert out == pytest.approx({"recall@1": 0.0, "recall@2": 0.5, "mrr": 0.25, "map": 0.25,
                                 "ndcg@10": 0.5 / math.log2(3)})
    with pytest.raises(ValueError, match="k=0"):
        recall_at_k(["a"], {"a"}, 0)
    with pytest.raises(ValueError, match="2 rankings vs 1"):
        mean_reciprocal_rank([["a"], ["b"]], [{"a"}])
    with pytest.raises(ValueError, match="gain='log'"):
        ndcg_at_k(["a"], {"a"}, gain="log")
