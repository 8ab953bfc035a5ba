"""NF4 + double quantization and QLoRA: the paper's code values, error bounds, bits per parameter, forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model
from tinyllm.train.peft import LoraConfig, QLoraConfig, apply_qlora, base_weight_memory, merge_and_unload
from tinyllm.train.peft.nf4 import (
    NF4_CODE,
    NF4Linear,
    bits_per_parameter,
    dequantize_absmax,
    dequantize_nf4,
    dequantize_nf4_reference,
    nf4_code_values,
    quantize_nf4,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# QLoRA paper (Dettmers et al. 2023), appendix E, as printed (= bitsandbytes' NF4 table)
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_code_values_are_the_papers() -> None:
    assert NF4_CODE.tolist() == pytest.approx(PAPER_NF4, abs=0)
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE == 0).sum() == 1 and (NF4_CODE > 0).sum() == 8
    # rebuilt from normal quantiles as the paper constructs them
    torch.testing.assert_close(nf4_code_values(), torch.tensor(PAPER_NF4, dtype=torch.float64), atol=2e-7,
                               rtol=0)  # the published table went through float32


def test_bits_per_parameter_closed_form_and_measured() -> None:
    assert bits_per_parameter(double_quant=False) == 4.5
    assert bits_per_parameter(double_quant=True) == pytest.approx(4.127, abs=5e-4)  # 4 + 8/64 + 32/16384
    w = torch.randn(256, 1024)  # 4096 blocks of 64, 16 DQ blocks of 256
    for dq, bits in ((True, 4 + 8 / 64 + 32 / 16384), (False, 4.5)):
        state = quantize_nf4(w, double_quant=dq)
        stored = sum(state[k].numel() * state[k].element_size() * 8 for k in
                     ("packed", "absmax", "absmax_q", "absmax_scale") if k in state)
        assert stored / w.numel() == bits


def test_quantize_dequantize_error_bound() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g) * 0.02  # 7680 = 120 blocks
    state = quantize_nf4(w, double_quant=False)
    absmax = w.reshape(-1, 64).abs().amax(1)
    err = (dequantize_nf4(state) - w).reshape(-1, 64).abs()
    half_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2  # between −1 and −0.6962: 0.1519
    assert half_gap == pytest.approx(0.15190, abs=1e-5)
    assert bool((err <= half_gap * absmax[:, None] + 1e-9).all())
    # each block's absmax is exact (code ±1), zero stays zero
    w[0, :64] = 0
    d = dequantize_nf4(quantize_nf4(w, double_quant=False))
    assert torch.equal(d[0, :64], torch.zeros(64))
    # double quantization: |c − ĉ| ≤ s₂/254 per constant, s₂ = absmax of the centred constants in its block
    dq = quantize_nf4(w)
    exact = w.reshape(-1, 64).abs().amax(1)
    scale = dq["absmax_scale"].repeat_interleave(256)[: exact.numel()]
    assert bool(((dequantize_absmax(dq) - exact).abs() <= scale / 254 + 1e-9).all())


def test_fast_dequantize_equals_the_reference() -> None:
    w = torch.randn(33, 100)  # 3300 weights: padded last block
    for dq in (True, False):
        state = quantize_nf4(w, double_quant=dq)
        # one product absmax · code per weight in both: a single IEEE rounding, bit-equal on any CPU
        torch.testing.assert_close(dequantize_nf4(state), dequantize_nf4_reference(state), atol=0, rtol=0)
        torch.testing.assert_close(dequantize_nf4(state, torch.bfloat16),
                                   dequantize_nf4_reference(state).to(torch.bfloat16), atol=1e-2, rtol=1e-2)


def test_nibble_order_and_odd_sizes() -> None:
    w = torch.tensor([[-1.0, 1.0, 0.0, 0.5]])  # block absmax 1 → codes 0, 15, 7, 12 (0.44 < 0.5 < 0.56)
    state = quantize_nf4(w, block_size=4, double_quant=False)
    assert state["packed"].tolist() == [0x0F, 0x7C]  # first weight in the high nibble (bitsandbytes order)
    odd = torch.randn(7, 9)  # 63 weights: the last block is zero-padded
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(odd)).shape, odd.shape)
    with pytest.raises(ValueError, match="block_size=3"):
        quantize_nf4(odd, block_size=3)
    with pytest.raises(ValueError, match="float tensor"):
        quantize_nf4(torch.ones(4, dtype=torch.int64))


def test_nf4_beats_int4_on_normal_weights() -> None:
    w = torch.randn(64 * 512, generator=torch.Generator().manual_seed(0))
    nf4 = dequantize_nf4(quantize_nf4(w, double_quant=False))
    blocks = w.view(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True) / 7  # symmetric int4 absmax, levels −7..7
    int4 = (torch.round(blocks / scale).clamp(-7, 7) * scale).view(-1)
    assert (nf4 - w).pow(2).mean() < 0.8 * (int4 - w).pow(2).mean()


def test_nf4_linear_forward_and_backward_equal_the_dequantized_linear() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    q = NF4Linear(lin)
    ref = nn.Linear(64, 48)
    ref.weight.data = q.dequantize()
    ref.bias.data = lin.bias.data.clone()
    x1 = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    torch.testing.assert_close(q(x1), ref(x2), atol=1e-6, rtol=0)
    q(x1).sum().backward()
    ref(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in q.parameters())


CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def test_qlora_forward_equals_dequantized_weight_forward_and_trains_lora_only() -> None:
    torch.manual_seed(0)
    m = build_model(CFG).eval()
    x = torch.randint(0, 97, (2, 9))
    apply_qlora(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    out = m(x)
    # the oracle: plain linears holding the dequantized weights, LoRA merged in
    merged = merge_and_unload(m)
    torch.testing.assert_close(merged(x), out, atol=2e-5, rtol=0)

    torch.manual_seed(0)
    m = build_model(CFG)
    apply_qlora(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    m.train()
    m(x).float().pow(2).mean().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


def test_qlora_under_bf16_autocast_runs_bf16_matmuls() -> None:
    torch.manual_seed(0)
    m = apply_qlora(build_model(CFG), LoraConfig(r=4), QLoraConfig(compute_dtype="bf16"))
    x = torch.randint(0, 97, (1, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="compute_dtype='fp16'"):
        QLoraConfig(compute_dtype="fp16")


def test_base_weight_memory_report() -> None:
    torch.manual_seed(0)
    m = build_model(CFG)
    before = base_weight_memory(m)
    n = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # per layer q, k, v, o, gate/up/down
    assert before["parameters"] == n
    assert before["fp32"] == 4 * n and before["bf16"] == 2 * n
    apply_qlora(m, LoraConfig(r=4))
    after = base_weight_memory(m)
    assert after["parameters"] == n
    # 4.127 plus, per small tensor, one fp32 μ and one partly filled DQ block
    assert 4.127 < after["bits_measured"] < 4.16
    assert after["nf4_dq_measured"] < after["nf4"] < after["bf16"] < after["fp32"]
