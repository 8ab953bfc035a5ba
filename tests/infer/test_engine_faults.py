"""Engine faults (notes ch.06.4 serving): a fault that one request explains (its sampling, its detokenization)
ends that request alone with finish_reason "error" while the others in the same batch give their fault-free
greedy tokens; a batch-level fault (the forward) raises `EngineStepError` naming the batch, `recover` frees
its KV blocks and the next generation is token-exact again; a fault that leaves the block pool inconsistent
(a leaked block) is detected and the engine is rebuilt; sub-1e-5 temperatures decode greedily instead of
overflowing into NaN probabilities."""

from __future__ import annotations

import pytest
import torch

from tinyllm.infer.engine import LLM, EngineStepError, LLMEngine
from tinyllm.infer.runner import Sampled
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

V = 97
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 9, 14, 3], [7, 7, 1, 40, 41, 42, 2], [60, 2, 9]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def llm() -> LLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)
    return LLM(build_model(cfg).eval(), num_blocks=32, block_size=4)


def _tokens(llm: LLM, params: SamplingParams | list[SamplingParams] = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _all_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and sorted(bm.free) == list(range(bm.num_blocks))


def test_one_requests_sampling_fault_spares_the_batch(llm, monkeypatch) -> None:
    ref = _tokens(llm)
    runner = llm.engine.runner
    real = runner._sample_one

    def sample_one(seq, scores):
        if seq.request.params.seed == 666:
            raise RuntimeError("injected sampling fault")
        return real(seq, scores)

    monkeypatch.setattr(runner, "_sample_one", sample_one)
    bad = SamplingParams(temperature=0.7, seed=666, max_tokens=10, ignore_eos=True)
    outs = llm.generate(PROMPTS, [GREEDY, bad, GREEDY], use_tqdm=False)
    assert outs[1].finished and outs[1].outputs[0].finish_reason == "error"
    assert "injected sampling fault" in outs[1].error and outs[1].request_id in outs[1].error
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [ref[0], ref[2]]
    assert outs[0].error is None and _all_free(llm)


def test_seeded_neighbours_draw_the_same_after_a_sampling_fault(llm, monkeypatch) -> None:
    """The batched sample is retried sequence by sequence after a fault: seeded generators are rewound first,
    so a seeded request's draws do not depend on a neighbour's failure."""
    seeded = SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True)
    ref = _tokens(llm, [seeded, GREEDY, seeded])
    runner = llm.engine.runner
    real = runner._sample_one

    def sample_one(seq, scores):
        if seq.request.params.seed == 666 and len(seq.output_ids) == 2:
            raise RuntimeError("injected")
        return real(seq, scores)

    monkeypatch.setattr(runner, "_sample_one", sample_one)
    bad = SamplingParams(temperature=0.9, seed=666, max_tokens=10, ignore_eos=True)
    outs = llm.generate(PROMPTS, [seeded, bad, seeded], use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and len(outs[1].outputs[0].token_ids) == 2
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [ref[0], ref[2]]


def test_detokenize_fault_fails_one_request(monkeypatch) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            if 0 in ids[:1]:  # the request whose first generated token is 0 cannot be decoded
                raise ValueError(f"unknown token id {ids[0]}")
            return " ".join(map(str, ids))

    engine = LLMEngine(build_model(cfg).eval(), Tok(), num_blocks=32, block_size=4)
    ok, bad = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, stop_token_ids=[96])
    # fixed draws: token 0 for the "bad" request (marked by its stop token), 1 for the other
    monkeypatch.setattr(engine.runner, "sample", lambda seqs, rows, logits: [
        Sampled(0 if s.request.params.stop_token_ids else 1) for s in seqs])
    engine.add_request("ok", None, ok, prompt_token_ids=[3, 4])
    engine.add_request("bad", None, bad, prompt_token_ids=[3, 5])
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["bad"].outputs[0].finish_reason == "error" and "unknown token id 0" in done["bad"].error
    assert done["ok"].outputs[0].text == "1 1 1" and done["ok"].error is None
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_forward_fault_raises_with_the_batch_and_recovers(llm, monkeypatch) -> None:
    ref = _tokens(llm)
    engine = llm.engine
    real = engine.runner.forward
    calls = []

    def forward(seqs, num_new):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected forward fault")
        return real(seqs, num_new)

    monkeypatch.setattr(engine.runner, "forward", forward)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", None, GREEDY, prompt_token_ids=p)
    with pytest.raises(EngineStepError, match="injected forward fault") as e:
        while engine.has_unfinished_requests():
            engine.step()
    assert sorted(e.value.request_ids) == ["r0", "r1", "r2"]
    failed = engine.recover(e.value.request_ids, "boom")
    assert sorted(failed) == ["r0", "r1", "r2"] and not engine.requests and _all_free(llm)
    outs = engine.step()  # the failed requests' final outputs come with the next step
    assert sorted(o.request_id for o in outs) == ["r0", "r1", "r2"]
    assert all(o.error == "boom" and o.outputs[0].finish_reason == "error" for o in outs)
    assert _tokens(llm) == ref


def test_inconsistent_pool_after_a_fault_is_rebuilt(llm, monkeypatch) -> None:
    ref = _tokens(llm)
    engine = llm.engine
    real = engine.scheduler.schedule

    def schedule():
        real()
        engine.block_manager.allocate()  # a block taken and never handed back, then the fault
        raise RuntimeError("injected scheduler fault")

    monkeypatch.setattr(engine.scheduler, "schedule", schedule)
    engine.add_request("a", None, GREEDY, prompt_token_ids=PROMPTS[0])
    with pytest.raises(EngineStepError) as e:
        engine.step()
    assert e.value.request_ids == ["a"]
    monkeypatch.setattr(engine.scheduler, "schedule", real)
    engine.add_request("b", None, GREEDY, prompt_token_ids=PROMPTS[1])  # not in the failed batch
    failed = engine.recover(e.value.request_ids, "boom")
    assert failed == ["a", "b"]  # the audit found the leaked block: everything failed, pool rebuilt
    assert _all_free(llm) and not engine.scheduler.has_unfinished()
    assert _tokens(llm) == ref


def test_tiny_temperature_is_greedy(llm) -> None:
    ref = _tokens(llm)
    tiny = SamplingParams(temperature=1e-80, max_tokens=10, ignore_eos=True)
    assert tiny.greedy
    assert _tokens(llm, tiny) == ref


@pytest.mark.parametrize("kw, name", [(dict(temperature=float("inf")), "temperature"),
                                      (dict(repetition_penalty=float("nan")), "repetition_penalty"),
                                      (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed")])
def test_unusable_sampling_values_are_refused(kw, name) -> None:
    with pytest.raises(ValueError, match=f"^{name}="):
        SamplingParams(**kw)
