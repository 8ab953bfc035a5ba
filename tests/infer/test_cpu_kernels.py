"""The native kernels equal their torch references on every build this CPU runs (AVX-512, AVX2, portable:
an AVX-512 machine also checks the code AVX2-only and older CPUs get). Paged decode attention vs gather + SDPA:
GQA and MHA, ragged contexts over scrambled blocks, sliding windows, fp32 and bf16 pools; the engine's greedy
tokens and log-probs with the kernel on and off; int8/int4 matrix-vector products vs the dequantized weights,
with leftover rows (not a multiple of four), leftover columns (not a multiple of the vector width) and every
int4 group size. The builds sum in different orders, so all comparisons carry a tolerance. Then the choice of
build: `TINYLLM_NATIVE_ISA`, a request the CPU cannot run, `TINYLLM_NATIVE=0`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyllm import LLM, SamplingParams, capability
from tinyllm.infer import cpu_kernels
from tinyllm.infer.quant import pack_int4
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private, not-yet-loaded kernel state: what a new process sees (libraries already built stay loaded)."""
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": None, "error": None, "isa": None, "note": None})
    monkeypatch.delenv("TINYLLM_NATIVE_ISA", raising=False)
    monkeypatch.delenv("TINYLLM_NATIVE", raising=False)


def test_each_build_runs_its_own_code_path(isa) -> None:
    assert cpu_kernels.active_isa() == isa
    assert cpu_kernels.kernel_status() == f"loaded ({isa})"
    # the library reports which #if branch its flags compiled, so "avx2" is never AVX-512 code in disguise
    assert getattr(torch.ops, f"tinyllm_cpu_{isa}").compiled_isa() == isa


def _reference(q, kv, tables, lens, scale, window, block):
    out = []
    flat = kv.float().view(2, -1, kv.shape[3], kv.shape[4])
    for n, length in enumerate(lens.tolist()):
        t = torch.arange(length)
        if window:
            t = t[t >= length - window]
        slots = tables[n][t // block] * block + t % block
        k, v = flat[0, slots].transpose(0, 1), flat[1, slots].transpose(0, 1)  # [Hkv, T, D]
        o = F.scaled_dot_product_attention(q[n].float()[:, None], k, v, scale=scale,
                                           enable_gqa=q.shape[1] != kv.shape[3])
        out.append(o[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 72, 20])  # 8-wide registers (64 + 8 columns), and the plain loops (20)
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(9, 3, None), (4, 4, None), (8, 2, 7), (6, 1, 40)])
def test_kernel_equals_gather_reference(isa, heads, kv_heads, window, dim, dtype) -> None:
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    blocks, block = 160, 16
    kv = torch.randn(2, blocks, block, kv_heads, dim, generator=g).to(dtype)
    lens = torch.tensor([1, 15, 16, 17, 70, 33, 301])
    nb = -(-int(lens.max()) // block)
    tables = torch.randperm(blocks, generator=g)[: len(lens) * nb].view(len(lens), nb)
    q = torch.randn(len(lens), heads, dim, generator=g)
    out = cpu_kernels.paged_decode_attention(q, kv, tables, lens, dim ** -0.5, window)
    torch.testing.assert_close(out, _reference(q, kv, tables, lens, dim ** -0.5, window, block),
                               atol=1e-5, rtol=1e-4)


def test_engine_outputs_equal_with_and_without_kernel(isa) -> None:
    cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 17, 40, 64, 5, 29)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    on = LLM(model, native=True, block_size=8, max_num_batched_tokens=48)
    off = LLM(model, native=False, block_size=8, max_num_batched_tokens=48)
    assert on.engine.cache.native and not off.engine.cache.native
    a = on.generate(prompts, params, use_tqdm=False)
    b = off.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for la, lb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            for tok, lp in la.items():
                assert abs(getattr(lp, "logprob", lp) - getattr(lb[tok], "logprob", lb[tok])) < 1e-4


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize(("rows", "in_features", "group"), [(1, 96, 32), (3, 100, 64), (16, 256, 128)])
def test_quantized_linear_native_equals_dequantized(isa, method, rows, in_features, group) -> None:
    from torch import nn

    from tinyllm.infer.quant import QuantLinear

    torch.manual_seed(rows)
    lin = nn.Linear(in_features, 50, bias=True)  # 50 rows: blocks of four plus a remainder of two
    native = QuantLinear(lin, method, group, native=True)
    ref = QuantLinear(lin, method, group, native=False)
    assert native.native and not ref.native
    x = torch.randn(2, rows, in_features) if rows > 1 else torch.randn(1, in_features)
    torch.testing.assert_close(native(x), ref(x), atol=2e-5, rtol=1e-5)
    big = torch.randn(40, in_features)  # more rows than NATIVE_MAX_ROWS: the dequantize path, same result
    torch.testing.assert_close(native(big), ref(big), atol=2e-5, rtol=1e-5)


def _close_to_sum(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> None:
    """fp32 sums in any order stay within a few ulps of Σ|terms| of the exact (float64) sum."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double() - ref).abs()
    bound = 1e-6 * magnitude + 1e-30
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g} vs bound {float(bound.min()):.3g}"


# (out rows, in columns): rows 1, 3, 5, 7 leave 1–3 rows after the blocks of four; columns 7, 23, 40, 129
# leave tails after 16- and 8-wide vector steps; 96×576 is a SmolLM2 width
@pytest.mark.parametrize(("n", "k"), [(1, 7), (3, 23), (4, 16), (5, 40), (7, 129), (96, 576)])
@pytest.mark.parametrize("m", [1, 5])
def test_int8_linear_equals_reference(isa, m, n, k) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    out = cpu_kernels.int8_linear(x, q, scale)
    ref = (x.double() @ q.double().T) * scale.double()
    _close_to_sum(out, ref, (x.double().abs() @ q.double().abs().T) * scale.double())


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(("n", "groups"), [(1, 1), (6, 3), (9, 2), (64, 4)])
@pytest.mark.parametrize("m", [1, 3])
def test_int4_linear_equals_reference(isa, m, n, groups, group) -> None:
    g = torch.Generator().manual_seed(n * 100 + groups * 10 + group)
    kp = groups * group
    x = torch.randn(m, kp, generator=g)
    codes = torch.randint(0, 16, (n, kp), generator=g)
    scale = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    zero = torch.randn(n, groups, generator=g) * 0.1
    out = cpu_kernels.int4_linear(x, pack_int4(codes), scale, zero, group)
    w = codes.double() * scale.double().repeat_interleave(group, 1) + zero.double().repeat_interleave(group, 1)
    _close_to_sum(out, x.double() @ w.T, x.double().abs() @ w.abs().T)


def test_int4_linear_rejects_bad_group(isa) -> None:
    x, packed = torch.randn(1, 96), torch.zeros(2, 48, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="group=48"):
        cpu_kernels.int4_linear(x, packed, torch.ones(2, 2), torch.zeros(2, 2), 48)


# ------------------------------------------------------------------ choosing the build
def test_default_is_the_widest_build_the_cpu_runs(fresh_state) -> None:
    assert cpu_kernels.load()
    assert cpu_kernels.active_isa() == capability.cpu_isa() == cpu_kernels.supported_isas()[0]


def test_environment_forces_a_lower_build(fresh_state, monkeypatch) -> None:
    monkeypatch.setenv("TINYLLM_NATIVE_ISA", "portable")
    assert cpu_kernels.load()
    assert cpu_kernels.active_isa() == "portable"
    x, q = torch.randn(1, 20), torch.ones(3, 20, dtype=torch.int8)
    torch.testing.assert_close(cpu_kernels.int8_linear(x, q, torch.ones(3)), x.sum(1, keepdim=True).expand(1, 3))


def test_build_the_cpu_lacks_falls_back_with_a_warning(fresh_state, monkeypatch) -> None:
    monkeypatch.setattr(capability, "cpu_isa", lambda: "portable")  # imitate a CPU without AVX2
    monkeypatch.setenv("TINYLLM_NATIVE_ISA", "avx2")
    assert cpu_kernels.supported_isas() == ("portable",)
    with pytest.warns(RuntimeWarning, match="TINYLLM_NATIVE_ISA=avx2"):
        assert cpu_kernels.load()
    assert cpu_kernels.active_isa() == "portable"
    assert "TINYLLM_NATIVE_ISA=avx2" in cpu_kernels.kernel_status()
    assert cpu_kernels.kernel_status().startswith("loaded (portable)")


def test_unknown_build_name_turns_kernels_off_and_names_it(fresh_state, monkeypatch) -> None:
    monkeypatch.setenv("TINYLLM_NATIVE_ISA", "sse9")
    assert not cpu_kernels.load()
    assert cpu_kernels.active_isa() is None
    assert "'sse9'" in cpu_kernels.kernel_status() and "avx2" in cpu_kernels.kernel_status()
    with pytest.raises(RuntimeError, match="not loaded"):
        cpu_kernels.int8_linear(torch.randn(1, 4), torch.ones(2, 4, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match="'neon'"):
        cpu_kernels.resolve_isa("neon")


def test_disabled_by_environment(fresh_state, monkeypatch) -> None:
    monkeypatch.setenv("TINYLLM_NATIVE", "0")
    assert not cpu_kernels.load()
    assert "TINYLLM_NATIVE=0" in cpu_kernels.kernel_status()
