"""Speculative decoding inside the engine (notes ch.06.3.k; Leviathan et al. 2023): greedy output token-exact
with plain decoding over a batch of mixed prompts (prompt lookup and draft-model drafters, prefix caching on
and off, a pool small enough to preempt, gather attention), every block returned; stop conditions,
penalties, no-repeat n-grams and logprobs as in plain decoding; sampled output distributed as the target's
(chi-square on a tiny vocabulary, for a one-hot draft and for a different draft model); prompt lookup ≡ its plain-loop twin;
config errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from tinyllm.infer.drafters import SpeculativeConfig, prompt_lookup, prompt_lookup_reference
from tinyllm.infer.engine import LLM
from tinyllm.infer.generate import generate
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

V = 97
N_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, vocab: int = V, layers: int = 2, hidden: int = 48) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                      initializer_range=0.2)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Mixed lengths; every other prompt repeats a short phrase, so prompt lookup has something to find."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(16):
        n = int(torch.randint(2, 60, (1,), generator=g))
        if i % 2:
            phrase = torch.randint(0, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            out.append((phrase * n)[:n])
        else:
            out.append(torch.randint(0, V, (n,), generator=g).tolist())
    return out


@pytest.fixture(scope="module")
def reference(model, prompts) -> list[list[int]]:
    return [generate(model, torch.tensor([p]), max_new_tokens=N_NEW, eos_token_id=[])[0, len(p):].tolist()
            for p in prompts]


# every sequence drafts k whatever the batch (fit_native_step=False), so large batches exercise verification too;
# test_drafts_shrink_to_keep_decode_steps_native checks the default
NGRAM = dict(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3, fit_native_step=False)
# a draft model that agrees with the target often but not always: the target with int8 weights, 1 layer
DRAFT = dict(method="draft", num_speculative_tokens=3, draft_quantization="int8", draft_head_quantization="int8",
             draft_num_layers=1, fit_native_step=False)


@pytest.mark.parametrize("spec", [NGRAM, DRAFT], ids=["ngram", "draft"])
@pytest.mark.parametrize("kw", [
    dict(),  # roomy pool, prefix caching on
    dict(enable_prefix_caching=False),
    dict(num_blocks=12),  # preemption by recompute, speculation dropped first when blocks run short
    dict(attention="gather", block_size=4),
], ids=["prefix", "no-prefix", "preempt", "gather"])
def test_greedy_equals_plain_decoding(model, prompts, reference, spec, kw) -> None:
    llm = LLM(model, max_num_batched_tokens=64, speculative=spec, **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    st = llm.engine.stats
    assert st["free_blocks"] == st["num_blocks"]  # rejected slots and finished sequences gave every block back
    assert st["spec_proposed"] > 0 and 0 < st["spec_accepted"] <= st["spec_proposed"]
    assert st["spec_emitted"] == st["spec_accepted"] + st["spec_verifications"]
    assert st["spec_acceptance_rate"] == st["spec_accepted"] / st["spec_proposed"]
    if "num_blocks" in kw:
        assert st["preemptions"] > 0


def test_tight_token_budget_trims_the_draft(model, prompts, reference) -> None:
    """A budget of 6 tokens per step: prefills are chunked and drafts cut to what is left of the budget."""
    llm = LLM(model, max_num_batched_tokens=6, speculative=NGRAM)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    assert llm.engine.stats["spec_accepted"] > 0


def test_drafts_shrink_to_keep_decode_steps_native(model, prompts, reference) -> None:
    """A step of decoding sequences stays within the runner's native step (`fast_step.max_rows`): with 8 running
    and room for 16 rows each drafts 1 token, fewer running draft more; greedy output unchanged."""
    llm = LLM(model, max_num_batched_tokens=64, max_num_seqs=8, speculative={**NGRAM, "fit_native_step": True})
    eng = llm.engine
    if eng.runner.fast_step is None:
        pytest.skip("no native decode step in this build")
    eng.runner.fast_step.max_rows = 16
    forward, decode_rows = eng.runner.forward, []

    def record(seqs, num_new):
        if all(s.num_tokens - s.num_computed == 1 for s in seqs):  # decoding only: pending token + its draft
            decode_rows.append((len(seqs), sum(num_new)))
        return forward(seqs, num_new)

    eng.runner.forward = record
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    assert max(r for _, r in decode_rows) <= 16 and eng.stats["spec_accepted"] > 0
    assert any(n == 8 and r > 8 for n, r in decode_rows)  # 8 sequences still speculate, one draft token each
    assert any(n < 8 and r - n > n for n, r in decode_rows)  # fewer sequences draft more than one each


@pytest.mark.parametrize("from_target", [True, False])
def test_self_draft_takes_the_targets_kv(model, prompts, reference, from_target) -> None:
    """A self-draft does not prefill the prompt again: its first forward for a sequence feeds only the token the
    target has not computed, and the prompt's K/V in the draft's pool are the target's, slot for slot (the draft's
    one layer is the target's first). draft_kv_from_target=False computes the whole context. Greedy output is the
    plain output either way."""
    llm = LLM(model, max_num_batched_tokens=64, speculative={**DRAFT, "draft_kv_from_target": from_target})
    eng, drafter = llm.engine, llm.engine.drafter
    forward, first_rows, seen = drafter.runner.forward, [], set()

    def record(seqs, num_new):
        for s, n in zip(seqs, num_new, strict=True):
            if s.seq.seq_id not in seen:
                seen.add(s.seq.seq_id)
                first_rows.append((s.seq.num_prompt_tokens, n))
        return forward(seqs, num_new)

    drafter.runner.forward = record
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    assert len(first_rows) == len(prompts)
    if from_target:
        assert all(n == 1 for _, n in first_rows)
    else:
        assert all(n >= p for p, n in first_rows)  # the draft computes the prompt itself

    eng.add_request("again", None, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                    prompt_token_ids=prompts[0])
    eng.step()  # prefill (the target's)
    eng.step()  # the first proposal, then its verification
    seq = next(s for s in eng.scheduler.running)
    B, n = eng.cache.block_size, len(prompts[0])
    slots = torch.tensor([seq.block_table[p // B] * B + p % B for p in range(n)])
    mine, target = drafter.cache.kv[0].flatten(1, 2)[:, slots], eng.cache.kv[0].flatten(1, 2)[:, slots]
    assert torch.equal(mine, target) == from_target


def test_q4_1_self_draft_decodes_as_plain() -> None:
    """The default self-draft: llama.cpp Q4_1 layers and a Q8_0 head (int8-rounded activations); greedy output is
    the target's. A model whose widths are not multiples of 32 gets tinyllm's int4/int8 twins, with a warning."""
    from tinyllm.infer.ggml_linear import GGMLLinear

    model, prompts = _model(seed=3, hidden=64), [[5, 6, 7, 8, 5, 6, 7, 8, 9], [11, 12, 13], list(range(20, 45))]
    plain = [o.outputs[0].token_ids for o in LLM(model).generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(model, speculative=dict(method="draft", num_speculative_tokens=3))
    draft = llm.engine.drafter.model
    assert isinstance(draft.lm_head, GGMLLinear) and draft.lm_head.ggml_type == "Q8_0" and draft.lm_head.x_q8
    assert isinstance(draft.model.layers[0].mlp.down_proj, GGMLLinear)
    assert draft.model.layers[0].mlp.down_proj.ggml_type == "Q4_1"
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == plain
    assert llm.engine.stats["spec_accepted"] > 0
    with pytest.warns(RuntimeWarning, match="not multiples of 32"):
        odd = LLM(_model(hidden=48), speculative="draft")
    assert odd.engine.drafter.model.lm_head.method == "int8"


def test_rejected_slots_are_rolled_back_every_step(model, prompts) -> None:
    """After each step a speculating sequence holds exactly the blocks of its verified tokens: the rejected
    drafts' slots and unused lookahead slots went back to the pool."""
    llm = LLM(model, block_size=4, speculative=DRAFT)
    eng = llm.engine
    for i, p in enumerate(prompts[:6]):
        eng.add_request(str(i), None, GREEDY, prompt_token_ids=p)
    while eng.has_unfinished_requests():
        eng.step()
        for seq in eng.scheduler.running:
            assert len(seq.block_table) == -(-seq.num_computed // 4)
            assert seq.num_computed == seq.num_tokens - 1 and not seq.draft
    assert eng.stats["spec_accepted"] < eng.stats["spec_proposed"]  # some drafts were rejected
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_prefix_cache_hits_after_speculation(model, prompts) -> None:
    """Blocks named while speculating hold the right K/V: a second pass over the same prompts reuses them
    and still decodes the same tokens."""
    llm = LLM(model, speculative=NGRAM)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    longer = [p + out for p, out in zip(prompts, first, strict=True)]
    again = llm.generate(longer, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert llm.engine.stats["prefix_hit_tokens"] > 0
    plain = LLM(model, enable_prefix_caching=False).generate(
        longer, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in plain]


@pytest.mark.parametrize("spec", [NGRAM, DRAFT], ids=["ngram", "draft"])
def test_stops_penalties_and_logprobs_as_plain(model, prompts, spec) -> None:
    plain, fast = LLM(model), LLM(model, speculative=spec)
    ref = LLM(model).generate(prompts, GREEDY, use_tqdm=False)
    params = [
        SamplingParams(temperature=0, max_tokens=N_NEW, stop_token_ids=[ref[i].outputs[0].token_ids[5]])
        for i in range(len(prompts))
    ]
    params += [SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, repetition_penalty=1.4,
                              presence_penalty=0.5, frequency_penalty=0.3)] * len(prompts)
    params += [SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=3)] * len(prompts)
    params += [SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, no_repeat_ngram_size=2,
                              no_repeat_ngram_scope="output")] * len(prompts)
    a = plain.generate(prompts * 4, params, use_tqdm=False)
    b = fast.generate(prompts * 4, params, use_tqdm=False)
    for x, y in zip(a, b, strict=True):
        ox, oy = x.outputs[0], y.outputs[0]
        assert (ox.token_ids, ox.finish_reason, ox.stop_reason) == (oy.token_ids, oy.finish_reason, oy.stop_reason)
        if ox.logprobs is not None:
            for lx, ly in zip(ox.logprobs, oy.logprobs, strict=True):
                assert lx.keys() == ly.keys()
                assert all(abs(lx[t] - ly[t]) < 1e-4 for t in lx)
    assert fast.engine.stats["spec_accepted"] > 0


def test_request_can_opt_out(model, prompts) -> None:
    llm = LLM(model, speculative=NGRAM)
    off = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, num_speculative_tokens=0)
    outs = llm.generate(prompts[:4], off, use_tqdm=False)
    assert llm.engine.stats["spec_proposed"] == 0
    assert len(outs[0].outputs[0].token_ids) == N_NEW


# ------------------------------------------------------------------ sampling keeps the target distribution
def _target_distribution(model, prompt: list[int], n: int, temperature: float, top_k: int) -> dict:
    """Exact probability of every n-token continuation under temperature + top-k."""
    vocab = model.config.vocab_size
    probs = {}
    with torch.no_grad():
        for cont in itertools.product(range(vocab), repeat=n):
            logits = model(torch.tensor([prompt + list(cont[:-1])]))[0, -n:].float() / temperature
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            p = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
            probs[cont] = float(torch.prod(p[torch.arange(n), torch.tensor(cont)]))
    return probs


@pytest.mark.parametrize("spec", [
    dict(method="ngram", num_speculative_tokens=2, fit_native_step=False),
    dict(method="draft", num_speculative_tokens=2, draft_quantization=None, fit_native_step=False),  # q ≠ p
], ids=["ngram", "draft"])
def test_sampling_preserves_target_distribution(spec) -> None:
    vocab, n, count = 4, 3, 1500
    target = _model(seed=3, vocab=vocab, layers=1, hidden=16)
    if spec["method"] == "draft":
        spec = dict(spec, draft_model=_model(seed=4, vocab=vocab, layers=1, hidden=16))
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    params = [SamplingParams(temperature=0.9, top_k=3, max_tokens=n, ignore_eos=True, seed=s) for s in range(count)]
    llm = LLM(target, speculative=spec, max_num_seqs=512, max_num_batched_tokens=4096)
    outs = llm.generate([prompt] * count, params, use_tqdm=False)
    st = llm.engine.stats
    assert st["spec_proposed"] > 0 and 0 < st["spec_accepted"] < st["spec_proposed"]  # both branches ran
    expected = _target_distribution(target, prompt, n, 0.9, 3)
    seen = {c: 0 for c in expected}
    for o in outs:
        seen[tuple(o.outputs[0].token_ids)] += 1
    cells = [c for c in expected if expected[c] > 0]
    assert sum(seen[c] for c in cells) == count  # nothing outside the top-k support
    total = sum(expected[c] for c in cells)
    stat = sum((seen[c] - count * expected[c] / total) ** 2 / (count * expected[c] / total) for c in cells)
    df = len(cells) - 1
    # χ² critical value at α = 0.001 (Wilson–Hilferty; 54.1 for the 26 degrees of freedom here)
    critical = df * (1 - 2 / (9 * df) + 3.0902 * (2 / (9 * df)) ** 0.5) ** 3
    assert stat < critical, (stat, critical)


# ------------------------------------------------------------------ pieces and errors
def test_prompt_lookup_equals_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        tokens = torch.randint(0, 5, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g).tolist()
        k, lo = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
        hi = lo + int(torch.randint(0, 3, (1,), generator=g))
        assert prompt_lookup(tokens, k, lo, hi) == prompt_lookup_reference(tokens, k, lo, hi)
    assert prompt_lookup([7, 8, 9, 1, 7, 8], 3) == [9, 1, 7]  # the most recent match of the longest n-gram
    assert prompt_lookup([1, 2, 3], 2) == []


@pytest.mark.parametrize("kw, name", [
    (dict(method="medusa"), "method='medusa'"), (dict(num_speculative_tokens=0), "num_speculative_tokens=0"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min=3"),
    (dict(draft_quantization="int3"), "draft_quantization='int3'"), (dict(draft_num_layers=0), "draft_num_layers=0"),
    (dict(draft_model=3), "draft_model=3"), (dict(fit_native_step="yes"), "fit_native_step=.yes."),
    (dict(draft_kv_from_target=1), "draft_kv_from_target=1"), (dict(draft_head_quantization="q5_0"), "q5_0"),
])
def test_config_errors(kw, name) -> None:
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        SpeculativeConfig(**kw)


def test_engine_errors(model) -> None:
    with pytest.raises(ValueError, match="unknown field"):
        LLM(model, speculative=dict(k=3))
    with pytest.raises(ValueError, match="speculative=3"):
        LLM(model, speculative=3)
    with pytest.raises(ValueError, match="vocab_size=50"):
        LLM(model, speculative=dict(method="draft", draft_model=_model(vocab=50), draft_quantization=None))
    with pytest.raises(ValueError, match="num_speculative_tokens=-1"):
        SamplingParams(num_speculative_tokens=-1)
