"""The scheduler (notes ch.06.3.c continuous batching, ch.06.4.c): token budget and sequence cap per step,
chunked prefill mixed with decodes, FCFS admission, preemption by recompute when blocks run out (the
preempted request still completes, token-exact), slots of finished requests reused at once."""

from __future__ import annotations

import pytest
import torch

from tinyllm.infer.engine import LLMEngine
from tinyllm.infer.generate import generate
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2)
    return build_model(cfg).eval()


def _prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def _run(engine: LLMEngine, log: list) -> dict[str, list[int]]:
    schedule = engine.scheduler.schedule

    def logged():
        out = schedule()
        log.append(([s.request.request_id for s in out.seqs], list(out.num_new), [s.num_computed for s in out.seqs],
                    len(out.preempted)))
        return out

    engine.scheduler.schedule = logged
    done, order = {}, []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
                order.append(o.request_id)
    return done


def _ref(model, prompt: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])[0, len(prompt):].tolist()


def test_budget_cap_and_chunked_prefill(model) -> None:
    prompts = _prompts([40, 3, 5, 33, 2, 9])
    engine = LLMEngine(model, max_num_batched_tokens=16, max_num_seqs=3)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    log: list = []
    done = _run(engine, log)
    assert all(sum(n) <= 16 and len(ids) <= 3 for ids, n, _, _ in log)
    # the 40-token prompt is fed in chunks of at most 16, the later chunks next to other requests' decodes
    chunks = [(n[ids.index("0")], c[ids.index("0")]) for ids, n, c, _ in log if "0" in ids]
    assert [x for x in chunks if x[0] > 1][:3] == [(16, 0), (16, 16), (8, 32)]
    assert any(len(ids) > 1 and 1 in n and max(n) > 1 for ids, n, _, _ in log)  # mixed steps happen
    assert done == {str(i): _ref(model, p, 6) for i, p in enumerate(prompts)}


def test_fcfs_admission_and_slot_reuse(model) -> None:
    prompts = _prompts([4, 4, 4, 4])
    engine = LLMEngine(model, max_num_seqs=2)
    lens = [2, 8, 3, 3]
    for i, (p, n) in enumerate(zip(prompts, lens, strict=True)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    log: list = []
    _run(engine, log)
    first_seen = {}
    for step, (ids, _, _, _) in enumerate(log):
        for r in ids:
            first_seen.setdefault(r, step)
    # request 2 enters the step after request 0 finishes (continuous batching), before request 1 is done
    assert first_seen["0"] == first_seen["1"] == 0
    assert first_seen["2"] == 2 and first_seen["3"] > first_seen["2"]
    assert max(len(ids) for ids, *_ in log) == 2


def test_preemption_by_recompute_completes_exactly(model) -> None:
    prompts = _prompts([20, 18, 25, 12, 30, 16])
    engine = LLMEngine(model, num_blocks=6, block_size=8, max_num_batched_tokens=64)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    log: list = []
    done = _run(engine, log)
    assert engine.stats["preemptions"] > 0 and any(k for *_, k in log)
    assert done == {str(i): _ref(model, p, 14) for i, p in enumerate(prompts)}
    assert engine.stats["free_blocks"] == 6
    # the pool was never exceeded: at most 6 blocks · 8 tokens of context in any step
    assert all(sum(c) + sum(n) <= 48 for _, n, c, _ in log)


def test_scheduler_argument_errors(model) -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens=0"):
        LLMEngine(model, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        LLMEngine(model, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens=64 < max_model_len=128"):
        LLMEngine(model, max_num_batched_tokens=64, enable_chunked_prefill=False)
