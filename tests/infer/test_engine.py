"""The engine (notes ch.06.3.c, ch.06.4): continuous batching ≡ sequential reference generation (greedy,
token-exact, 32 mixed-length prompts, also under a pool so small that preemption must happen), gather ≡
paged attention, prefix caching, n > 1 with copy-on-write, per-request seeds, stop conditions, logprobs,
streaming, the LLM front end on a checkpoint directory, and clear errors."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tinyllm.infer.engine import LLM, LLMEngine
from tinyllm.infer.generate import generate
from tinyllm.infer.runner import presence_frequency
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model, save_pretrained
from tinyllm.tokenizer import CheckpointTokenizer

V = 97
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, **kw)
    return build_model(cfg).eval()


def _tokenizer() -> CheckpointTokenizer:
    """Word-level vocabulary w0 … w96 (text = ids joined by spaces)."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return CheckpointTokenizer(tok)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 70, (32,), generator=g).tolist()
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(model, prompts) -> list[list[int]]:
    return [generate(model, torch.tensor([p]), max_new_tokens=12, eos_token_id=[])[0, len(p):].tolist()
            for p in prompts]


@pytest.mark.parametrize("kw", [
    dict(),  # roomy pool, budget 64: chunked prefills mixed with decodes
    dict(num_blocks=14, attention="gather"),  # small pool: preemption by recompute, reference attention
    dict(num_blocks=14, enable_prefix_caching=False),
])
def test_continuous_batching_equals_sequential(model, prompts, reference, kw) -> None:
    llm = LLM(model, max_num_batched_tokens=64, **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.request_id for o in outs] == [str(i) for i in range(32)]
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" and o.finished for o in outs)
    stats = llm.engine.stats
    assert stats["free_blocks"] == stats["num_blocks"]  # every block came back
    if "num_blocks" in kw:
        assert stats["preemptions"] > 0


def test_gather_and_paged_give_equal_logprobs(model, prompts) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=4)
    a = LLM(model, attention="gather", max_num_batched_tokens=48).generate(prompts[:8], params, use_tqdm=False)
    b = LLM(model, attention="paged", max_num_batched_tokens=48).generate(prompts[:8], params, use_tqdm=False)
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for dx, dy in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            assert dx.keys() == dy.keys()
            assert max(abs(dx[k] - dy[k]) for k in dx) < 1e-5


def test_logprobs_equal_log_softmax_of_reference(model, prompts) -> None:
    p = prompts[3]
    out = LLM(model).generate(p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3),
                              use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([p + out.token_ids]))[0].float(), dim=-1)
    total = 0.0
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        ref = full[len(p) - 1 + i]
        top = torch.topk(ref, 3).indices.tolist()
        assert set(lp) == set(top) | {tok}
        assert max(abs(lp[k] - float(ref[k])) for k in lp) < 1e-5
        total += float(ref[tok])
    assert abs(out.cumulative_logprob - total) < 1e-4


def test_prefix_cache_shares_blocks_and_keeps_outputs(model) -> None:
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(0, V, (40,), generator=g).tolist()
    a, b = [*shared, 5, 6, 7], [*shared, 8, 9]
    engine = LLMEngine(model, max_num_batched_tokens=256)
    engine.add_request("a", a, GREEDY)
    engine.step()  # a's prompt is computed and its two full blocks named
    engine.add_request("b", b, GREEDY)
    engine.step()
    sa, sb = engine.requests["a"].seqs[0], engine.requests["b"].seqs[0]
    assert sb.block_table[:2] == sa.block_table[:2]
    assert [engine.block_manager.refcount[x] for x in sa.block_table[:2]] == [2, 2]
    assert engine.stats["prefix_hit_tokens"] == 32
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o.outputs[0].token_ids
    for rid, p in (("a", a), ("b", b)):
        assert outs[rid] == generate(model, torch.tensor([p]), max_new_tokens=12, eos_token_id=[])[0, len(p):].tolist()
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]


def test_seeded_sampling_ignores_batch_composition(model, prompts) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=11, max_tokens=10, ignore_eos=True)
    alone = LLM(model).generate(prompts[5], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.2, seed=i, max_tokens=7 + i % 5, ignore_eos=True) for i in range(9)]
    mixed = LLM(model, max_num_batched_tokens=40).generate([*prompts[:9], prompts[5]], [*others, params],
                                                           use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone
    # the same draws as the reference generator with the same seed and processors
    ref = generate(model, torch.tensor([prompts[5]]), max_new_tokens=10, eos_token_id=[], do_sample=True,
                   temperature=0.9, top_p=0.9, top_k=20, seed=11)[0, len(prompts[5]):].tolist()
    assert alone == ref


def test_n_samples_fork_with_copy_on_write(model, prompts) -> None:
    p = prompts[0][:21] + [1] * max(0, 21 - len(prompts[0]))  # 21 tokens: the second block is partial
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    engine = LLMEngine(model)
    engine.add_request("r", p, params)
    engine.step()
    seqs = engine.requests["r"].seqs
    assert len(seqs) == 3 and all(engine.block_manager.refcount[b] == 3 for b in seqs[0].block_table)
    engine.step()
    assert engine.stats["cow_copies"] == 2
    assert seqs[0].block_table[0] == seqs[1].block_table[0] == seqs[2].block_table[0]  # full block still shared
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o
    assert [c.index for c in final.outputs] == [0, 1, 2]
    for c in final.outputs:  # sample i ≡ a single request seeded seed + i
        single = SamplingParams(temperature=1.0, seed=7 + c.index, max_tokens=8, ignore_eos=True)
        assert c.token_ids == LLM(model).generate(p, single, use_tqdm=False)[0].outputs[0].token_ids
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]


def test_stop_conditions(prompts) -> None:
    tok = _tokenizer()
    model = _model()
    llm = LLM(model, tok)
    prompt = " ".join(f"w{i}" for i in prompts[2])
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    ids, text = full.outputs[0].token_ids, full.outputs[0].text
    assert text == tok.decode(ids) and full.outputs[0].finish_reason == "length" and len(ids) == 12
    # stop token id: kept in token_ids, not in the text
    k = ids.index(ids[4])
    out = llm.generate(prompt, SamplingParams(temperature=0, stop_token_ids=[ids[4]], max_tokens=12),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:k + 1] and out.finish_reason == "stop" and out.stop_reason == ids[4]
    assert out.text == tok.decode(ids[:k])
    # stop string: the text is cut before it
    stop = f"w{ids[6]}"
    out = llm.generate(prompt, SamplingParams(temperature=0, stop=stop, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.find(stop)] and out.stop_reason == stop and out.finish_reason == "stop"
    assert ids[:len(out.token_ids)] == out.token_ids
    # EOS from the model config stops unless ignore_eos
    model.config.eos_token_id = ids[3]
    eos_llm = LLM(model, tok)
    out = eos_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:ids.index(ids[3]) + 1] and out.finish_reason == "stop"
    out = eos_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids


def test_streaming_deltas_add_up(model, prompts) -> None:
    engine = LLMEngine(model, _tokenizer())
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=["w999"])
    for i in range(3):
        engine.add_request(f"r{i}", " ".join(f"w{t}" for t in prompts[i]), params)
    text = {f"r{i}": "" for i in range(3)}
    ids = {f"r{i}": [] for i in range(3)}
    last = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            text[o.request_id] += o.outputs[0].delta_text
            ids[o.request_id] += o.outputs[0].delta_token_ids
            last[o.request_id] = o
    for rid, o in last.items():
        assert o.finished and text[rid] == o.outputs[0].text and ids[rid] == o.outputs[0].token_ids


def test_abort_frees_everything(model, prompts) -> None:
    engine = LLMEngine(model, max_num_batched_tokens=32, max_num_seqs=4)
    for i in range(8):
        engine.add_request(str(i), prompts[i], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats["free_blocks"] < engine.stats["num_blocks"]
    for i in range(8):
        engine.abort(str(i))
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == [str(i) for i in range(8)]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished_requests()
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]


def test_repetition_and_presence_penalties(model, prompts) -> None:
    p = prompts[7]
    out = LLM(model).generate(p, SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=10,
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    ref = generate(model, torch.tensor([p]), max_new_tokens=10, eos_token_id=[], repetition_penalty=1.3)
    assert out == ref[0, len(p):].tolist()
    # the prompt-copy reward (transformers' encoder_repetition_penalty), with the CTRL penalty after it
    kw = dict(repetition_penalty=1.2, encoder_repetition_penalty=2.5)
    out = LLM(model).generate(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, **kw),
                              use_tqdm=False)[0].outputs[0].token_ids
    ref = generate(model, torch.tensor([p]), max_new_tokens=10, eos_token_id=[], **kw)
    assert out == ref[0, len(p):].tolist()
    # no repeated n-gram, over prompt and output (transformers) or over the output only
    for kw in (dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3, no_repeat_ngram_scope="output",
                                                   repetition_penalty=1.1),
               dict(no_repeat_ngram_size=1, no_repeat_ngram_scope="output")):
        out = LLM(model).generate([p, prompts[3]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kw),
                                  use_tqdm=False)
        for o, q in zip(out, [p, prompts[3]], strict=True):
            ref = generate(model, torch.tensor([q]), max_new_tokens=12, eos_token_id=[], **kw)[0, len(q):].tolist()
            assert o.outputs[0].token_ids == ref, kw
    assert len(set(ref)) == 12  # size 1 over the output: no token twice
    scores = torch.zeros(1, 5)
    got = presence_frequency(scores, [1, 1, 3], presence=0.5, frequency=0.25)
    assert torch.allclose(got, torch.tensor([[0.0, -1.0, 0.0, -0.75, 0.0]]))
    # a strong presence penalty forbids repeats under greedy decoding
    out = LLM(model).generate(p, SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0,
                                                max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert len(set(out[0].outputs[0].token_ids)) >= 10


def test_llm_from_checkpoint_directory(tmp_path, model) -> None:
    save_pretrained(model, tmp_path)
    _tokenizer().save(tmp_path)
    llm = LLM(str(tmp_path))
    out = llm.generate(["w3 w5 w7", "w1"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    for o, p in zip(out, [[3, 5, 7], [1]], strict=True):
        ref = generate(model, torch.tensor([p]), max_new_tokens=6, eos_token_id=[])[0, len(p):].tolist()
        assert o.prompt_token_ids == p and o.outputs[0].token_ids == ref
        assert o.outputs[0].text == " ".join(f"w{t}" for t in ref)


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.5), "temperature=-0.5"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_k=-3), "top_k=-3"),
    (dict(min_p=1.5), "min_p=1.5"), (dict(n=0), "n=0"), (dict(max_tokens=0), "max_tokens=0"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"), (dict(presence_penalty=3.0), "presence_penalty=3.0"),
    (dict(encoder_repetition_penalty=-1.0), "encoder_repetition_penalty=-1.0"),
    (dict(frequency_penalty=-2.5), "frequency_penalty=-2.5"), (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_scope="prompt"), "no_repeat_ngram_scope='prompt'"), (dict(logprobs=-1), "logprobs=-1"),
    (dict(stop=[""]), "stop="), (dict(stop_token_ids=[-4]), "stop_token_ids="), (dict(seed=1.5), "seed=1.5"),
])
def test_invalid_sampling_params(kw, name) -> None:
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        SamplingParams(**kw)


def test_engine_input_errors(model) -> None:
    engine = LLMEngine(model, num_blocks=4)
    engine.add_request("x", [1, 2, 3])
    with pytest.raises(ValueError, match="'x' is already in use"):
        engine.add_request("x", [1])
    with pytest.raises(ValueError, match="outside"):
        engine.add_request("y", [1, V])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.add_request("z", "hello")
    with pytest.raises(ValueError, match="pool has only 4"):
        engine.add_request("w", [1] * 60, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="max_model_len=128"):
        engine.add_request("v", [1] * 128)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        LLM(model).generate([[1]], [GREEDY, GREEDY], use_tqdm=False)
