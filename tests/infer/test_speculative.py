"""Speculative decoding (notes ch.06.3.k; Leviathan et al. 2023, Chen et al. 2023): greedy output identical to
target-only greedy for any draft, the rejection rule distribution-preserving (χ² on a 6-token vocabulary),
cache rollback, EOS, self-speculative drafts."""

from __future__ import annotations

import pytest
import torch

from tinyllm.infer.generate import generate
from tinyllm.infer.speculative import (
    SpecStats,
    speculative_generate,
    truncated_draft,
    verify,
    verify_greedy,
)
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

# χ² critical value for 5 degrees of freedom at α = 0.001 (scipy.stats.chi2.ppf(0.999, 5))
CHI2_5DF_999 = 20.515


def _model(seed: int, layers: int = 2, vocab: int = 97, hidden: int = 48, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, **kw)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    return _model(0, layers=3)


def _prompt(n: int = 9, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# ------------------------------------------------------------------ greedy: identical to target-only
@pytest.mark.parametrize("draft_kind", ["random", "self", "truncated"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_identical_to_target_greedy(target, draft_kind, k) -> None:
    draft = {"random": lambda: _model(7, layers=1), "self": lambda: target,
             "truncated": lambda: truncated_draft(target, 1)}[draft_kind]()
    ids = _prompt()
    ref = generate(target, ids, max_new_tokens=20, eos_token_id=[])
    out, stats = speculative_generate(target, draft, ids, 20, k=k, eos_token_id=[])
    assert torch.equal(out, ref)
    assert stats.emitted == 20
    assert stats.target_forwards < 20 or stats.accepted == 0  # fewer target passes whenever anything is accepted
    if draft_kind == "self":
        assert stats.acceptance_rate == 1.0
        assert stats.target_forwards == -(-20 // (k + 1))  # every round emits k+1 tokens


def test_greedy_with_sliding_window_and_long_output() -> None:
    tgt, draft = _model(2, layers=2, sliding_window=6), _model(3, layers=1, sliding_window=6)
    ids = _prompt(5, seed=4)
    ref = generate(tgt, ids, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(speculative_generate(tgt, draft, ids, 40, k=4, eos_token_id=[])[0], ref)


def test_greedy_stops_at_eos_like_target(target) -> None:
    ids = _prompt()
    free = generate(target, ids, max_new_tokens=20, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 6])  # a token the target emits at step 7 (maybe earlier too)
    ref = generate(target, ids, max_new_tokens=20, eos_token_id=[eos])
    out, _ = speculative_generate(target, target, ids, 20, k=4, eos_token_id=eos)
    assert torch.equal(out, ref)
    assert int(out[0, -1]) == eos


def test_max_new_tokens_zero_and_one(target) -> None:
    ids = _prompt()
    out, stats = speculative_generate(target, target, ids, 0)
    assert torch.equal(out, ids) and stats.target_forwards == 0
    out, stats = speculative_generate(target, target, ids, 1, eos_token_id=[])
    assert torch.equal(out, generate(target, ids, max_new_tokens=1, eos_token_id=[]))
    assert stats.proposed == 0 and stats.target_forwards == 1


# ------------------------------------------------------------------ the rejection rule
P = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
Q = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.10, 0.10])


def test_verify_first_token_is_distributed_as_p() -> None:
    """Draft x ~ q, verify against p: the emitted first token follows p (χ²), not q."""
    g = torch.Generator().manual_seed(0)
    n = 5000
    counts = torch.zeros(6)
    naive = torch.zeros(6)  # what accepting every draft token would give: q, which the test must reject
    p_rows = torch.stack([P, P.flip(0)])  # k = 1: p for the draft position and for the bonus token
    for _ in range(n):
        x = torch.multinomial(Q, 1, generator=g)
        out = verify(x, Q[None], p_rows, g)
        counts[out[0]] += 1
        naive[x] += 1
    assert _chi2(counts, P) < CHI2_5DF_999
    assert _chi2(naive, P) > 50 * CHI2_5DF_999


def test_verify_joint_two_tokens_and_bonus() -> None:
    """k = 2 with position-dependent p and q: the second emitted token also follows its p, and p = q accepts all."""
    g = torch.Generator().manual_seed(1)
    q_rows = torch.stack([Q, Q.roll(2)])
    p_rows = torch.stack([P, P.roll(1), P.flip(0)])
    counts = torch.zeros(6)
    for _ in range(6000):
        x = torch.multinomial(q_rows, 1, generator=g).squeeze(-1)
        out = verify(x, q_rows, p_rows, g)
        if out[0] == x[0]:  # the first draft token was accepted: token 2 is a draft or a resample at position 2
            counts[out[1]] += 1
    # P(token 2 = y | token 1 accepted) = p_2(y) because acceptance at step 1 is independent of step 2's draw
    assert _chi2(counts, P.roll(1)) < CHI2_5DF_999
    x = torch.tensor([2, 4])
    out = verify(x, p_rows[:2], p_rows, g)
    assert out.shape == (3,) and torch.equal(out[:2], x)


def test_verify_with_one_hot_probabilities_is_greedy() -> None:
    g = torch.Generator().manual_seed(2)
    for seed in range(20):
        logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
        best = logits.argmax(-1)
        draft = best[:4].clone()
        if seed % 2:
            draft[seed % 4] = (draft[seed % 4] + 1) % 6
        one_hot = torch.nn.functional.one_hot
        out = verify(draft, one_hot(draft, 6).float(), one_hot(best, 6).float(), g)
        assert torch.equal(out, verify_greedy(draft, logits))


def test_verify_greedy_cases() -> None:
    logits = torch.eye(6)[[1, 2, 3, 4]] * 5  # argmax 1, 2, 3, 4
    assert verify_greedy(torch.tensor([1, 2, 3]), logits).tolist() == [1, 2, 3, 4]  # all + bonus
    assert verify_greedy(torch.tensor([1, 5, 3]), logits).tolist() == [1, 2]  # stop at the mismatch
    assert verify_greedy(torch.tensor([0, 2, 3]), logits).tolist() == [1]


@pytest.mark.slow
def test_sampled_generation_first_token_distribution() -> None:
    """End to end on a 6-token model: the first sampled token of speculative_generate follows the target's p."""
    tgt, draft = _model(4, layers=1, vocab=6, hidden=16), _model(5, layers=1, vocab=6, hidden=16)
    ids = torch.tensor([[1, 3, 2]])
    with torch.no_grad():
        p = (tgt(ids)[0, -1] / 0.9).softmax(-1)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(6)
    total = SpecStats()
    for _ in range(1500):
        out, stats = speculative_generate(tgt, draft, ids, 3, k=2, temperature=0.9, eos_token_id=[], generator=g)
        counts[out[0, 3]] += 1
        total.proposed += stats.proposed
        total.accepted += stats.accepted
    assert _chi2(counts, p) < CHI2_5DF_999
    assert 0.0 < total.acceptance_rate < 1.0


def test_sampling_reproducible_with_seed(target) -> None:
    draft = _model(7, layers=1)
    ids = _prompt()
    a, _ = speculative_generate(target, draft, ids, 12, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    b, _ = speculative_generate(target, draft, ids, 12, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ drafts and errors
def test_truncated_draft_shares_weights_and_full_depth_is_the_target(target) -> None:
    draft = truncated_draft(target, 1)
    assert draft.config.num_hidden_layers == 1
    assert draft.model.layers[0] is target.model.layers[0] and draft.lm_head is target.lm_head
    full = truncated_draft(target, 3)
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(full(ids), target(ids))
    with pytest.raises(ValueError, match="num_layers=4"):
        truncated_draft(target, 4)


def test_bad_inputs(target) -> None:
    with pytest.raises(ValueError, match=r"\[1, seq_len>0\]"):
        speculative_generate(target, target, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="vocab_size=50"):
        speculative_generate(target, _model(1, vocab=50), _prompt(), 4)
    with pytest.raises(ValueError, match="k=0"):
        speculative_generate(target, target, _prompt(), 4, k=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        speculative_generate(target, target, _prompt(), 4, temperature=-1.0)
    with pytest.raises(ValueError, match="q_probs"):
        verify(torch.tensor([1, 2]), torch.rand(1, 6), torch.rand(3, 6))
