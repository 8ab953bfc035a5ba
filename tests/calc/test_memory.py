"""Memory arithmetic: real KV-cache buffers, the notes' worked numbers (16Ψ, ZeRO table, Megatron activations,
pipeline bubbles), and a simulated pipeline schedule."""

from __future__ import annotations

import pytest
import torch

from tinyllm.calc.memory import (
    GB,
    GiB,
    activation_bytes_per_layer,
    as_fraction_of_step,
    dtype_bytes,
    format_bytes,
    gpipe_bubble,
    interleaved_bubble,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    model_state_bytes,
    naive_pipeline_bubble,
    transfer_seconds,
    weight_bytes,
    zero_communication_elements,
    zero_model_state_bytes,
)
from tinyllm.calc.params import count_parameters
from tinyllm.infer.kv_cache import ContiguousKVCache
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model


# ------------------------------------------------------------------ KV cache
def test_llama2_7b_fp16_kv_cache_is_2_gib_for_4096_tokens() -> None:
    assert kv_cache_bytes_per_token("llama2-7b") / 32 == 16 * 1024  # 16 KiB per token per layer
    assert kv_cache_bytes_per_token("llama2-7b") == 512 * 1024  # 512 KiB per token
    assert kv_cache_bytes("llama2-7b", 1, 1024) == 512 * 2**20  # 512 MiB per 1024 tokens
    assert kv_cache_bytes("llama2-7b", 1, 4096) == 2 * GiB == 2_147_483_648
    assert kv_cache_bytes("llama2-7b", 8, 4096, bytes_per_elem=4) == 8 * 2 * 2 * GiB


def test_gqa_shrinks_the_cache_by_heads_over_kv_heads() -> None:
    # Llama-2-70B: 80 layers × 8 KV heads vs a 64-KV-head (MHA) variant of itself: 8× smaller
    mha = ModelConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
    assert kv_cache_bytes(mha, 1, 4096) == 8 * kv_cache_bytes("llama2-70b", 1, 4096)
    assert kv_cache_bytes_per_token("llama2-70b") == 2 * 80 * 8 * 128 * 2  # 320 KiB
    assert kv_cache_bytes_per_token("llama3-8b", "bf16") == 128 * 1024


def test_kv_cache_equals_the_real_cache_buffers() -> None:
    """The tensors our contiguous cache and transformers' DynamicCache hold after a prefill."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    batch, seq = 2, 11
    model = build_model(cfg).eval()
    cache = ContiguousKVCache.for_model(model, batch, capacity=seq)
    with torch.no_grad():
        model(torch.randint(0, 128, (batch, seq)), cache=cache)
    ours = sum(t.nbytes for t in cache.k + cache.v)
    assert ours == kv_cache_bytes(cfg, batch, seq, bytes_per_elem=4)

    hf_cfg = transformers.AutoConfig.for_model("llama", **{k: v for k, v in cfg.to_hf().items()
                                                           if k not in ("model_type", "architectures")})
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        past = hf(torch.randint(0, 128, (batch, seq)), use_cache=True).past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in past.layers)
    assert held == kv_cache_bytes(cfg, batch, seq, bytes_per_elem="bf16")


def test_dtype_names_and_bad_values() -> None:
    assert dtype_bytes("fp16") == dtype_bytes("bf16") == dtype_bytes("2") == 2
    assert dtype_bytes("int4") == 0.5 and dtype_bytes(4) == 4
    with pytest.raises(ValueError, match="'fp13'"):
        dtype_bytes("fp13")
    with pytest.raises(ValueError, match="batch=-1"):
        kv_cache_bytes("llama2-7b", -1, 16)


# ------------------------------------------------------------------ model states
def test_16_psi_and_gpt2_example() -> None:
    psi = 1.5e9
    mixed = model_state_bytes(psi, "mixed", "adam")
    assert mixed.weights == 3 * GB  # fp16 weights: 3 GB
    assert mixed.total == 24 * GB == 16 * psi  # 2 + 2 + 12 bytes per parameter
    assert mixed.optimizer == 12 * psi  # K = 12: fp32 master, momentum, variance
    assert model_state_bytes(psi, "fp32", "adam").total == 16 * psi  # 4 + 4 + 8
    assert weight_bytes(psi, "fp32") == 6 * GB  # the fused fp32 all-reduce buffer of the notes
    assert weight_bytes(1e6, "fp32") == 4e6 and weight_bytes(1e6, "fp16") == 2e6
    assert weight_bytes(13e9) == 26 * GB  # a 13B checkpoint in fp16
    assert model_state_bytes(psi, "fp32", "sgd").total == 8 * psi
    with pytest.raises(ValueError, match="'lion'"):
        model_state_bytes(psi, optimizer="lion")
    with pytest.raises(ValueError, match="'fp8'"):
        model_state_bytes(psi, precision="fp8")


def test_model_states_match_real_adam_state() -> None:
    """Bytes held by torch's Adam after one step, fp32: 4 weight + 4 grad + 8 (exp_avg, exp_avg_sq)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, tie_word_embeddings=True)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (1, 8))).float().pow(2).mean().backward()
    opt.step()
    params = list(model.parameters())
    weights = sum(p.nbytes for p in params)
    grads = sum(p.grad.nbytes for p in params)
    states = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
    expected = model_state_bytes(count_parameters(cfg).total, "fp32", "adam")
    assert (weights, grads, states) == (expected.weights, expected.gradients, expected.optimizer)


def test_zero_table_of_the_notes() -> None:
    psi, n = 7.5e9, 64
    per_gpu = [zero_model_state_bytes(psi, n, stage).total / GB for stage in range(4)]
    assert per_gpu == pytest.approx([120, 31.40625, 16.640625, 1.875])
    assert [round(x, 1) for x in per_gpu] == [120.0, 31.4, 16.6, 1.9]
    # stage 1 approaches 4Ψ (4× less than 16Ψ), stage 2 approaches 2Ψ (8×), stage 3 falls linearly in N
    assert zero_model_state_bytes(psi, 10**6, 1).total == pytest.approx(4 * psi, rel=1e-4)
    assert zero_model_state_bytes(psi, 10**6, 2).total == pytest.approx(2 * psi, rel=1e-4)
    assert zero_model_state_bytes(psi, 2 * n, 3).total == zero_model_state_bytes(psi, n, 3).total / 2
    with pytest.raises(ValueError, match="stage=4"):
        zero_model_state_bytes(psi, n, 4)


def test_zero3_communication_on_10gbit_ethernet() -> None:
    elements = zero_communication_elements(65e9, 3)
    assert elements == 195e9 == 1.5 * zero_communication_elements(65e9, 2)
    assert transfer_seconds(elements * 1, 10) == pytest.approx(156)  # the notes count one byte per element
    assert transfer_seconds(elements * 2, 10) == pytest.approx(312)  # fp16: 390 GB


# ------------------------------------------------------------------ activations
def test_megatron_activation_memory_example() -> None:
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    none = activation_bytes_per_layer(s, b, h, a)
    tp = activation_bytes_per_layer(s, b, h, a, tp=t)
    tp_sp = activation_bytes_per_layer(s, b, h, a, tp=t, sequence_parallel=True)
    assert none == s * b * h * (34 + 5 * a * s / h)
    assert tp == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert tp_sp == none / t
    assert [round(x / GiB, 2) for x in (none, tp, tp_sp)] == [2.67, 0.54, 0.33]
    # tensor parallel with t = 1 is the unsharded formula; selective recompute drops the 5as/h term
    assert activation_bytes_per_layer(s, b, h, a, tp=1) == none
    assert activation_bytes_per_layer(s, b, h, a, tp=t, sequence_parallel=True,
                                      recompute="selective") == s * b * h * 34 / t
    assert activation_bytes_per_layer(s, b, h, a, recompute="full") == 2 * s * b * h
    with pytest.raises(ValueError, match="'some'"):
        activation_bytes_per_layer(s, b, h, a, recompute="some")


# ------------------------------------------------------------------ pipeline bubbles
def simulate_pipeline(stages: int, micro: int) -> float:
    """Idle fraction of an F-then-B (GPipe) schedule with unit-time forward and backward steps."""
    busy: dict[tuple[int, int], bool] = {}
    finish_f: dict[tuple[int, int], int] = {}
    for m in range(micro):  # forward wave: stage k runs micro-batch m once stage k−1 did and k is free
        for k in range(stages):
            start = max(finish_f.get((k - 1, m), 0), finish_f.get((k, m - 1), 0))
            finish_f[(k, m)] = start + 1
            busy[(k, start)] = True
    t0 = max(finish_f.values())
    finish_b: dict[tuple[int, int], int] = {}
    for m in range(micro):  # backward wave runs from the last stage to the first
        for k in reversed(range(stages)):
            start = max(finish_b.get((k + 1, m), t0), finish_b.get((k, m - 1), t0))
            finish_b[(k, m)] = start + 1
            busy[(k, start)] = True
    total = max(finish_b.values())
    return 1 - len(busy) / (stages * total)


@pytest.mark.parametrize(("k", "m"), [(4, 1), (4, 8), (2, 3), (8, 16)])
def test_gpipe_bubble_equals_a_simulated_schedule(k: int, m: int) -> None:
    assert simulate_pipeline(k, m) == pytest.approx(gpipe_bubble(k, m))


def test_bubble_formulas() -> None:
    assert naive_pipeline_bubble(4) == gpipe_bubble(4, 1) == 0.75
    assert gpipe_bubble(4, 8) == pytest.approx(0.2727, abs=1e-4)
    # interleaved: bubble over ideal time; v = 1 converts back to GPipe's fraction of the step
    assert as_fraction_of_step(interleaved_bubble(4, 8, 1)) == pytest.approx(gpipe_bubble(4, 8))
    assert interleaved_bubble(4, 8, 2) == interleaved_bubble(4, 8, 1) / 2
    with pytest.raises(ValueError, match="micro_batches=6"):
        interleaved_bubble(4, 6, 2)


def test_format_bytes_keeps_units_apart() -> None:
    assert format_bytes(2 * GiB) == "2.00 GiB = 2.15 GB (2,147,483,648 bytes)"
