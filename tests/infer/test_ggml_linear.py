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
from tinyllm.infer.ggml_linear import GGMLLinear, use_gguf_blocks
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
