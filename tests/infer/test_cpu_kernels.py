"""The native paged decode kernel equals the torch reference (gather the context, then SDPA): GQA and MHA,
ragged contexts over scrambled blocks, sliding windows, fp32 and bf16 pools; the engine's greedy tokens
and log-probs are the same with the kernel on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyllm import LLM, SamplingParams
from tinyllm.infer import cpu_kernels
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    if not cpu_kernels.load():
        pytest.skip(f"native kernel unavailable: {cpu_kernels.kernel_status()}")


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
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(9, 3, None), (4, 4, None), (8, 2, 7), (6, 1, 40)])
def test_kernel_equals_gather_reference(heads, kv_heads, window, dtype) -> None:
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    blocks, block, dim = 48, 16, 32
    kv = torch.randn(2, blocks, block, kv_heads, dim, generator=g).to(dtype)
    lens = torch.tensor([1, 15, 16, 17, 70, 33])
    nb = -(-int(lens.max()) // block)
    tables = torch.randperm(blocks, generator=g)[: len(lens) * nb].view(len(lens), nb)
    q = torch.randn(len(lens), heads, dim, generator=g)
    out = cpu_kernels.paged_decode_attention(q, kv, tables, lens, dim ** -0.5, window)
    torch.testing.assert_close(out, _reference(q, kv, tables, lens, dim ** -0.5, window, block),
                               atol=1e-5, rtol=1e-4)


def test_engine_outputs_equal_with_and_without_kernel() -> None:
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


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setitem(cpu_kernels._state, "loaded", None)
    monkeypatch.setenv("TINYLLM_NATIVE", "0")
    assert not cpu_kernels.load()
    assert "TINYLLM_NATIVE=0" in cpu_kernels.kernel_status()


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize(("rows", "in_features", "group"), [(1, 96, 32), (3, 100, 64), (16, 256, 128)])
def test_quantized_linear_native_equals_dequantized(method, rows, in_features, group) -> None:
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
