"""FLOPs formulas: torch's FLOP counter on a real forward pass, the Chinchilla table, the notes' utilisation example."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tinyllm.calc.flops import (
    CHINCHILLA_TABLE,
    attention_flops_per_token,
    chinchilla_tokens,
    compute_optimal,
    forward_flops_per_token,
    gopher_units,
    model_flops_utilization,
    six_nd,
    tokens_per_second_per_gpu,
    training_flops,
    utilization,
)
from tinyllm.calc.params import count_parameters
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")


def counted_flops(model: torch.nn.Module, ids: torch.Tensor, backward: bool = False) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(ids)
        if backward:
            out.float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"head_dim": 24},
                                   {"mlp_type": "plain", "hidden_act": "gelu"}])
def test_forward_flops_equal_torch_flop_counter(extra: dict) -> None:
    """A full-square attention kernel does 4·L·T²·d_attn: the non-causal term; matmuls 2·N per token."""
    cfg = ModelConfig(**SMALL, **extra)
    model = build_model(cfg).eval()
    t = 16
    with torch.no_grad():
        counted = counted_flops(model, torch.randint(0, 256, (1, t)))
    norms = count_parameters(cfg).norms  # element-wise scaling, not a matmul
    expected = t * (forward_flops_per_token(cfg, t, causal=False) - 2 * norms)
    assert counted == expected


def test_kaplan_attention_term_is_the_causal_average() -> None:
    """Σ_t 4·t·d_attn over a causal sequence of n tokens ≈ n · 2·n·d_attn (exact up to the diagonal)."""
    cfg = ModelConfig(**SMALL)
    n, d_attn, layers = 512, 64, 2
    exact = sum(4 * (t + 1) * d_attn * layers for t in range(n))
    kaplan = n * attention_flops_per_token(cfg, n)
    assert kaplan == 2 * layers * n * n * d_attn
    assert abs(exact - kaplan) / kaplan == pytest.approx(1 / n)
    assert attention_flops_per_token(cfg, n, causal=False) == 2 * kaplan / n


def test_backward_is_twice_the_forward() -> None:
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg)
    ids = torch.randint(0, 256, (2, 8))
    fwd = counted_flops(model, ids)
    both = counted_flops(model, ids, backward=True)
    # the embedding gradient is a scatter, not a matmul; every other matmul costs 2× backward
    assert both == pytest.approx(3 * fwd, rel=0.02)
    assert training_flops(cfg, 16, context=8) == 3 * 16 * forward_flops_per_token(cfg, 8)


def test_llama7b_per_token_numbers() -> None:
    n = count_parameters("llama-7b")
    fwd = forward_flops_per_token("llama-7b", 2048)
    assert fwd == 2 * n.non_embedding + 2 * 4096 * 32000 + 2 * 32 * 2048 * 4096
    assert forward_flops_per_token("llama-7b") == 2 * (n.total - 32000 * 4096)  # head matmul, not the lookup
    # 6·N·D for LLaMA-7B on 1T tokens
    assert six_nd(n.total, 1e12) == pytest.approx(4.04e22, rel=1e-3)


def test_moe_counts_only_active_experts() -> None:
    dense = forward_flops_per_token("mixtral-8x7b")
    active = count_parameters("mixtral-8x7b").active
    assert dense == 2 * (active - 32000 * 4096)


CLOSE_ROWS = [row for row in CHINCHILLA_TABLE if row.params not in (67e9, 175e9)]


def _rel(row) -> float:
    return abs(six_nd(row.params, row.tokens) - row.flops) / row.flops


def test_chinchilla_table_reproduced_by_6nd() -> None:
    assert len(CHINCHILLA_TABLE) == 9 and len(CLOSE_ROWS) == 7
    # "within 0.2%" at the notes' one-decimal precision (worst: the 10T row, 0.215%)
    assert all(round(100 * _rel(r), 1) <= 0.2 for r in CLOSE_ROWS)
    rows = {r.params: r for r in CHINCHILLA_TABLE}
    assert round(100 * _rel(rows[175e9]), 1) == 0.9
    assert round(100 * _rel(rows[67e9]), 1) == 4.7
    assert all(20 <= r.tokens / r.params <= 22 for r in CLOSE_ROWS)


def test_chinchilla_helpers() -> None:
    assert chinchilla_tokens(400e6) == 8e9
    n, d = compute_optimal(1.92e19)
    assert n == pytest.approx(400e6) and d == pytest.approx(8e9)
    assert six_nd(n, d) == pytest.approx(1.92e19)
    # the Gopher-unit column: 1/29,968 and 1/4,761 of Gopher's budget
    assert 1 / gopher_units(1.92e19) == pytest.approx(29_968, rel=2e-3)
    assert 1 / gopher_units(1.21e20) == pytest.approx(4_761, rel=2e-3)
    with pytest.raises(ValueError, match="flops=-1"):
        compute_optimal(-1)


def test_notes_gpu_utilization_example() -> None:
    assert round(100 * utilization(100e12, 312e12), 2) == 32.05
    tps = tokens_per_second_per_gpu(3, 2048, 4)
    assert tps == 1536
    # 46.5454...%: the notes truncate to 46.54%
    assert math.floor(10_000 * utilization(tps, 3300)) / 100 == 46.54
    # MFU of LLaMA-7B at the paper's 3300 tokens/s/GPU on a 312 TFLOP/s A100
    mfu = model_flops_utilization(count_parameters("llama-7b").total, 3300)
    assert mfu == pytest.approx(6 * 6_738_415_616 * 3300 / 312e12)
    assert 0.42 < mfu < 0.43
    with pytest.raises(ValueError, match="peak=0"):
        utilization(1.0, 0)
