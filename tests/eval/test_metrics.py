"""Metrics equal the reference implementations (rouge-score) and hand-computed values."""

from __future__ import annotations

import math
import random

import pytest

from tinyllm.eval import metrics


def test_perplexity_is_exp_of_mean_nll() -> None:
    assert metrics.perplexity(3 * math.log(8), 3) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="num_tokens=0"):
        metrics.perplexity(1.0, 0)


def test_lcs_against_brute_force() -> None:
    from itertools import combinations

    rng = random.Random(0)
    for _ in range(50):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        subs = {tuple(a[i] for i in idx) for n in range(len(a) + 1) for idx in combinations(range(len(a)), n)}

        def is_sub(s, t):
            it = iter(t)
            return all(x in it for x in s)

        assert metrics.lcs_length(a, b) == max(len(s) for s in subs if is_sub(s, b))


def test_rouge_l_equals_rouge_score() -> None:
    from rouge_score import rouge_scorer

    class Chars:
        def tokenize(self, text):
            return [c for c in text if not c.isspace()]

    ref_char = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Chars())
    ref_word = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("张滩镇积极开展民兵训练", "张滩镇积极开展基干民兵训练活动"), ("不用电池的手机", "手机不用电池"),
             ("完全不同", "毫无关系"), ("the cat sat on the mat", "the cat is on a mat")]
    for cand, ref in pairs:
        ours = metrics.rouge_l(cand, ref, "char")
        theirs = ref_char.score(ref, cand)["rougeL"]
        assert (ours.precision, ours.recall) == pytest.approx((theirs.precision, theirs.recall))
        assert ours.fmeasure == pytest.approx(theirs.fmeasure)
    ours = metrics.rouge_l(pairs[3][0], pairs[3][1], "word")
    assert ours.fmeasure == pytest.approx(ref_word.score(pairs[3][1], pairs[3][0])["rougeL"].fmeasure)
    assert metrics.mean_rouge_l(["ab", ""], ["ab", "x"]) == pytest.approx(0.5)


def test_accuracy_and_majority_baseline() -> None:
    assert metrics.accuracy([1, 2, 2], [1, 2, 0]) == pytest.approx(2 / 3)
    assert metrics.majority_baseline([1, 1, 0], [1, 0, 1, 1]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        metrics.accuracy([], [])
