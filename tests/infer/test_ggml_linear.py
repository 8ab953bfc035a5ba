"""GGUF blocks run as stored: the native Q4_0/Q4_1/Q8_0 matrix–vector kernel equals dequantize-then-matmul
on every build this CPU runs (leftover rows, one and several input rows, rows of one block); `GGMLLinear`
keeps the file's bytes and switches to the reference for long inputs; on SmolLM2-135M the engine over the
file's own blocks decodes the same greedy tokens as the engine over the dequantized fp32 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as ref_quantize
from hf_helpers import smollm2_path

from tinyllm.infer import cpu_kernels
from tinyllm.infer.cpu_kernels import NATIVE_MAX_ROWS
from tinyllm.infer.ggml_linear import GGMLLinear, quantize_blocks, use_gguf_blocks
from tinyllm.infer.quant import quantize_model
from tinyllm.model.gguf import dequantize

pytestmark = pytest.mark.usefixtures("one_thread")
TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Real llama.cpp blocks of a random weight [n, k] (gguf's own quantizer), rows of varied scale."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    w[1] = 0.0  # an all-zero row: scale 0
    return torch.from_numpy(ref_quantize(w, getattr(Q, qtype)).copy())


def _weight(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(dequantize(blocks.numpy(), qtype)).view(blocks.shape[0], -1)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 576), (1, 37, 96), (3, 13, 32), (NATIVE_MAX_ROWS, 40, 1536)])
def test_kernel_equals_dequantized_matmul(isa, qtype, m, n, k) -> None:
    blocks = _blocks(qtype, n, k, seed=m * n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    ref = (x.double() @ _weight(blocks, qtype).double().T).float()
    y = cpu_kernels.ggml_linear(x, blocks, qtype)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # fp32 sums in another order than the fp64 reference: error ∝ sqrt(k)·|x|·|w|
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=2e-5 * k**0.5 * float(ref.abs().max()) ** 0.5 + 1e-5)


def _xq8_reference(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """llama.cpp's arithmetic in float64: x rounded by `quantize_x_q8`, each block's product with the codes
    scaled by d_w·d_x, and for Q4_1 the block minimum times s_x (the rounded d_x·Σcodes) added."""
    codes, d, s = cpu_kernels.quantize_x_q8(x)
    n, k = blocks.shape[0], x.shape[1]
    xhat = (codes.double().view(-1, k // 32, 32) * d.double()[..., None]).view(-1, k)
    w = _weight(blocks, qtype).double()
    if qtype != "Q4_1":
        return (xhat @ w.T).float()
    m = blocks.view(n, k // 32, 20)[..., 2:4].contiguous().view(torch.float16).double()[..., 0]  # [n, k/32]
    scaled = w - m.repeat_interleave(32, dim=1)  # d_w · codes
    return (xhat @ scaled.T + s.double() @ m.T).float()


def test_quantize_x_q8_matches_llama_cpp_rule() -> None:
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5] + [0.0] * 29])
    codes, d, s = cpu_kernels.quantize_x_q8(x)
    assert codes[0, :32].abs().sum() == 0 and d[0, 0] == 0 and s[0, 0] == 0  # an all-zero block: scale 0
    assert codes[0, 32:35].tolist() == [64, -127, 32]  # 63.5 rounds half to even; amax → ±127
    assert d[0, 1] == torch.tensor(2 / 127).half().float() and s[0, 1] == torch.tensor(2 / 127 * -31).half().float()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 576), (1, 37, 96), (3, 13, 32), (NATIVE_MAX_ROWS, 40, 1536)])
def test_kernel_with_int8_activations_equals_llama_cpp_arithmetic(isa, qtype, m, n, k) -> None:
    blocks = _blocks(qtype, n, k, seed=m * n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    x[0, :32] = 0.0  # a block of x with scale 0
    y = cpu_kernels.ggml_linear(x, blocks, qtype, x_q8=True)
    ref = _xq8_reference(x, blocks, qtype)
    # the block sums are exact integers: only the fp32 order of the scaled sums differs
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=2e-5 * k**0.5 * float(ref.abs().max()) ** 0.5 + 1e-5)
    exact = cpu_kernels.ggml_linear(x, blocks, qtype)  # and it stays near the fp32-activation product
    assert float((y - exact).abs().max()) <= 0.02 * float(exact.abs().max()) + 1e-4


def test_kernel_rejects_bad_layout(isa) -> None:
    blocks = _blocks("Q4_1", 8, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernels.ggml_linear(torch.randn(1, 48), blocks[:, :30], "Q4_1")
    with pytest.raises(RuntimeError, match="uint8"):
        cpu_kernels.ggml_linear(torch.randn(1, 64), blocks[:, :20], "Q4_1")  # one block's bytes for two


@pytest.mark.parametrize("qtype", TYPES)
def test_module_native_and_reference_paths(isa, qtype) -> None:
    blocks = _blocks(qtype, 24, 128)
    bias = torch.randn(24)
    lin = GGMLLinear(qtype, blocks, 128, bias)
    ref = torch.nn.functional.linear
    w = _weight(blocks, qtype)
    assert lin.native and torch.equal(lin.dequantize(), w)
    assert lin.blocks.data_ptr() == blocks.data_ptr() or torch.equal(lin.blocks, blocks)  # the bytes as given
    short = torch.randn(2, 5, 128)  # 10 rows: the kernel
    torch.testing.assert_close(lin(short), ref(short, w, bias), rtol=1e-4, atol=1e-4)
    long = torch.randn(NATIVE_MAX_ROWS + 1, 128)  # past the kernel's rows: dequantize + matmul, exactly
    torch.testing.assert_close(lin(long), ref(long, w, bias), rtol=0, atol=0)


def test_module_rejects_bad_blocks() -> None:
    with pytest.raises(ValueError, match="'Q5_0'"):
        GGMLLinear("Q5_0", torch.zeros(4, 22, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match="in_features=40"):
        GGMLLinear("Q8_0", torch.zeros(4, 34, dtype=torch.uint8), 40)
    with pytest.raises(ValueError, match=r"uint8 \[out, 40\] for Q4_1"):
        GGMLLinear("Q4_1", torch.zeros(4, 34, dtype=torch.uint8), 64)


def test_use_gguf_blocks_needs_block_tensors() -> None:
    path = smollm2_path()
    with pytest.raises(ValueError, match="no linear layer"):
        use_gguf_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)), path)


def test_smollm2_engine_on_gguf_blocks_matches_fp32() -> None:
    from tinyllm import LLM, SamplingParams
    from tinyllm.model.gguf import read_gguf_blocks

    path = smollm2_path()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompt = [1, 4093, 314, 253, 2165, 30, 198, 2]
    blocks = LLM(path, quantization="gguf", gguf_activations="fp32", max_model_len=128, max_num_seqs=2)
    model = blocks.engine.model if hasattr(blocks.engine, "model") else blocks.engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    assert len(layers) == 30 * 7 + 1  # every projection and the tied head (Q8_0 token_embd)
    assert model.lm_head.ggml_type == "Q8_0" and all(m.native for m in layers)
    # the bytes a decode step reads are the file's bytes: every stored block tensor, once
    stored = read_gguf_blocks(path)
    assert sum(m.blocks.nbytes for m in layers) == sum(r.nbytes for _, r in stored.values())
    ours = blocks.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    del blocks, model, layers
    ref = LLM(path, max_model_len=128, max_num_seqs=2).generate([prompt], params, use_tqdm=False)
    assert ours == ref[0].outputs[0].token_ids


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_quantize_blocks_equals_llama_cpp_reference(qtype) -> None:
    """Our quantizer writes the bytes gguf's reference quantizer writes: random rows of varied scale, an all-zero
    row, a constant row (Q4_1: d = 0), and rows of exact halves (roundf rounds them away from zero)."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((40, 128)) * rng.uniform(1e-3, 4.0, (40, 1))).astype(np.float32)
    w[1] = 0.0
    w[2] = 0.75
    w[3] = (np.arange(128) % 32 - 15.5).astype(np.float32)  # Q4_1 codes (w - min)/d land on whole steps
    w[4, :32] = np.float32(127 / 2) * np.sign(rng.standard_normal(32)).astype(np.float32)
    w[4, 0] = 127.0  # Q8_0: d = 1, the others ±63.5 → ±64
    got = quantize_blocks(torch.from_numpy(w), qtype)
    assert torch.equal(got, torch.from_numpy(ref_quantize(w, getattr(Q, qtype)).copy()))
    back = torch.from_numpy(dequantize(got.numpy(), qtype)).view(40, 128)  # within half a step of w
    assert (back - torch.from_numpy(w)).abs().max() <= np.abs(w).max() / (15 if qtype == "Q4_1" else 127)


def test_quantize_blocks_errors() -> None:
    with pytest.raises(ValueError, match="Q4_0"):
        quantize_blocks(torch.zeros(2, 32), "Q4_0")
    with pytest.raises(ValueError, match=r"\(2, 48\)"):
        quantize_blocks(torch.zeros(2, 48), "Q8_0")


def test_quantize_model_to_llama_cpp_blocks() -> None:
    """`quantize_model(m, "q4_1" | "q8_0")`: every Linear becomes a GGMLLinear on its own weights' blocks, with
    int8-rounded activations (llama.cpp's arithmetic), close to the fp32 layer; a width blocks cannot hold is
    refused by name."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8, bias=False))
    x = torch.randn(3, 64)
    ref = m(x)
    for method, qtype, tol in (("q8_0", "Q8_0", 0.02), ("q4_1", "Q4_1", 0.15)):
        q = quantize_model(m, method, skip=(), inplace=False)
        assert all(isinstance(q[i], GGMLLinear) and q[i].ggml_type == qtype and q[i].x_q8 for i in (0, 2))
        assert torch.equal(q[0].blocks, quantize_blocks(m[0].weight, qtype))
        assert (q(x) - ref).abs().max() < tol * ref.abs().max()
    with pytest.raises(ValueError, match="0: in_features=48"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(48, 8)), "q4_1", skip=())


@pytest.mark.parametrize("qtype", TYPES)
def test_native_dequantize_equals_reference(isa, qtype) -> None:
    """The native dequantizer (the prefill path's) gives numpy's values exactly, rows of any scale."""
    blocks = _blocks(qtype, 67, 320, seed=5)
    lin = GGMLLinear(qtype, blocks, 320)
    assert lin.native
    assert torch.equal(cpu_kernels.ggml_dequantize(blocks, qtype), lin.dequantize_reference())
    assert torch.equal(lin.dequantize(), _weight(blocks, qtype))


def test_llm_quantization_q4_1_runs_llama_cpp_blocks() -> None:
    """`LLM(model, quantization="q4_1")`: every layer's Linear on Q4_1 blocks written from its weights, the LM
    head kept; it decodes."""
    from tinyllm import LLM, SamplingParams
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    llm = LLM(model, quantization="q4_1")
    mlp = llm.engine.runner.model.model.layers[1].mlp
    assert isinstance(mlp.down_proj, GGMLLinear) and mlp.down_proj.ggml_type == "Q4_1"
    assert type(llm.engine.runner.model.lm_head) is torch.nn.Linear
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
