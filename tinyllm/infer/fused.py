"""The engine's fast forward: the LLaMA-family decoder as a flat loop of tensor ops (notes ch.06.3 "inference
optimisation": operator fusion, fewer kernel launches; ch.06.4 vLLM's model runner).

At batch 1 a 135M model's decode step is memory-bound on the weight matrices, and on a CPU the remainder is
per-op overhead: module calls, ~20 small tensor ops per layer, RoPE angles recomputed every step. `FusedForward`
computes exactly what `CausalLM.model` computes for a pre-norm RMSNorm / RoPE / gated-MLP decoder (LLaMA,
Mistral, Qwen2, SmolLM2) with

- q/k/v as one matmul and gate/up as one matmul over concatenated weights; the original `nn.Linear`
  weights become views into the fused matrices, so nothing is stored twice;
- RoPE of q and k in one pass over the rows of the fused projection, with cos/sin looked up in a table
  computed once by the model's own `rotary` (same values, bit for bit);
- no nn.Module dispatch inside the layer loop;
- fp32 products with a few rows of x (a short prompt, a small decode batch, a speculative verification: up to
  `NATIVE_ROWS`) through `cpu_kernels.f32_matvec`, which reads each weight row once for all rows, where torch's
  GEMM repacks the weight on every call (same products, another summation order).

The model's forward stays the reference: tests show both give the same logits and the same greedy tokens
through the engine. Models outside that family (post-norm, ALiBi, MoE, qk-norm, partial or dynamic-NTK
RoPE, absolute positions) are refused by `supports` and the runner keeps the model's forward. Quantized
projections (`QuantLinear`) are kept as modules and called one by one (no fusion, same result).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.infer import cpu_kernels
from tinyllm.model.attention import AttnMeta
from tinyllm.model.norm import RMSNorm

# rows of x up to which the native fp32 stream beats torch's GEMM: 1.2–5× for 1 ≤ M ≤ 32 at 1 and 2 threads on a
# 2-core AVX-512 EPYC, SmolLM2's shapes from memory (1.1–1.5× at 48–64; BENCHMARKS.md, Engine)
NATIVE_ROWS = 32


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)`; a few fp32 rows on the CPU go through the native weight stream when it is loaded."""
    if (b is None and x.dim() == 2 and 0 < x.shape[0] <= NATIVE_ROWS and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
            and w.is_contiguous() and cpu_kernels.active_isa()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):  # no autograd through it
        return cpu_kernels.f32_matvec(x, w)
    return F.linear(x, w, b)


def apply(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`m(x)`, through `linear` where `m` is a plain `nn.Linear`."""
    return linear(x, m.weight, m.bias) if type(m) is nn.Linear else m(x)


def supports(model: nn.Module) -> bool:
    """True when `model` is a CausalLM whose forward `FusedForward` reproduces."""
    cfg = getattr(model, "config", None)
    trunk = getattr(model, "model", None)
    if cfg is None or trunk is None or not hasattr(model, "lm_head") or not hasattr(trunk, "layers"):
        return False
    sc = cfg.rope_scaling or {}
    if (cfg.norm_position != "pre" or cfg.norm_type != "rmsnorm" or cfg.position_type != "rope"
            or cfg.mlp_type != "gated" or cfg.num_local_experts or cfg.qk_norm
            or cfg.partial_rotary_factor != 1.0 or sc.get("rope_type") == "dynamic"):
        return False
    return all(isinstance(layer.input_layernorm, RMSNorm) and hasattr(layer.mlp, "gate_proj")
               for layer in trunk.layers)


def _fuse(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One [ΣN, K] weight (and bias) for several Linears; their weights are re-pointed into it."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    with torch.no_grad():
        w = torch.cat([m.weight for m in linears])
        has_bias = [m.bias is not None for m in linears]
        b = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype,
                                                                      device=w.device)
                       for m in linears]) if any(has_bias) else None
        start = 0
        for m in linears:
            n = m.out_features
            m.weight.data = w[start:start + n]  # a view: the fused matrix is the only copy
            if m.bias is not None:
                m.bias.data = b[start:start + n]
            start += n
    return w, b


class _Layer:
    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.eps
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.attn, self.mlp = attn, mlp
        self.act = mlp.act


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # the same op sequence as RMSNorm.forward, so the result is bit-identical
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


class FusedForward:
    """`FusedForward(model)(input_ids [T], positions [T], cache, meta) -> hidden [T, d]` (after the final norm)."""

    def __init__(self, model: nn.Module) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a pre-norm RMSNorm/RoPE/gated-MLP CausalLM")
        cfg = model.config
        self.trunk = model.model
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layers = [_Layer(layer) for layer in self.trunk.layers]
        self.scale = self.trunk.layers[0].self_attn.scale
        self._cos = self._sin = torch.empty(0)

    def tensors(self) -> list[torch.Tensor]:
        """The fused q/k/v and gate/up matrices (and biases) this forward holds besides the model's own tensors."""
        return [t for lay in self.layers for pair in (lay.qkv, lay.gate_up) if pair for t in pair if t is not None]

    def _table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < n:
            size = max(n, 2 * self._cos.shape[0], 256)
            cos, sin = self.trunk.pos.rotary(torch.arange(size, device=device)[None])  # [1, P, D]
            half = self.d // 2
            # rotate_half(x)·sin = [x2, x1]·[−sin₁, sin₂]: the sign goes into the table
            self._cos, self._sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        return self._cos, self._sin

    def _proj(self, fused: tuple[torch.Tensor, torch.Tensor | None] | None, mods: list[nn.Module],
              x: torch.Tensor) -> torch.Tensor:
        if fused is not None:
            return linear(x, *fused)
        return torch.cat([apply(m, x) for m in mods], dim=-1)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Any, meta: AttnMeta,
                 max_position: int) -> torch.Tensor:
        t = input_ids.shape[0]
        h, hkv, d = self.h, self.hkv, self.d
        cos_t, sin_t = self._table(max_position + 1, input_ids.device)
        dtype = self.trunk.embed_tokens.weight.dtype
        cos = cos_t[positions].to(dtype)[:, None]  # [T, 1, D]
        sin = sin_t[positions].to(dtype)[:, None]
        half = d // 2
        x = F.embedding(input_ids, self.trunk.embed_tokens.weight)  # [T, d_model]
        cmeta = meta.cache_meta
        for i, lay in enumerate(self.layers):
            a = lay.attn
            y = _rms(x, lay.ln1, lay.eps1)
            qkv = self._proj(lay.qkv, [a.q_proj, a.k_proj, a.v_proj], y).view(t, h + 2 * hkv, d)
            qk = qkv[:, :h + hkv]  # [T, H+Hkv, D]: q and k rotate together
            qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin
            q = qk[:, :h].transpose(0, 1)[None]  # [1, H, T, D]
            k = qk[:, h:].transpose(0, 1)[None]  # [1, Hkv, T, D]
            v = qkv[:, h + hkv:].transpose(0, 1)[None]
            k_all, v_all = cache.update(i, k, v, cmeta)
            out = cache.attend(i, q, cmeta, self.scale) if hasattr(cache, "attend") else None
            if out is None:
                out = a.attend(q, k_all, v_all, meta.mask, None, meta.is_causal, self.scale)
            x = x + apply(a.o_proj, out[0].transpose(0, 1).reshape(t, h * d))
            y = _rms(x, lay.ln2, lay.eps2)
            m = lay.mlp
            gu = self._proj(lay.gate_up, [m.gate_proj, m.up_proj], y)
            g, u = gu.chunk(2, dim=-1)
            x = x + apply(m.down_proj, lay.act(g) * u)
        norm = self.trunk.norm
        return _rms(x, norm.weight, norm.eps)
