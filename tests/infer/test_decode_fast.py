"""The batch-1 decode fast path (one native call per step; per layer, its twin) against FusedForward over the same
modules (GGUF blocks, tinyllm's int8/int4 formats, or fp32 matrices): same greedy tokens and log-probabilities equal to rounding on
SmolLM2-135M, on every native build this CPU runs; it serves only a lone decoding sequence and only the models
it reproduces. With int8-rounded activations (llama.cpp's arithmetic, the GGUF default) the rounding amplifies
last-digit differences between the C++ and torch norms/SwiGLU, so there the check is closeness, not equality."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import smollm2_path

from tinyllm import LLM, SamplingParams
from tinyllm.infer import cpu_kernels, decode_fast

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm() -> LLM:  # fp32 activations: the fast path and its twin do the same arithmetic
    return LLM(smollm2_path(), quantization="gguf", gguf_activations="fp32", max_model_len=128, max_num_seqs=4)


@pytest.fixture(scope="module")
def llm_q8() -> LLM:
    return LLM(smollm2_path(), quantization="gguf", max_model_len=128, max_num_seqs=4)


def _run(llm: LLM, prompts: list[list[int]], n: int = 12) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t] for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs,
                                                              strict=True)]) for o in outs]


@pytest.fixture(scope="module")
def llm_fp32() -> LLM:
    return LLM(smollm2_path(), max_model_len=128, max_num_seqs=4)  # the GGUF dequantized to fp32 nn.Linear


@pytest.mark.parametrize("isa", cpu_kernels.isas_to_test())
def test_f32_matvec_equals_torch(isa) -> None:
    saved = dict(cpu_kernels._state)
    assert cpu_kernels.load(isa)
    try:
        g = torch.Generator().manual_seed(0)
        for n, k in ((7, 5), (64, 576), (1537, 100), (3, 33)):  # row tails, K tails of every vector width
            w, x = torch.randn(n, k, generator=g), torch.randn(k, generator=g)
            torch.testing.assert_close(cpu_kernels.f32_matvec(x, w), w @ x, rtol=1e-5, atol=1e-5)
            for rows in (2, 3, 5, 7):  # several rows of x (blocks of 3 and 2, a lone rest): each row is that
                xs = torch.randn(rows, k, generator=g)  # row's matvec, bit for bit
                many = cpu_kernels.f32_matvec(xs, w)
                torch.testing.assert_close(many, xs @ w.T, rtol=1e-4, atol=1e-4)  # torch's GEMM sums otherwise
                assert all(torch.equal(many[m], cpu_kernels.f32_matvec(xs[m], w)) for m in range(rows))
    finally:
        cpu_kernels._state.update(saved)


def _product(fmt: str, w: torch.Tensor):
    """`f(x, rows)`: the native product of x with rows `rows` (a slice) of w stored in format `fmt`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    from tinyllm.infer.quant import quantize_int4, quantize_int8

    if fmt == "fp32":
        return lambda x, r: cpu_kernels.f32_matvec(x, w[r])
    if fmt == "int8":
        q, sc = quantize_int8(w)
        return lambda x, r: cpu_kernels.int8_linear(x[None], q[r], sc[r])[0]
    if fmt == "int4":
        p, sc, z = quantize_int4(w, 32)
        return lambda x, r: cpu_kernels.int4_linear(x[None], p[r], sc[r], z[r], 32)[0]
    qtype, x_q8 = fmt.split("-")[0], fmt.endswith("-q8")
    blocks = torch.from_numpy(gguf_quantize(w.numpy(), getattr(GGMLQuantizationType, qtype)).copy())
    return lambda x, r: cpu_kernels.ggml_linear(x[None], blocks[r], qtype, x_q8=x_q8)[0]


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "Q4_0", "Q4_1-q8", "Q8_0-q8"])
@pytest.mark.parametrize("isa", cpu_kernels.isas_to_test())
def test_rows_do_not_depend_on_threads_or_neighbours(isa, fmt) -> None:
    # every kernel reads four rows per step from four regions of a thread's rows, leftovers through the same
    # four-row code: a row's value must not depend on the thread count or on which rows share its step
    saved, threads = dict(cpu_kernels._state), torch.get_num_threads()
    assert cpu_kernels.load(isa)
    try:
        g = torch.Generator().manual_seed(1)
        w, x = torch.randn(1001, 576, generator=g), torch.randn(576, generator=g)
        f = _product(fmt, w)
        torch.set_num_threads(2)
        full = f(x, slice(None))
        torch.set_num_threads(1)
        assert torch.equal(f(x, slice(None)), full)
        for i, n in ((0, 1), (5, 3), (17, 64), (500, 501)):
            assert torch.equal(f(x, slice(i, i + n)), full[i:i + n]), (i, n)
    finally:
        torch.set_num_threads(threads)
        cpu_kernels._state.update(saved)


def test_few_row_products_take_the_native_stream_and_equal_torch(monkeypatch) -> None:
    from tinyllm.infer import fused

    assert cpu_kernels.load()
    calls = []
    native = cpu_kernels.f32_matvec
    monkeypatch.setattr(cpu_kernels, "f32_matvec", lambda x, w: calls.append(x.shape[0]) or native(x, w))
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    for m in (1, 5, fused.NATIVE_ROWS, fused.NATIVE_ROWS + 1):
        x = torch.randn(m, 64, generator=g)
        torch.testing.assert_close(fused.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    assert calls == [1, 5, fused.NATIVE_ROWS]  # more rows: torch's GEMM
    fused.linear(torch.randn(2, 64), w, b)  # a bias, or autograd recording: torch
    fused.linear(torch.randn(2, 64, requires_grad=True), w)
    with torch.inference_mode():
        lin = torch.nn.Linear(64, 96, bias=False)
        fused.apply(lin, torch.randn(3, 64))  # an nn.Linear's trainable weight, outside autograd: native
    assert calls == [1, 5, fused.NATIVE_ROWS, 3]


def _count_fast_steps(runner, monkeypatch) -> list[list[int]]:
    """Route the runner's fast path through a recorder of each step's positions; returns the record."""
    step, calls = runner.fast_step, []

    class Counting:
        max_rows = step.max_rows

        def rows(self, tokens, positions, tables, kv):
            calls.append(list(positions))
            return step.rows(tokens, positions, tables, kv)

        logits = staticmethod(step.logits)

    monkeypatch.setattr(runner, "fast_step", Counting())
    return calls


@pytest.fixture(scope="module")
def llm_int8() -> LLM:  # tinyllm's own int8 per-row weights (QuantLinear)
    return LLM(smollm2_path(), quantization="int8", max_model_len=128, max_num_seqs=4)


@pytest.fixture(scope="module")
def llm_int4() -> LLM:  # tinyllm's own int4 weights, groups of 32
    return LLM(smollm2_path(), quantization="int4", group_size=32, max_model_len=128, max_num_seqs=4)


WEIGHTS = {"gguf": "llm", "fp32": "llm_fp32", "int8": "llm_int8", "int4": "llm_int4"}


@pytest.mark.parametrize("isa", cpu_kernels.isas_to_test())
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_fast_path_equals_fused_twin(request, isa, weights, monkeypatch) -> None:
    llm = request.getfixturevalue(WEIGHTS[weights])
    saved = dict(cpu_kernels._state)
    assert cpu_kernels.load(isa)
    try:
        runner = llm.engine.runner
        assert runner.fast_step is not None
        calls = _count_fast_steps(runner, monkeypatch)
        prompt = [1, 4093, 314, 253, 2165, 30, 198, 2]
        fast = _run(llm, [prompt])[0]
        # the 8-token prefill in one call, then every decode step
        assert calls == [list(range(len(prompt)))] + [[p] for p in range(len(prompt), len(prompt) + 11)]
        monkeypatch.setattr(runner, "fast_step", None)
        ref = _run(llm, [prompt])[0]
    finally:
        cpu_kernels._state.update(saved)
    assert fast[0] == ref[0]
    torch.testing.assert_close(torch.tensor(fast[1]), torch.tensor(ref[1]), rtol=0, atol=2e-3)


def test_own_formats_take_the_fast_path_and_bad_layouts_are_refused(llm_int4) -> None:
    step = llm_int4.engine.runner.fast_step
    assert step is not None and step.layers[0][5] == [cpu_kernels.OWN_INT4_TYPE] * 7
    ln1, ln2, eps1, eps2, weights, types = step.layers[0]
    assert len(weights) == 21  # packed, scale and zero for each of the seven projections
    kv = llm_int4.engine.runner.cache.kv[0]
    cos, sin = torch.ones(64), torch.zeros(64)
    args = (cos, sin, kv, torch.zeros(1, dtype=torch.long), 0, 0.125, 9, 0)
    with pytest.raises(RuntimeError, match="more weight tensors"):
        cpu_kernels._ops().decode_layer(torch.zeros(576), ln1, ln2, eps1, eps2, [*weights, weights[0]], types, *args)
    with pytest.raises(RuntimeError, match="too few weight tensors"):
        cpu_kernels._ops().decode_layer(torch.zeros(576), ln1, ln2, eps1, eps2, weights[:-1], types, *args)
    with pytest.raises(RuntimeError, match=r"\(int4\) must be contiguous uint8"):  # scales where the codes belong
        cpu_kernels._ops().decode_layer(torch.zeros(576), ln1, ln2, eps1, eps2, [weights[1], *weights[1:]], types,
                                        *args)


def test_int8_activations_fast_path_follows_its_twin(llm_q8, monkeypatch) -> None:
    runner = llm_q8.engine.runner
    assert runner.fast_step is not None and all(t & cpu_kernels.X_Q8 for t in runner.fast_step.layers[0][5])
    calls = _count_fast_steps(runner, monkeypatch)
    prompt = [1, 4093, 314, 253, 2165, 30, 198, 2]
    fast = _run(llm_q8, [prompt])[0]
    assert calls
    monkeypatch.setattr(runner, "fast_step", None)
    ref = _run(llm_q8, [prompt])[0]
    same = next((i for i, (a, b) in enumerate(zip(fast[0], ref[0], strict=True)) if a != b), len(ref[0]))
    assert same >= 4  # greedy agrees until two candidates are nearly tied
    assert max(abs(a - b) for a, b in zip(fast[1][:same], ref[1][:same], strict=True)) < 0.25


def test_small_batches_take_one_call_and_follow_the_twin(llm, monkeypatch) -> None:
    runner = llm.engine.runner
    calls = _count_fast_steps(runner, monkeypatch)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9]]
    both = _run(llm, prompts, n=4)
    # both prefills in one call (9 rows, two block tables), then one row per sequence each step
    assert calls == [[0, 1, 2, 3, 0, 1, 2, 3, 4], [4, 5], [5, 6], [6, 7]]
    monkeypatch.setattr(runner, "fast_step", None)
    ref = _run(llm, prompts, n=4)
    for (t, lp), (rt, rlp) in zip(both, ref, strict=True):
        assert t == rt
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(rlp), rtol=0, atol=2e-3)


def test_more_rows_than_the_kernels_take_keep_the_fused_path(llm, monkeypatch) -> None:
    runner = llm.engine.runner
    calls = _count_fast_steps(runner, monkeypatch)
    long = list(range(10, 10 + runner.fast_step.max_rows + 1))
    _run(llm, [long], n=2)
    assert calls == [[len(long)]]  # the prefill went through FusedForward; the decode step did not


def test_only_models_it_reproduces_are_served(llm) -> None:
    runner = llm.engine.runner
    assert decode_fast.supports(runner.model, runner.fused, runner.cache.kv)
    assert not decode_fast.supports(runner.model, runner.fused, runner.cache.kv.to(torch.bfloat16))
    assert not decode_fast.supports(runner.model, None, runner.cache.kv)
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    plain = LLM(build_model(cfg), max_model_len=32, max_num_seqs=1)
    assert plain.engine.runner.fast_step is not None  # fp32 nn.Linear weights: the native fp32 stream
    biased = LLM(build_model(ModelConfig(**{**cfg.__dict__, "attention_bias": True})), max_model_len=32,
                 max_num_seqs=1)
    assert biased.engine.runner.fast_step is None  # biases: FusedForward only


@pytest.mark.parametrize("weights", ["gguf", "int4", "fp32"])
def test_plan_equals_one_call_per_layer(request, weights, monkeypatch) -> None:
    llm = request.getfixturevalue(WEIGHTS[weights])
    step = llm.engine.runner.fast_step
    prompt = [1, 4093, 314, 253, 2165, 30, 198, 2]
    one_call = _run(llm, [prompt])[0]
    assert cpu_kernels.active_isa() in step.plans
    monkeypatch.setattr(step, "per_layer", True)
    assert _run(llm, [prompt])[0] == one_call  # same kernels in the same order: bit-identical


def test_plans_are_freed_and_bad_steps_named(llm_int4) -> None:
    step = llm_int4.engine.runner.fast_step
    ops = cpu_kernels._ops()
    before = ops.decode_plan_count()
    plan = cpu_kernels.DecodePlan(step.layers, 9, 3, 64, 0.125)
    assert ops.decode_plan_count() == before + 1
    kv = llm_int4.engine.runner.cache.kv
    x, cos, sin, table = torch.zeros(576), torch.ones(64), torch.zeros(64), torch.zeros(1, dtype=torch.long)
    at = torch.tensor([0])
    with pytest.raises(RuntimeError, match=r"kv must be the pool \[30, 2"):
        plan(x, cos, sin, kv[0], table, at)  # one layer of the pool where the plan wants all of them
    with pytest.raises(RuntimeError, match="position 999 is past the block table"):
        plan(x, cos, sin, kv, table, torch.tensor([999]))
    with pytest.raises(RuntimeError, match="one entry per row of x"):
        plan(torch.zeros(2, 576), cos.repeat(2), sin.repeat(2), kv, table.expand(2, 1).contiguous(), at)
    with pytest.raises(RuntimeError, match="one row per row of x"):
        plan(torch.zeros(2, 576), cos.repeat(2), sin.repeat(2), kv, table, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="7 types, 2 norms and 2 eps per layer"):
        cpu_kernels.DecodePlan([(*lay[:5], lay[5][:6]) for lay in step.layers], 9, 3, 64, 0.125)
    with pytest.raises(RuntimeError, match=r"weight 3 \(int4\) must be contiguous uint8 \[576, 288\]"):
        ln1, ln2, eps1, eps2, w, types = step.layers[0]
        cpu_kernels.DecodePlan([(ln1, ln2, eps1, eps2, [*w[:9], w[10], *w[10:]], types)], 9, 3, 64, 0.125)
    stale = plan.id
    del plan
    assert ops.decode_plan_count() == before
    with pytest.raises(RuntimeError, match=f"no decode plan {stale}"):
        ops.decode_plan_run(stale, x, cos, sin, kv, table, at, 0.125, 0)
