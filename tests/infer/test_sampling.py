"""Logits processors and samplers (notes ch.02.13.b, 02.15.b–e): parity with transformers' warpers, the
nucleus boundary conventions, the notes' temperature example, and frequencies of actual draws (χ²)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import logits_process as hf

from tinyllm.infer.sampling import (
    EncoderRepetitionPenalty,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    build_processors,
    make_generator,
    sample,
)


def _logits(b: int = 6, v: int = 50, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(b, v, generator=torch.Generator().manual_seed(seed))


def _ids(b: int = 6, v: int = 50, n: int = 12) -> torch.Tensor:
    return torch.randint(0, v, (b, n), generator=torch.Generator().manual_seed(1))


# The processors below are compared bit for bit with transformers': each applies the same torch ops (sort,
# softmax, cumsum, masked_fill, division) to the same shapes, so both round identically on any CPU.
@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 2.5])
def test_temperature_parity(t: float) -> None:
    x, ids = _logits(), _ids()
    assert torch.equal(Temperature(t)(ids, x), hf.TemperatureLogitsWarper(t)(ids, x.clone()))


@pytest.mark.parametrize(("k", "keep"), [(1, 1), (5, 1), (2, 3), (50, 1), (80, 1)])
def test_top_k_parity(k: int, keep: int) -> None:
    x, ids = _logits(), _ids()
    assert torch.equal(TopK(k, keep)(ids, x), hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(ids, x.clone()))


@pytest.mark.parametrize(("p", "keep"), [(0.1, 1), (0.5, 1), (0.9, 1), (0.95, 3), (1.0, 1), (0.01, 2)])
def test_top_p_parity(p: float, keep: int) -> None:
    x, ids = _logits(), _ids()
    assert torch.equal(TopP(p, keep)(ids, x), hf.TopPLogitsWarper(p, min_tokens_to_keep=keep)(ids, x.clone()))


@pytest.mark.parametrize(("p", "keep"), [(0.0, 1), (0.05, 1), (0.3, 1), (0.9, 2), (1.0, 1)])
def test_min_p_parity(p: float, keep: int) -> None:
    x, ids = _logits(), _ids()
    assert torch.equal(MinP(p, keep)(ids, x), hf.MinPLogitsWarper(p, min_tokens_to_keep=keep)(ids, x.clone()))


@pytest.mark.parametrize("theta", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_parity(theta: float) -> None:
    x, ids = _logits(), _ids()
    want = hf.RepetitionPenaltyLogitsProcessor(theta)(ids, x.clone())
    assert torch.equal(RepetitionPenalty(theta)(ids, x), want)
    # CTRL: seen positive logits shrink, seen negative ones grow in magnitude, unseen stay
    if theta > 1:
        seen = torch.zeros_like(x, dtype=torch.bool).scatter(1, ids, True)
        assert torch.all(want[seen] < x[seen]) and torch.equal(want[~seen], x[~seen])


@pytest.mark.parametrize("theta", [0.5, 1.3, 2.0])
def test_encoder_repetition_penalty_parity(theta: float) -> None:
    x, prompt = _logits(), _ids(n=7)
    want = hf.EncoderRepetitionPenaltyLogitsProcessor(theta, prompt)(_ids(), x.clone())
    assert torch.equal(EncoderRepetitionPenalty(theta, prompt)(_ids(), x), want)
    if theta > 1:  # the prompt's tokens gain, the rest stay
        seen = torch.zeros_like(x, dtype=torch.bool).scatter(1, prompt, True)
        assert torch.all(want[seen] > x[seen]) and torch.equal(want[~seen], x[~seen])
    # beams: 3 rows of logits per prompt row use that row's prompt
    beams = _logits(b=18)
    assert torch.equal(EncoderRepetitionPenalty(theta, prompt)(None, beams),
                       hf.EncoderRepetitionPenaltyLogitsProcessor(theta, prompt)(None, beams.clone()))


@pytest.mark.parametrize("n", [1, 2, 3, 13])
def test_no_repeat_ngram_parity(n: int) -> None:
    x, ids = _logits(v=8), _ids(v=8, n=12)  # 8 tokens: n-grams recur
    want = hf.NoRepeatNGramLogitsProcessor(n)(ids, x.clone())
    assert torch.equal(NoRepeatNGram(n)(ids, x), want)
    if n == 2:
        assert torch.isinf(want).any()
    # start=P reads only the columns from P on: transformers' processor on that slice
    assert torch.equal(NoRepeatNGram(n, start=5)(ids, x), hf.NoRepeatNGramLogitsProcessor(n)(ids[:, 5:], x.clone()))


def test_chain_parity_with_transformers_order() -> None:
    x, ids = _logits(), _ids()
    chain = build_processors(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05,
                             repetition_penalty=1.2)
    want = x.clone()
    for proc in (hf.RepetitionPenaltyLogitsProcessor(1.2), hf.TemperatureLogitsWarper(0.7),
                 hf.TopKLogitsWarper(10), hf.TopPLogitsWarper(0.8), hf.MinPLogitsWarper(0.05)):
        want = proc(ids, want)
    assert torch.equal(apply_processors(chain, ids, x), want)
    # the encoder penalty runs first, as in transformers
    prompt = _ids(n=5)
    chain = build_processors(do_sample=False, repetition_penalty=1.2, encoder_repetition_penalty=1.5,
                             prompt_ids=prompt)
    want = hf.RepetitionPenaltyLogitsProcessor(1.2)(ids, hf.EncoderRepetitionPenaltyLogitsProcessor(1.5, prompt)(
        ids, x.clone()))
    assert torch.equal(apply_processors(chain, ids, x), want)
    with pytest.raises(ValueError, match="prompt_ids"):
        build_processors(do_sample=False, encoder_repetition_penalty=1.5)
    # greedy decoding keeps only the non-warping processors
    assert [type(p) for p in build_processors(do_sample=False, temperature=0.5, top_k=3,
                                              repetition_penalty=1.1)] == [RepetitionPenalty]


def _kept(proc, probs: list[float]) -> int:
    x = torch.tensor([probs]).log()
    return int(torch.isfinite(proc(None, x)).sum())


def test_nucleus_boundary_conventions() -> None:
    """Mass exactly p: transformers (and the notes' 02.15.c shift trick) keep the smallest set reaching p;
    LLaMA's `sample_top_p` (02.13.b: drop where cumsum − p_i > p) keeps one more token."""
    probs, p = [0.5, 0.25, 0.25], 0.75
    assert _kept(TopP(p), probs) == 2
    assert _kept(hf.TopPLogitsWarper(p), probs) == 2
    sorted_p = torch.tensor(probs).sort(descending=True).values
    cum = sorted_p.cumsum(0)
    llama_keep = ~(cum - sorted_p > p)
    shift_keep = torch.cat([torch.tensor([True]), (cum < p)[:-1]])  # keep cumsum < p, plus the first crossing
    assert int(llama_keep.sum()) == 3 and int(shift_keep.sum()) == 2
    # away from the boundary every convention agrees
    assert _kept(TopP(0.6), [0.5, 0.25, 0.125, 0.125]) == 2


def test_notes_temperature_example_discrepancy() -> None:
    """Notes 02.15.e: probabilities 女孩 .664, 鞋子 .199, 大象 .105, …; top-k 3, top-p 0.8, T 0.7.
    The notes' 0.660/0.340 comes from softmax(prob / T) — temperature applied to probabilities. tinyllm (like
    transformers) applies T to logits, p_i ∝ p_i^{1/T}, which gives 0.848/0.152 for the same kept pair."""
    probs = torch.tensor([0.664, 0.199, 0.105, 0.008, 0.008, 0.008, 0.008])
    chain = build_processors(do_sample=True, temperature=0.7, top_k=3, top_p=0.8)
    out = apply_processors(chain, None, probs.log()[None]).softmax(-1)[0]
    assert torch.isfinite(apply_processors(chain, None, probs.log()[None])).sum() == 2  # 女孩, 鞋子
    assert out[:2].tolist() == pytest.approx([0.848, 0.152], abs=5e-4)
    notes = torch.softmax(probs[:2] / 0.7, dim=0)  # the notes' arithmetic
    assert notes.tolist() == pytest.approx([0.660, 0.340], abs=5e-4)
    p1 = 0.664 ** (1 / 0.7) / (0.664 ** (1 / 0.7) + 0.199 ** (1 / 0.7))
    assert out[0].item() == pytest.approx(p1, abs=1e-5)


def test_samples_follow_renormalised_distribution() -> None:
    """χ² goodness of fit: draws after top-k/top-p follow the renormalised kept probabilities."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    chain = build_processors(do_sample=True, temperature=0.9, top_k=5, top_p=0.85)
    scores = apply_processors(chain, None, logits[None])
    expected_p = scores.softmax(-1)[0]
    n = 40_000
    draws = sample(scores.expand(n, -1), make_generator(0))
    counts = torch.bincount(draws, minlength=6).double()
    kept = expected_p > 0
    assert counts[~kept].sum() == 0  # removed tokens are never drawn
    expected = n * expected_p[kept].double()
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    # 99.9th percentile of χ²(df) by the Wilson–Hilferty approximation
    z = 3.09
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert df >= 2 and chi2 < limit, (chi2, limit)


def test_seeded_generator_reproducible() -> None:
    x = _logits()
    a = sample(x, make_generator(3))
    b = sample(x, make_generator(3))
    assert torch.equal(a, b)
    assert make_generator(None) is None


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: Temperature(0.0), "temperature=0.0"),
    (lambda: TopK(0), "top_k=0"),
    (lambda: TopP(1.2), "top_p=1.2"),
    (lambda: MinP(-0.1), "min_p=-0.1"),
    (lambda: RepetitionPenalty(0.0), "repetition_penalty=0.0"),
    (lambda: NoRepeatNGram(0), "no_repeat_ngram_size=0"),
    (lambda: EncoderRepetitionPenalty(-1.0, torch.zeros(1, 1, dtype=torch.long)), "encoder_repetition_penalty=-1.0"),
])
def test_bad_values_are_named(make, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        make()
