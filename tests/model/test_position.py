"""Position encodings (notes ch.02.3): RoPE and its scalings, ALiBi, sinusoidal and learned tables.

RoPE frequencies and cos/sin equal transformers' (`ROPE_INIT_FUNCTIONS`, `LlamaRotaryEmbedding`) for default,
linear, dynamic NTK, YaRN (incl. mscale/mscale_all_dim, attention_factor, beta_fast/beta_slow, truncate=False)
and llama3; RoPE's relative property; rotate-half RoPE equals Meta's complex-pair RoPE up to a permutation;
ALiBi slopes follow the paper (and BLOOM's `build_alibi_tensor`); the sinusoidal table is interleaved and
shifts by a rotation; learned positions refuse positions past the table.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tinyllm.model.config import ModelConfig
from tinyllm.model.position import (
    AlibiPosition,
    LearnedPosition,
    RotaryPosition,
    SinusoidalPosition,
    alibi_slopes,
    apply_rotary,
    sinusoidal_table,
)

HEAD_DIM, MAX_POS = 32, 128

SCALINGS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 32},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.5,
                              "original_max_position_embeddings": 32},
    "yarn-betas-untruncated": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 2,
                               "truncate": False, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
}


def _pair(scaling: dict[str, Any] | None, theta: float = 10000.0):
    ours = RotaryPosition(ModelConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=MAX_POS,
                                      rope_theta=theta, rope_scaling=scaling))
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    hf_cfg = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POS, rope_parameters=params)
    return ours, hf_cfg


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rope_frequencies_match_transformers(name: str) -> None:
    ours, hf_cfg = _pair(SCALINGS[name], theta=50000.0)
    rtype = hf_cfg.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(rtype, LlamaRotaryEmbedding.compute_default_rope_parameters)
    inv, attn = init(hf_cfg)
    torch.testing.assert_close(ours.inv_freq, inv, atol=0, rtol=1e-6)
    assert ours.attention_scaling == pytest.approx(attn, rel=1e-12)
    if name == "yarn-mscale":  # DeepSeek's recipe: (0.1·1·ln40 + 1) / (0.1·0.707·ln40 + 1)
        assert attn == pytest.approx((0.1 * math.log(40) + 1) / (0.1 * 0.707 * math.log(40) + 1))
    if name == "yarn-attention-factor":
        assert ours.attention_scaling == 1.5


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("length", [40, 300])  # 300 > max_position_embeddings: dynamic NTK engages
def test_rope_cos_sin_match_transformers(name: str, length: int) -> None:
    ours, hf_cfg = _pair(SCALINGS[name])
    pos = torch.arange(length)[None].expand(2, length)
    cos, sin = ours.rotary(pos)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), pos)
    torch.testing.assert_close(cos, hf_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=1e-5, rtol=0)


def test_dynamic_ntk_base_formula() -> None:
    ours, hf_cfg = _pair(SCALINGS["dynamic"])
    assert torch.equal(ours.frequencies(MAX_POS), ours.inv_freq)  # unchanged up to the trained length
    L = 3 * MAX_POS
    base = 10000.0 * (2.0 * L / MAX_POS - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    expect = 1.0 / base ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    torch.testing.assert_close(ours.frequencies(L), expect, atol=0, rtol=1e-6)
    torch.testing.assert_close(ours.frequencies(L), ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, seq_len=L)[0],
                               atol=0, rtol=1e-6)


def test_linear_scaling_is_position_interpolation() -> None:
    plain, _ = _pair(None)
    linear, _ = _pair(SCALINGS["linear"])
    pos = torch.arange(64)[None]
    torch.testing.assert_close(linear.rotary(pos)[0], plain.rotary(pos.float() / 4.0)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["default", "linear", "yarn", "llama3"])
def test_rope_relative_property(name: str) -> None:
    """⟨R_m q, R_n k⟩ depends only on m − n (scaled by attention_scaling² for YaRN)."""
    rope, _ = _pair(SCALINGS[name])
    q, k = torch.randn(1, 1, 1, HEAD_DIM), torch.randn(1, 1, 1, HEAD_DIM)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope.rotary(torch.tensor([[m]]))
        ck, sk = rope.rotary(torch.tensor([[n]]))
        return (apply_rotary(q.double(), cq.double(), sq.double())
                * apply_rotary(k.double(), ck.double(), sk.double())).sum()

    for m, n in [(5, 2), (20, 17), (103, 100)]:
        torch.testing.assert_close(score(m, n), score(3, 0), atol=1e-4, rtol=0)
    # rotation preserves the norm (up to the YaRN attention factor)
    c, s = rope.rotary(torch.tensor([[37]]))
    torch.testing.assert_close(apply_rotary(q, c, s).norm(), q.norm() * rope.attention_scaling, atol=1e-4, rtol=0)


def test_rotate_half_equals_meta_complex_rope_up_to_permutation() -> None:
    """Meta rotates adjacent pairs (x0+ix1, x2+ix3, …); HF/tinyllm rotate (x_i, x_{i+d/2}). Same map, permuted."""
    rope, _ = _pair(None)
    x = torch.randn(1, 1, 9, HEAD_DIM)
    pos = torch.arange(9)[None]
    freqs = torch.outer(torch.arange(9).float(), rope.inv_freq)  # [T, d/2]
    meta = torch.view_as_real(torch.view_as_complex(x.reshape(1, 1, 9, HEAD_DIM // 2, 2))
                              * torch.polar(torch.ones_like(freqs), freqs)).flatten(-2)
    perm = torch.cat([torch.arange(0, HEAD_DIM, 2), torch.arange(1, HEAD_DIM, 2)])  # interleaved → halves
    ours = apply_rotary(x[..., perm], *rope.rotary(pos))
    torch.testing.assert_close(ours, meta[..., perm], atol=1e-5, rtol=0)


def test_partial_rotary_leaves_tail_untouched() -> None:
    cfg = ModelConfig(hidden_size=128, num_attention_heads=4, partial_rotary_factor=0.5)
    rope = RotaryPosition(cfg)
    x = torch.randn(1, 4, 5, 32)
    y = apply_rotary(x, *rope.rotary(torch.arange(5)[None]))
    assert rope.dim == 16 and torch.equal(y[..., 16:], x[..., 16:])  # the unrotated half is passed through


# ------------------------------------------------------------------ ALiBi
def test_alibi_slopes_power_of_two() -> None:
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -h for h in range(1, 9)]))  # powers of 2: exact
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2.0 ** (-h / 2) for h in range(1, 17)]))


@pytest.mark.parametrize("heads", [12, 6, 20])
def test_alibi_slopes_non_power_of_two(heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    closest = 2 ** math.floor(math.log2(heads))
    paper = [2 ** (-8 * h / closest) for h in range(1, closest + 1)]
    paper += [2 ** (-8 * h / (2 * closest)) for h in range(1, 2 * closest + 1)][0::2][: heads - closest]
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(paper))
    # BLOOM stores slope·j for key j: its value at key 1 is the slope
    bloom = build_alibi_tensor(torch.ones(1, 4), heads, torch.float32)  # [heads, 1, 4]
    torch.testing.assert_close(alibi_slopes(heads), bloom[:, 0, 1])


def test_alibi_bias_matches_bloom_after_softmax() -> None:
    """−m·|i−j| (ours) and BLOOM's m·j differ by a per-row constant under the causal mask: same softmax."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    heads, t = 12, 7
    cfg = ModelConfig(hidden_size=12 * 8, num_attention_heads=heads, position_type="alibi")
    pos = torch.arange(t)[None]
    ours = AlibiPosition(cfg).bias(pos, pos)[0]  # [H, T, T]
    bloom = build_alibi_tensor(torch.ones(1, t), heads, torch.float32).expand(heads, t, t)  # [H, 1, T] → [H, T, T]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    logits = torch.randn(heads, t, t)
    a = (logits + ours).masked_fill(~causal, float("-inf")).softmax(-1)
    b = (logits + bloom).masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert ours[0, 3, 2] == -0.5 and ours[0, 3, 3] == 0  # distance 1 → −m


# ------------------------------------------------------------------ absolute tables
def test_sinusoidal_table_is_interleaved() -> None:
    d, k = 16, torch.arange(50)[:, None].double()
    table = sinusoidal_table(50, d)
    inv = 10000.0 ** (-torch.arange(0, d, 2).double() / d)
    torch.testing.assert_close(table[:, 0::2], torch.sin(k * inv).float())
    torch.testing.assert_close(table[:, 1::2], torch.cos(k * inv).float())
    module = SinusoidalPosition(ModelConfig(hidden_size=d, num_attention_heads=2, position_type="sinusoidal"))
    torch.testing.assert_close(module.embed(torch.arange(50)[None])[0], table, atol=1e-5, rtol=0)


def test_sinusoidal_shift_is_a_rotation() -> None:
    """p_{k+φ} = R(φ)·p_k for each (sin, cos) pair, with R(φ) independent of k."""
    d, phi = 16, 7
    table = sinusoidal_table(60, d).double()
    inv = 10000.0 ** (-torch.arange(0, d, 2).double() / d)
    c, s = torch.cos(phi * inv), torch.sin(phi * inv)
    sin_k, cos_k = table[:-phi, 0::2], table[:-phi, 1::2]
    # sin(a+b) = sin a cos b + cos a sin b;  cos(a+b) = cos a cos b − sin a sin b
    torch.testing.assert_close(table[phi:, 0::2], sin_k * c + cos_k * s, atol=1e-6, rtol=0)
    torch.testing.assert_close(table[phi:, 1::2], cos_k * c - sin_k * s, atol=1e-6, rtol=0)


def test_learned_positions_refuse_positions_past_the_table() -> None:
    cfg = ModelConfig(hidden_size=16, num_attention_heads=2, max_position_embeddings=8, position_type="learned")
    pos = LearnedPosition(cfg)
    assert pos.embed(torch.arange(8)[None]).shape == (1, 8, 16)
    with pytest.raises(ValueError, match=r"position 8 is beyond the learned table \(max_position_embeddings=8\)"):
        pos.embed(torch.arange(9)[None])


def test_fast_rotary_equals_the_formula_and_its_autograd_gradient() -> None:
    """The eager fp32 path (half-by-half kernels, transposed rotation as backward) equals HF's formula."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    b, t, h, d = 2, 7, 3, 8
    ang = torch.rand(b, t, d // 2, generator=g) * 5
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    base_q, base_k = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, h, d, generator=g)
    grad = torch.randn(b, h, t, d, generator=g)
    ours_in = [base_q.clone().requires_grad_(), base_k.clone().requires_grad_()]
    ref_in = [base_q.clone().requires_grad_(), base_k.clone().requires_grad_()]
    # q and k arrive as [B, H, T, D] views of [B, T, H, D] projections, as in Attention
    oq, ok = (apply_rotary(x.transpose(1, 2), cos, sin) for x in ours_in)
    rq, rk = apply_rotary_pos_emb(ref_in[0].transpose(1, 2), ref_in[1].transpose(1, 2), cos, sin)
    torch.testing.assert_close(oq, rq, rtol=0, atol=1e-6)
    torch.testing.assert_close(ok, rk, rtol=0, atol=1e-6)
    assert oq.stride() == rq.stride()  # the layout SDPA sees is unchanged
    (oq * grad + ok * grad.flip(0)).sum().backward()
    (rq * grad + rk * grad.flip(0)).sum().backward()
    for a, r in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, r.grad, rtol=0, atol=1e-6)
