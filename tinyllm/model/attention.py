"""Attention (notes ch.02.1, 02.7, 02.13): scaled dot-product, masks, MHA/MQA/GQA, three backends, KV cache.

softmax(Q·Kᵀ/√d_k + bias, masked with −∞) · V, with `num_key_value_heads` K/V heads shared by groups of
query heads: MHA (H_kv = H), GQA (1 < H_kv < H), MQA (H_kv = 1). Query head h reads K/V head h // (H/H_kv).

Backends (registry `ATTENTION`), all with the signature
`attend(q [B,H,Tq,D], k [B,Hkv,Tk,D], v, mask [B,1,Tq,Tk] bool | None, bias [B,H,Tq,Tk] | None, is_causal, scale)`:

- `eager_attention` — the reference: explicit logits, −∞ masking, fp32 softmax.
- `sdpa_attention`  — `torch.nn.functional.scaled_dot_product_attention` (fused kernels; the fast path).
- `tiled_attention` — FlashAttention's algorithm in plain torch (Dao et al. 2022): keys processed in blocks,
  an online softmax keeps a running max m and sum ℓ per query and rescales the partial output by
  exp(m_old − m_new), so the [Tq, Tk] matrix is never materialised. Exact, slow; it is the oracle that shows
  the tiling is right.

A query row that may read no key at all (every key masked) yields a zero output in all three backends, the
rule of `scaled_dot_product_attention`, never NaN.

The KV cache is an argument implementing `KVCache` (DESIGN rule 2): the model calls
`cache.update(layer_idx, k, v, meta)` and attends over what it returns, never knowing whether the cache is
contiguous or paged. `AttnMeta` carries the mask for one forward, built once and shared by all layers.
A cache may also offer `attend(layer_idx, q, cache_meta, scale) -> out | None` (the engine's paged cache
does, to attend per sequence over its blocks); None, or a position bias, means the backend attends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.model.config import ModelConfig
from tinyllm.model.norm import RMSNorm
from tinyllm.model.position import apply_rotary


class KVCache(Protocol):
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, meta: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] for `layer_idx`; return all keys/values to attend over."""
        ...

    def get_seq_length(self) -> int:
        """Tokens already stored (the position of the next token for unpadded rows)."""
        ...


@dataclass
class AttnMeta:
    """What every layer needs to know about one forward's attention pattern.

    mask: bool [B, 1, Tq, Tk], True where query i may read key j; None means plain causal attention over
    keys that are exactly the queries (no cache, no padding) when `is_causal`, or full attention otherwise.
    k_positions: [B, Tk] positions of the keys, for position biases (ALiBi).
    cache_meta: opaque data for the cache (e.g. slot mappings of a paged cache).
    """

    mask: torch.Tensor | None = None
    is_causal: bool = True
    k_positions: torch.Tensor | None = None
    cache_meta: Any = None


def build_attn_meta(
    q_len: int,
    past_len: int,
    batch: int = 1,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> AttnMeta:
    """Mask for queries at cache indices past_len..past_len+q_len−1 over keys 0..past_len+q_len−1.

    key_padding_mask: [B, past_len + q_len], 1/True for real tokens, 0 for padding. A padded query row is
    allowed to read itself so that no softmax row is empty (its output is never used).
    """
    k_len = past_len + q_len
    k_idx = torch.arange(k_len, device=device)
    if key_padding_mask is None and sliding_window is None:
        return AttnMeta(None, causal, k_idx.expand(batch, k_len))
    q_idx = torch.arange(past_len, k_len, device=device)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_idx[None, :] <= q_idx[:, None]
    if sliding_window is not None:
        allowed &= (q_idx[:, None] - k_idx[None, :]) < sliding_window
    mask = allowed[None, None].expand(batch, 1, q_len, k_len)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, k_len):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                             f"expected {(batch, k_len)}")
        valid = key_padding_mask.to(device=mask.device, dtype=torch.bool)
        mask = mask & valid[:, None, None, :]
        mask = mask | (q_idx[:, None] == k_idx[None, :])[None, None]
    return AttnMeta(mask, causal, k_idx.expand(batch, k_len))


def document_attn_meta(input_ids: torch.Tensor, boundary_id: int) -> AttnMeta:
    """Causal attention that stays inside each packed document: every `boundary_id` token starts a new segment
    (the boundary belongs to the document it opens, as in `eval.bpc.lm_bits`, which prefixes each document with
    it), and a query reads only the keys of its own segment. Positions stay those of the window (RoPE depends
    on differences only)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    seg = (input_ids == boundary_id).cumsum(1)
    idx = torch.arange(t, device=input_ids.device)
    mask = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :] <= idx[:, None])[None]
    return AttnMeta(mask[:, None], True, idx.expand(b, t))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] → [B, Hkv·n_rep, T, D]; head h of the result is K/V head h // n_rep."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _full_mask(mask: torch.Tensor | None, is_causal: bool, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
    if mask is not None:
        return mask
    if not is_causal:
        return None
    # causal over keys that end with the queries
    q_idx = torch.arange(tk - tq, tk, device=device)
    return (torch.arange(tk, device=device)[None, :] <= q_idx[:, None])[None, None]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    bias: torch.Tensor | None, is_causal: bool, scale: float) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, H, Tq, Tk]
    if bias is not None:
        logits = logits + bias
    full = _full_mask(mask, is_causal, q.shape[2], k.shape[2], q.device)
    if full is not None:
        logits = logits.masked_fill(~full, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if full is not None:  # a query that may read no key gets a zero output (SDPA's rule), not NaN
        probs = probs.masked_fill(~full.any(-1, keepdim=True), 0.0)
    probs = probs.to(v.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   bias: torch.Tensor | None, is_causal: bool, scale: float) -> torch.Tensor:
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
        # training under bf16 autocast: torch's CPU flash-attention backward is slower in bf16 than in fp32,
        # so attend in fp32 (at least bf16's precision) and hand bf16 back to o_proj
        with torch.autocast("cpu", enabled=False):
            out = sdpa_attention(q.float(), k.float(), v.float(), mask, bias, is_causal, scale)
        return out.to(torch.bfloat16)
    n_rep = q.shape[1] // k.shape[1]
    b, h, tq, d = q.shape
    if tq == 1 and n_rep > 1 and bias is None and mask is None:
        # one decode query per head: fold each K/V group's query heads into the query axis
        # [B, H, 1, D] → [B, Hkv, n_rep, D], so K/V are read once per group instead of copied n_rep times
        out = F.scaled_dot_product_attention(q.view(b, k.shape[1], n_rep, d), k, v, scale=scale)
        return out.reshape(b, h, 1, d)  # CUDA kernels may hand back a non-contiguous layout: no view
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if bias is None and mask is None:
        causal = is_causal and q.shape[2] > 1
        if causal and q.shape[2] != k.shape[2]:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=_full_mask(None, True, q.shape[2], k.shape[2], q.device), scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    attn_mask: torch.Tensor | None = _full_mask(mask, is_causal, q.shape[2], k.shape[2], q.device)
    if bias is not None:
        float_mask = bias.to(q.dtype)
        if attn_mask is not None:
            float_mask = float_mask.masked_fill(~attn_mask, float("-inf"))
        attn_mask = float_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    bias: torch.Tensor | None, is_causal: bool, scale: float,
                    block_q: int = 32, block_k: int = 32) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    b, h, tq, _d = q.shape
    tk = k.shape[2]
    full = _full_mask(mask, is_causal, tq, tk, q.device)
    out = torch.empty(b, h, tq, v.shape[-1], dtype=q.dtype, device=q.device)
    for qs in range(0, tq, block_q):
        qe = min(qs + block_q, tq)
        qb = q[:, :, qs:qe].float()
        m = torch.full((b, h, qe - qs, 1), float("-inf"), device=q.device)  # running max
        denom = torch.zeros(b, h, qe - qs, 1, device=q.device)  # running Σ exp
        acc = torch.zeros(b, h, qe - qs, v.shape[-1], device=q.device)  # running Σ exp·V
        for ks in range(0, tk, block_k):
            ke = min(ks + block_k, tk)
            s = torch.matmul(qb, k[:, :, ks:ke].float().transpose(-1, -2)) * scale  # [b, h, bq, bk]
            if bias is not None:
                s = s + bias[..., qs:qe, ks:ke]
            if full is not None:
                s = s.masked_fill(~full[..., qs:qe, ks:ke], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all −∞ so far
            p = torch.exp(s - safe)
            correction = torch.exp(m - safe)
            denom = denom * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + torch.matmul(p, v[:, :, ks:ke].float())
            m = m_new
        # denom = 0 only for a query that may read no key; its output is 0, as in SDPA
        out[:, :, qs:qe] = (acc / denom.masked_fill(denom == 0, 1.0)).to(q.dtype)
    return out


AttentionFn = Callable[..., torch.Tensor]
ATTENTION: dict[str, AttentionFn] = {"eager": eager_attention, "sdpa": sdpa_attention, "tiled": tiled_attention}


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads, optional qkv bias, qk-norm and RoPE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.attend = ATTENTION[cfg.attn_implementation]
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                meta: AttnMeta, bias: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)  # [B,H,T,D]
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B,Hkv,T,D]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, meta.cache_meta)
            paged = getattr(cache, "attend", None)  # a paged cache may attend over its own block layout
            if paged is not None and bias is None:
                out = paged(self.layer_idx, q, meta.cache_meta, self.scale)
        if out is None:
            out = self.attend(q, k, v, meta.mask, bias, meta.is_causal, self.scale)  # [B,H,T,D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
