"""Interpolated Kneser–Ney: exact normalisation, a hand computation, an independent brute-force
implementation of the formulas, NLTK's interpolated KN on bigrams, perplexity bookkeeping, bad input."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from tinyllm.nlp.ngram import BOS, EOS, UNK, KneserNeyLM, estimate_discounts

TOY = [list("abab"), list("abc"), list("bca"), list("aab"), list("cab"), list("ba")]


def _histories(lm, order):
    units = [*sorted(lm.vocab - {EOS}), BOS, "zz"]  # "zz" is unknown
    for k in range(order):
        yield from itertools.product(units, repeat=k)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("modified", [True, False])
def test_every_conditional_sums_to_exactly_one(order, modified):
    lm = KneserNeyLM(order=order, modified=modified, exact=True).fit(TOY)
    checked = 0
    for h in _histories(lm, order):
        assert sum(lm.prob(w, h) for w in lm.vocab) == 1, h
        checked += 1
    assert checked == sum(6**k for k in range(order))  # a, b, c, <unk>, <s>, unknown 'zz'
    # the floating-point model gives the same numbers
    lf = KneserNeyLM(order=order, modified=modified).fit(TOY)
    for h in list(_histories(lm, order))[:50]:
        for w in lm.vocab:
            assert lf.prob(w, h) == pytest.approx(float(lm.prob(w, h)), rel=1e-12)


def test_hand_computed_bigram():
    # <s> a b </s> | <s> a c </s> | <s> b c </s>, plain KN with D = 3/4 at both orders.
    # continuation counts: a ← {<s>} 1, b ← {a, <s>} 2, c ← {a, b} 2, </s> ← {b, c} 2; Σ = 7; |V| = 5
    # P1(b) = (2 − 3/4)/7 + (3/4 · 4/7) · 1/5 = 37/140
    # P2(b|a) = (1 − 3/4)/2 + (3/4 · 2/2) · 37/140 = 181/560
    lm = KneserNeyLM(order=2, discounts=Fraction(3, 4), exact=True).fit([["a", "b"], ["a", "c"], ["b", "c"]])
    assert lm.vocab == {"a", "b", "c", UNK, EOS}
    assert lm.prob("b") == Fraction(37, 140)
    assert lm.prob("b", ["a"]) == Fraction(181, 560)
    assert lm.prob(UNK) == Fraction(3, 35) == lm.prob("never-seen", ["a"]) / Fraction(3, 4)
    assert lm.prob("b", ["zz"]) == lm.prob("b")  # unknown history → <unk>, unseen as a history: γ = 1


def test_modified_discounts_from_count_of_counts():
    # n1..n4 = 10, 4, 2, 1: Y = 10/18 = 5/9; D1 = 1 − 2Y·4/10 = 5/9; D2 = 2 − 3Y·2/4 = 7/6; D3+ = 3 − 4Y/2 = 17/9
    nr = Counter({1: 10, 2: 4, 3: 2, 4: 1})
    assert estimate_discounts(nr, exact=True) == (Fraction(5, 9), Fraction(7, 6), Fraction(17, 9))
    assert estimate_discounts(nr, modified=False, exact=True) == (Fraction(5, 9),) * 3
    assert estimate_discounts(Counter({1: 3}), exact=True)[1:] == (Fraction(1), Fraction(1))  # fallback to Y


def _brute_force(train, order, modified):
    """The formulas written directly from the definitions, scanning the padded text for every count."""
    vocab = {u for s in train for u in s} | {UNK, EOS}
    padded = [[BOS] * (order - 1) + list(s) + [EOS] for s in train]
    grams = {k: [tuple(p[i - k + 1: i + 1]) for p in padded for i in range(order - 1, len(p))]
             for k in range(1, order + 1)}
    full = {k: [tuple(p[i - k: i + 1]) for p in padded for i in range(order - 1, len(p))]
            for k in range(1, order)}  # k-grams with one unit of left context

    def a(k, g):
        if k == order:
            return grams[k].count(g)
        if g[0] == BOS:
            return grams[k].count(g)
        return len({x[0] for x in full[k] if x[1:] == g})

    def seen(k):
        return {g for g in grams[k]}

    def disc(k):
        nr = Counter(a(k, g) for g in seen(k))
        return estimate_discounts(nr, modified, exact=True)

    def p(k, w, h):
        if k == 0:
            return Fraction(1, len(vocab))
        h = h[len(h) - (k - 1):] if k > 1 else ()
        row = {g: a(k, g) for g in seen(k) if g[:-1] == h}
        if not row:
            return p(k - 1, w, h[1:] if h else h)
        total = sum(row.values())
        d = disc(k)
        gamma = sum(d[min(c, 3) - 1] for c in row.values()) / total
        c = row.get((*h, w), 0)
        return (Fraction(c) - d[min(c, 3) - 1] if c else Fraction(0)) / total + gamma * p(k - 1, w, h[1:] if h else h)

    return lambda w, h: p(order, w, tuple(h))


@pytest.mark.parametrize(("order", "modified", "seed"), [(2, True, 0), (3, True, 1), (3, False, 2), (4, True, 3)])
def test_equals_brute_force_formulas(order, modified, seed):
    rng = random.Random(seed)
    train = [[rng.choice("abcd") for _ in range(rng.randint(1, 7))] for _ in range(12)]
    lm = KneserNeyLM(order=order, modified=modified, exact=True).fit(train)
    ref = _brute_force(train, order, modified)
    units = ["a", "b", "c", "d", BOS]
    for h in itertools.chain.from_iterable(itertools.product(units, repeat=k) for k in (order - 1,)):
        if BOS in h and list(h[: h.count(BOS)]) != [BOS] * h.count(BOS):
            continue  # <s> only as left padding
        for w in ["a", "b", "c", "d", EOS, UNK]:
            assert lm.prob(w, h) == ref(w, h), (w, h)


def test_bigram_equals_nltk_interpolated_kneser_ney():
    lm_mod = pytest.importorskip("nltk.lm", reason="NLTK is an optional reference")
    from nltk.lm.preprocessing import padded_everygram_pipeline

    sents = [list("abcab"), list("bcaab"), list("cabd"), list("dab")]
    train, vocab = padded_everygram_pipeline(2, sents)
    ref = lm_mod.KneserNeyInterpolated(2, discount=0.6)
    ref.fit(train, vocab)
    # NLTK's unigram level is the undiscounted continuation distribution (no uniform floor): D1 = 0
    ours = KneserNeyLM(order=2, discounts=[0.0, 0.6]).fit(sents)
    for h in ["a", "b", "c", "d", BOS]:
        for w in ["a", "b", "c", "d", EOS]:
            assert ours.prob(w, [h]) == pytest.approx(ref.score(w, [h]), rel=1e-12), (w, h)


def test_unknowns_min_count_and_perplexity_bookkeeping():
    lm = KneserNeyLM(order=3, min_count=2).fit([*TOY, list("abx")])
    assert "x" not in lm.vocab and UNK in lm.vocab
    assert lm.prob("x", list("ab")) == lm.prob("y", list("ab")) == lm.prob(UNK, list("ab"))
    held = [list("abca"), list("bax")]
    ev = lm.evaluate(held)
    bits = -sum(math.log2(lm.prob(p[i], p[i - 2: i]))
                for s in held for p in [[BOS, BOS, *s, EOS]] for i in range(2, len(p)))
    assert ev["tokens"] == 4 + 1 + 3 + 1
    assert ev["bits_per_token"] == pytest.approx(bits / 9)
    assert ev["perplexity"] == pytest.approx(2 ** (bits / 9)) == lm.perplexity(held)
    assert ev["oov_rate"] == pytest.approx(1 / 9)
    # more context helps on text like the training text
    text = [list("abcab"), list("bcabca"), list("cabcabc"), list("acbacb")]
    ppl = [KneserNeyLM(order=n).fit(text * 3).perplexity(text) for n in (1, 2, 3)]
    assert ppl[0] > ppl[1] > ppl[2]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="order=0"):
        KneserNeyLM(order=0)
    with pytest.raises(ValueError, match="'<s>'"):
        KneserNeyLM().fit([["a", BOS]])
    with pytest.raises(ValueError, match="order 2"):
        KneserNeyLM(order=2, discounts=[0.5, 1.5]).fit([["a", "b"]])
    with pytest.raises(ValueError, match="not trained"):
        KneserNeyLM().prob("a")


@pytest.mark.parametrize(("order", "modified"), [(1, True), (2, False), (3, True), (5, True)])
def test_numpy_engine_equals_python_reference(order, modified):
    rng = random.Random(order)
    train = [[rng.choice("abcdefg") for _ in range(rng.randint(1, 12))] for _ in range(60)]
    held = [[rng.choice("abcdefgh") for _ in range(rng.randint(1, 12))] for _ in range(20)]
    ref = KneserNeyLM(order=order, modified=modified, backend="python").fit(train)
    fast = KneserNeyLM(order=order, modified=modified, backend="numpy").fit(train)
    assert fast._fast is not None and ref._fast is None
    assert fast.discounts == ref.discounts
    for h in itertools.product(["a", "b", "h", BOS], repeat=min(order - 1, 2)):
        for w in [*"abcdefgh", EOS, UNK]:
            assert fast.prob(w, h) == pytest.approx(ref.prob(w, h), rel=1e-13, abs=0), (w, h)
    assert fast.evaluate(held) == pytest.approx(ref.evaluate(held), rel=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        KneserNeyLM(order=40, backend="numpy").fit(train)
