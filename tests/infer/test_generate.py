"""The reference generator (notes ch.02.13.a, 02.15.a): cached ≡ recompute, greedy / beam / sampling equal to
transformers' `generate` on a tiny random llama with ragged left-padded prompts, EOS handling, streaming."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinyllm.infer.generate import (
    CachedStep,
    GenerationConfig,
    RecomputeStep,
    generate,
    generate_recompute,
)
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model, load_model

PAD = 127  # not 0: transformers fills finished beams with `pad_token_id or eos`


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(tinyllm model, transformers model) with the same tiny random llama weights."""
    from hf_helpers import save_tiny_hf

    path = save_tiny_hf(tmp_path_factory.mktemp("llama"), "llama", seed=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_model(path), hf


def _ragged(lengths: list[int], vocab: int = 128, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), vocab - 1, dtype=torch.long)  # the last id pads (PAD for vocab 128)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = torch.randint(0, vocab - 1, (n,), generator=g)
        mask[r, t - n:] = 1
    return ids, mask


def _tiny_model(**kw) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("window", [None, 4])
def test_cached_equals_recompute(window) -> None:
    model = _tiny_model(sliding_window=window)
    ids, mask = _ragged([7, 3, 5], vocab=97)
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=[])
    fast = generate(model, ids, cfg, attention_mask=mask)
    slow = generate_recompute(model, ids, cfg, attention_mask=mask)
    assert torch.equal(fast, slow)
    # and the logits along that path agree step by step
    cached, full = CachedStep(model, 3, 32), RecomputeStep(model)
    with torch.no_grad():
        for n in range(ids.shape[1], fast.shape[1]):
            m = torch.cat([mask, torch.ones(3, n - ids.shape[1], dtype=torch.long)], dim=1)
            torch.testing.assert_close(cached(fast[:, :n], m), full(fast[:, :n], m), atol=1e-5, rtol=1e-5)


def test_greedy_equals_transformers_ragged(pair) -> None:
    ours, hf = pair
    ids, mask = _ragged([9, 4, 6, 1])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD,
                       eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(got, want)
    # a ragged row continues exactly as the same prompt alone (its own prefix, its own positions)
    alone = generate(ours, ids[1:2, -4:], max_new_tokens=16, eos_token_id=[])
    assert torch.equal(alone[0], got[1, -20:])


def _eos_candidates(ours, ids, mask) -> int:
    """A token the greedy continuation actually produces, so EOS stopping really triggers."""
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    return int(out[0, ids.shape[1] + 2])


def test_eos_stops_and_pads(pair) -> None:
    ours, hf = pair
    ids, mask = _ragged([5, 3, 7])
    eos = _eos_candidates(ours, ids, mask)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                       pad_token_id=PAD)
    assert torch.equal(got, want)
    row = got[0, ids.shape[1]:].tolist()
    stop = row.index(eos)
    assert all(x == PAD for x in row[stop + 1:])
    # stop tokens behave like EOS
    alt = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], stop_token_ids=[eos],
                   pad_token_id=PAD)
    assert torch.equal(alt, got)


@pytest.mark.parametrize(("length_penalty", "early_stopping"),
                         [(1.0, True), (1.0, False), (0.0, False), (2.0, "never"), (-1.0, True)])
def test_beam_search_equals_transformers(pair, length_penalty, early_stopping) -> None:
    ours, hf = pair
    ids, mask = _ragged([6, 3, 8], seed=11)
    eos = _eos_candidates(ours, ids, mask)
    kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping, max_new_tokens=10,
              eos_token_id=eos, pad_token_id=PAD)
    want = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = generate(ours, ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    assert torch.equal(generate_recompute(ours, ids, attention_mask=mask, **kw), got)


@pytest.mark.parametrize("beams", [1, 3])
def test_encoder_repetition_penalty_equals_transformers(pair, beams) -> None:
    ours, hf = pair
    ids, mask = _ragged([6, 6, 6], seed=13)  # unpadded: transformers also rewards its pad token
    kw = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=PAD, num_beams=beams, encoder_repetition_penalty=3.0,
              repetition_penalty=1.2)
    want = hf.generate(ids, attention_mask=mask, do_sample=False, **{**kw, "eos_token_id": None})
    got = generate(ours, ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    plain = generate(ours, ids, attention_mask=mask, **{**kw, "encoder_repetition_penalty": 1.0})

    def copied(out: torch.Tensor) -> int:
        return sum(int(t in set(p.tolist())) for p, row in zip(ids, out[:, 6:]) for t in row.tolist())

    assert copied(got) > copied(plain)  # the reward makes the continuation copy more of the prompt


@pytest.mark.parametrize("beams", [1, 3])
def test_no_repeat_ngram_equals_transformers(pair, beams) -> None:
    ours, hf = pair
    ids, mask = _ragged([6, 3, 8], seed=4)
    kw = dict(max_new_tokens=16, pad_token_id=PAD, num_beams=beams, no_repeat_ngram_size=2)
    want = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **kw)
    assert torch.equal(generate(ours, ids, attention_mask=mask, eos_token_id=[], **kw), want)


def test_no_repeat_ngram_output_scope(pair) -> None:
    ours, _ = pair
    ids, mask = _ragged([6, 6], seed=13)

    def pairs(row: list[int]) -> list[tuple[int, int]]:
        return list(itertools.pairwise(row))

    kw = dict(max_new_tokens=24, eos_token_id=[], encoder_repetition_penalty=4.0)
    copy = generate(ours, ids, attention_mask=mask, no_repeat_ngram_size=2, no_repeat_ngram_scope="output", **kw)
    strict = generate(ours, ids, attention_mask=mask, no_repeat_ngram_size=2, **kw)
    for r in range(2):
        out = copy[r, 6:].tolist()
        assert len(set(pairs(out))) == len(pairs(out))  # no bigram twice in the output
        prompt_pairs = set(pairs(ids[r].tolist()))
        assert not prompt_pairs & set(pairs(strict[r].tolist()[5:]))  # "all" forbids quoting the prompt
    # "output" lets the continuation quote a bigram of its prompt
    assert any(set(pairs(ids[r].tolist())) & set(pairs(copy[r, 5:].tolist())) for r in range(2))


def test_encoder_repetition_penalty_ignores_left_padding(pair) -> None:
    ours, _ = pair
    ids, mask = _ragged([7, 3, 5], seed=2)
    kw = dict(max_new_tokens=8, eos_token_id=[], encoder_repetition_penalty=3.0)
    got = generate(ours, ids, attention_mask=mask, **kw)
    for r, n in enumerate([7, 3, 5]):  # each row continues exactly as its prompt alone: pads are not rewarded
        alone = generate(ours, ids[r : r + 1, -n:], **kw)
        assert torch.equal(alone[0, n:], got[r, 7:])


def test_beam_one_is_greedy(pair) -> None:
    ours, _ = pair
    ids, mask = _ragged([4, 6])
    greedy = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    beam = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], num_beams=1)
    assert torch.equal(greedy, beam)


def test_wide_beam_is_exhaustive_search() -> None:
    """Beam width ≥ V^L (no EOS, length_penalty 0) finds the argmax of the joint log-probability."""
    model = _tiny_model()
    model.lm_head.weight.data = model.lm_head.weight.data[:5].clone()
    model.config.vocab_size = 5
    model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data[:5].clone()
    prompt = torch.tensor([[1, 2, 3]])
    best = generate(model, prompt, num_beams=25, max_new_tokens=2, eos_token_id=[], length_penalty=0.0)
    with torch.no_grad():
        seqs = torch.cartesian_prod(torch.arange(5), torch.arange(5))
        full = torch.cat([prompt.expand(25, 3), seqs], dim=1)
        logp = model(full).float().log_softmax(-1)
        joint = logp[:, 2].gather(1, seqs[:, :1]).squeeze(1) + logp[:, 3].gather(1, seqs[:, 1:]).squeeze(1)
    assert best[0, 3:].tolist() == seqs[int(joint.argmax())].tolist()


def test_sampling_equals_transformers_with_same_seed(pair) -> None:
    """Same processors, same RNG stream: token-identical samples (transformers draws from the global RNG)."""
    ours, hf = pair
    ids, mask = _ragged([5, 8])
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12, pad_token_id=PAD)
    torch.manual_seed(1234)
    want = hf.generate(ids, attention_mask=mask, eos_token_id=None, min_p=None, **kw)
    got = generate(ours, ids, attention_mask=mask, eos_token_id=[], seed=1234, **kw)
    assert torch.equal(got, want)


def test_seeded_sampling_is_reproducible() -> None:
    model = _tiny_model()
    ids = torch.tensor([[5, 6, 7]])
    cfg = GenerationConfig(do_sample=True, temperature=1.3, max_new_tokens=16, seed=7, eos_token_id=[])
    a, b = generate(model, ids, cfg), generate(model, ids, cfg)
    c = generate(model, ids, cfg, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_streamer_sees_every_new_token() -> None:
    model = _tiny_model()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    seen: list[int] = []
    out = generate(model, ids, max_new_tokens=9, eos_token_id=[], streamer=seen.extend)
    assert seen == out[0, 5:].tolist()
    with pytest.raises(ValueError, match="batch 1"):
        generate(model, ids.repeat(2, 1), max_new_tokens=2, streamer=seen.extend)


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(early_stopping="sometimes"), "early_stopping='sometimes'"),
    (dict(eos_token_id=[-3]), "eos_token_id=[-3]"),
    (dict(encoder_repetition_penalty=0.0), "encoder_repetition_penalty=0.0"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1"),
    (dict(no_repeat_ngram_scope="prompt"), "no_repeat_ngram_scope='prompt'"),
    (dict(do_sample=True, num_beams=2), "num_beams=2"),
])
def test_config_errors_name_the_value(kw, needle) -> None:
    with pytest.raises(ValueError) as e:
        GenerationConfig(**kw)
    assert needle in str(e.value)


def test_bad_inputs() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match="outside"):
        generate(model, torch.tensor([[1, 500]]))
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]]))
    with pytest.raises(TypeError, match="tempature"):
        generate(model, torch.tensor([[1, 2]]), tempature=0.5)
