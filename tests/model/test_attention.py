"""Attention backends, masks, MHA/GQA/MQA and the KV cache (notes ch.02.1, 02.7, 02.13).

eager (the reference) ≡ SDPA ≡ tiled online-softmax attention on random inputs; `F.scaled_dot_product_attention`
with `enable_gqa=True` and transformers' `repeat_kv` as outside references; masked keys get exactly zero weight;
fully masked query rows give zeros, not NaN (regression: eager and tiled returned NaN while SDPA
returned zeros). Incremental decoding through `ContiguousKVCache` equals one full
forward (prefill + single tokens, chunks, sliding window, growth, crop, reorder).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import randomize_

from tinyllm.infer.kv_cache import ContiguousKVCache
from tinyllm.model.attention import (
    ATTENTION,
    build_attn_meta,
    eager_attention,
    repeat_kv,
    sdpa_attention,
    tiled_attention,
)
from tinyllm.model.config import ModelConfig
from tinyllm.model.position import alibi_slopes
from tinyllm.model.transformer import CausalLM

ATOL = 1e-5


def _qkv(b=2, h=8, hkv=2, tq=13, tk=13, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, hkv, tk, d, generator=g),
            torch.randn(b, hkv, tk, d, generator=g))


def _pad_mask(b: int, tq: int, tk: int, causal: bool) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: row 0 left-padded by 3 keys; every query keeps its own key readable."""
    valid = torch.ones(b, tk, dtype=torch.bool)
    valid[0, :3] = False
    return build_attn_meta(tq, tk - tq, b, key_padding_mask=valid, causal=causal).mask


def _all_backends(q, k, v, mask, bias, causal):
    scale = q.shape[-1] ** -0.5
    ref = eager_attention(q, k, v, mask, bias, causal, scale)
    return ref, {
        "sdpa": sdpa_attention(q, k, v, mask, bias, causal, scale),
        "tiled": tiled_attention(q, k, v, mask, bias, causal, scale),
        "tiled-odd": tiled_attention(q, k, v, mask, bias, causal, scale, block_q=3, block_k=5),
        "tiled-1": tiled_attention(q, k, v, mask, bias, causal, scale, block_q=1, block_k=7),
    }


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("lengths", [(13, 13), (4, 17), (1, 9)], ids=["square", "tail", "decode"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_backends_agree(causal, heads, lengths, masked) -> None:
    (h, hkv), (tq, tk) = heads, lengths
    q, k, v = _qkv(h=h, hkv=hkv, tq=tq, tk=tk)
    mask = _pad_mask(2, tq, tk, causal) if masked else None
    ref, outs = _all_backends(q, k, v, mask, None, causal)
    assert torch.isfinite(ref).all()
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # outside reference: PyTorch's own GQA broadcast
    full = mask
    if full is None and causal:
        full = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)  # queries are the last tq keys
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True)
    torch.testing.assert_close(sdpa, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_backends_agree_with_alibi_bias(causal) -> None:
    q, k, v = _qkv(tq=11, tk=11)
    pos = torch.arange(11).expand(2, 11)
    bias = -alibi_slopes(8)[None, :, None, None] * (pos[:, None, :, None] - pos[:, None, None, :]).abs()
    for mask in (None, _pad_mask(2, 11, 11, causal)):
        ref, outs = _all_backends(q, k, v, mask, bias, causal)
        for out in outs.values():
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        # written-out reference: softmax(QKᵀ/√d + bias, masked) V with K/V heads repeated
        logits = q @ repeat_kv(k, 4).transpose(-1, -2) / 4.0 + bias
        m = mask if mask is not None else (torch.ones(11, 11, dtype=torch.bool).tril() if causal else None)
        if m is not None:
            logits = logits.masked_fill(~m, float("-inf"))
        torch.testing.assert_close(ref, logits.softmax(-1) @ repeat_kv(v, 4), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_masked_keys_get_exactly_zero_weight(name) -> None:
    q, k, v = _qkv(tq=10, tk=10)
    mask = _pad_mask(2, 10, 10, causal=True)
    attend = functools.partial(ATTENTION[name], mask=mask, bias=None, is_causal=True, scale=0.25)
    out = attend(q, k, v)
    # changing K/V where the key is masked (padding, or in the future) must not change a single bit
    v2, k2 = v.clone(), k.clone()
    v2[0, :, :3] = 1e4
    k2[0, :, :3] = -1e4
    assert torch.equal(attend(q, k2, v2)[:, :, 3:], out[:, :, 3:])
    v3 = v.clone()
    v3[:, :, -1] = 1e4  # the last key is in every earlier query's future
    assert torch.equal(attend(q, k, v3)[:, :, :-1], out[:, :, :-1])


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_fully_masked_query_row_is_zero_not_nan(name) -> None:
    q, k, v = _qkv(tq=6, tk=6)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, 2] = False  # query 2 of row 1 may read nothing
    bias = -alibi_slopes(8)[None, :, None, None] * torch.ones(2, 8, 6, 6)
    for b in (None, bias):
        out = ATTENTION[name](q, k, v, mask, b, False, 0.25)
        assert torch.isfinite(out).all()
        assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    # the padding helper never produces such rows: a padded query still reads itself
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    meta = build_attn_meta(6, 0, 2, key_padding_mask=valid)
    assert meta.mask.any(-1).all()
    assert torch.isfinite(ATTENTION[name](q, k, v, meta.mask, None, True, 0.25)).all()


def test_repeat_kv_matches_repeat_interleave_and_transformers() -> None:
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

    x = torch.randn(2, 3, 5, 4)
    for n in (1, 2, 4):  # copies, no arithmetic: bit-equal
        assert torch.equal(repeat_kv(x, n), torch.repeat_interleave(x, n, dim=1))
        assert torch.equal(repeat_kv(x, n), hf_repeat_kv(x, n))
    # head h of the result is K/V head h // n_rep
    assert torch.equal(repeat_kv(x, 4)[:, 7], x[:, 1])


def test_build_attn_meta_masks() -> None:
    meta = build_attn_meta(3, 5, batch=2, sliding_window=4)
    expect = torch.tensor([[j <= i and i - j < 4 for j in range(8)] for i in range(5, 8)])
    assert torch.equal(meta.mask[0, 0], expect) and torch.equal(meta.mask[1, 0], expect)
    assert build_attn_meta(4, 0, 2).mask is None  # plain causal: the backends build it themselves
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 7\)"):
        build_attn_meta(4, 0, 2, key_padding_mask=torch.ones(2, 7))


def test_mha_equals_torch_multihead_attention() -> None:
    """Full-attention MHA block (no positions) equals nn.MultiheadAttention after a weight copy."""
    from tinyllm.model.attention import Attention, AttnMeta

    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1,
                      vocab_size=16, position_type="none", attention_bias=True, attention_out_bias=True,
                      attn_implementation="eager")
    ours = randomize_(Attention(cfg, 0))
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        ref.out_proj.bias.copy_(ours.o_proj.bias)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = ours(x, None, AttnMeta(None, is_causal=False))
        expect, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ KV cache
def _tiny_model(**kw) -> CausalLM:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return randomize_(CausalLM(ModelConfig(**base))).eval()


def _decode(model: CausalLM, ids: torch.Tensor, prefill: int, step: int, capacity: int = 64) -> torch.Tensor:
    cache = ContiguousKVCache.for_model(model, ids.shape[0], capacity)
    outs = [model(ids[:, :prefill], cache=cache)]
    for s in range(prefill, ids.shape[1], step):
        outs.append(model(ids[:, s:s + step], cache=cache))
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(outs, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("kw", [
    {}, dict(num_key_value_heads=1), dict(sliding_window=5), dict(attn_implementation="eager"),
    dict(attn_implementation="tiled", sliding_window=3), dict(position_type="alibi"),
    dict(position_type="sinusoidal"), dict(position_type="learned"),
], ids=["gqa", "mqa", "window", "eager", "tiled-window", "alibi", "sinusoidal", "learned"])
@pytest.mark.parametrize("step", [1, 3])
def test_incremental_decoding_equals_full_forward(kw, step) -> None:
    model = _tiny_model(**kw)
    ids = torch.randint(0, 64, (2, 20))
    full = model(ids)
    torch.testing.assert_close(_decode(model, ids, prefill=7, step=step), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_grows_past_capacity() -> None:
    model = _tiny_model()
    ids = torch.randint(0, 64, (1, 21))
    cache_out = _decode(model, ids, prefill=3, step=2, capacity=4)
    torch.testing.assert_close(cache_out, model(ids), atol=ATOL, rtol=0)
    cache = ContiguousKVCache.for_model(model, 1, capacity=4)
    model(ids, cache=cache)
    assert cache.capacity >= 21 and cache.get_seq_length() == 21
    # memory: 2 (K, V) · layers · H_kv · D · bytes · tokens · batch
    assert cache.nbytes() == 2 * 2 * 2 * 4 * 4 * 21 * 1


@torch.no_grad()
def test_crop_then_continue() -> None:
    model = _tiny_model()
    ids = torch.randint(0, 64, (2, 16))
    cache = ContiguousKVCache.for_model(model, 2, 32)
    model(ids[:, :12], cache=cache)
    cache.crop(8)  # e.g. rejected speculative tokens
    assert cache.get_seq_length() == 8
    other = torch.randint(0, 64, (2, 5))
    out = model(other, cache=cache)
    expect = model(torch.cat([ids[:, :8], other], dim=1))[:, 8:]
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="crop length 99"):
        cache.crop(99)


@torch.no_grad()
def test_reorder_selects_batch_rows() -> None:
    model = _tiny_model()
    ids = torch.randint(0, 64, (3, 10))
    cache = ContiguousKVCache.for_model(model, 3, 16)
    model(ids[:, :7], cache=cache)
    index = torch.tensor([2, 0, 0, 1])  # beam search: reorder and duplicate rows
    cache.reorder(index)
    assert cache.batch == 4
    out = model(ids[index, 7:], cache=cache)
    torch.testing.assert_close(out, model(ids[index])[:, 7:], atol=ATOL, rtol=0)


def test_bf16_training_attention_runs_in_fp32_on_cpu() -> None:
    """With gradients, bf16 q/k/v attend in fp32 (the faster CPU backward) and give bf16 back."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 4, 16, 8, generator=g).bfloat16() for _ in range(3)]
    grad = torch.randn(2, 4, 16, 8, generator=g).bfloat16()
    ours_in = [x.clone().requires_grad_() for x in base]
    ref_in = [x.float().requires_grad_() for x in base]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(*ours_in, None, None, True, 8**-0.5)
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, scale=8**-0.5)
    assert out.dtype == torch.bfloat16
    # bit-equal: both run the same fp32 kernel on the same shapes and round once to bf16
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    out.backward(grad)
    ref.backward(grad.float())
    for a, r in zip(ours_in, ref_in):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad, r.grad.bfloat16(), rtol=0, atol=0)
    with torch.no_grad():  # inference keeps bf16 kernels: the very same call, bit-equal
        plain = F.scaled_dot_product_attention(*base, is_causal=True, scale=8**-0.5)
        torch.testing.assert_close(sdpa_attention(*base, None, None, True, 8**-0.5), plain, rtol=0, atol=0)


@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_sdpa_single_query_gqa_fast_path_equals_eager(hkv: int) -> None:
    """Regression for the decode fast path that folds a K/V group's query heads into the query axis."""
    torch.manual_seed(1)
    q = torch.randn(3, 8, 1, 16)
    k, v = torch.randn(3, hkv, 29, 16), torch.randn(3, hkv, 29, 16)
    ref = eager_attention(q, k, v, None, None, True, 0.25)
    torch.testing.assert_close(sdpa_attention(q, k, v, None, None, True, 0.25), ref, atol=1e-5, rtol=0)


def test_gqa_decode_fold_takes_a_non_contiguous_kernel_output(monkeypatch) -> None:
    """Regression: CUDA's SDPA kernels may return [B, H, T, D] as a transposed view of a [B, T, H, D] buffer;
    the one-query GQA fold then failed with "view size is not compatible" (found by tests/test_gpu.py)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 8, generator=g)  # one decode query, 4 heads over 2 K/V heads
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    want = sdpa_attention(q, k, v, None, None, False, 0.25)
    real = F.scaled_dot_product_attention

    def cuda_layout(*args, **kwargs):  # the same values in the memory layout CUDA kernels hand back
        return real(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout)
    assert torch.equal(sdpa_attention(q, k, v, None, None, False, 0.25), want)  # same values, other strides
