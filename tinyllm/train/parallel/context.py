"""Context parallel: ring attention (notes ch.04 序列/上下文并行; Liu et al. 2023, "Ring Attention with Blockwise
Transformers"; the online softmax of Milakov & Gimelshein 2018 / FlashAttention).

A sequence too long for one device is cut into chunks, each rank holding its chunks' tokens for *every*
layer — embeddings, MLPs and norms are per token and need nothing. Only attention mixes tokens: each rank keeps
its queries and passes its K/V around a ring. At step s rank r holds the K/V of rank (r − s) mod cp, attends its queries to it, and merges the partial result with the online-softmax rule

    m' = max(m, rowmax S)          ℓ' = ℓ·e^{m−m'} + Σ e^{S−m'}          O' = O·e^{m−m'} + e^{S−m'}·V

so after cp steps O/ℓ is exactly softmax(QKᵀ)V over the whole sequence, without any rank ever holding all
keys. Causal masking works chunk against chunk: a later chunk is skipped entirely, a chunk against itself uses
the triangular mask, an earlier chunk is read in full. The sends of step s+1 overlap the compute of step s
(isend/irecv).

Two layouts (`chunk_ids`):

    contiguous   cp chunks, rank r holds chunk r — tokens [r·T/cp, (r+1)·T/cp). Under the causal mask rank r
                 reads r+1 chunks' worth of keys: the last rank does cp times the first one's attention work
                 and everyone waits for it at every step.
    zigzag       2·cp chunks, rank r holds chunks r and 2·cp−1−r (cp = 2: rank 0 → 0, 3; rank 1 → 1, 2). Every
                 rank then attends 2·cp + 1 (query chunk, key chunk) pairs, two of them triangular: the same
                 work on every rank, so the ring is balanced (the "load-balanced" CP of Megatron-LM / Llama 3).

Backward runs the same ring again with the saved log-sum-exp L = m + log ℓ: P = e^{S−L}, dV += Pᵀ·dO,
dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)), dQ += dS·K·scale, dK += dSᵀ·Q·scale; the dK/dV accumulators travel with
their K/V chunk and arrive home after the last hop.

    chunk_ids(rank, world, layout)                  which chunks of the sequence a rank holds
    local_positions(t, rank, world, layout)         their global token positions (index the sequence with it)
    ring_attention(q, k, v, group, scale, causal, layout)  the attention op on local tokens ([B, H, T/cp, D])
    context_parallel(model, group, layout)          makes every attention layer of a CausalLM a ring
    cp_lm_loss(model, input_ids, labels, group, layout)  this rank's share of the global mean loss
    all_reduce_grads(model, group)                  sums the shares' gradients (call after backward)

Not covered: padding masks, sliding windows and ALiBi in the ring; Ulysses-style all-to-all head/sequence
exchange.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tinyllm.model.attention import repeat_kv
from tinyllm.train.parallel.config import CP_LAYOUTS as LAYOUTS
from tinyllm.train.parallel.dist import collective_guard


def chunk_ids(rank: int, world: int, layout: str = "contiguous") -> tuple[int, ...]:
    """The sequence chunks rank `rank` of `world` holds, in order: (r,) of `world` chunks (contiguous) or
    (r, 2·world−1−r) of 2·world chunks (zigzag)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def local_positions(t: int, rank: int, world: int, layout: str = "contiguous",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The global positions of a rank's tokens in a sequence of `t` (a multiple of the chunk count)."""
    ids = chunk_ids(rank, world, layout)
    chunks = world * len(ids)
    if t % chunks:
        raise ValueError(f"context parallel ({layout}) cuts the sequence into {chunks} equal chunks; length {t} "
                         f"does not divide by {chunks}")
    n = t // chunks
    return torch.cat([torch.arange(c * n, (c + 1) * n, device=device) for c in ids])


def _ring_start(t: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Post: send `t` to the next rank of the ring, receive the previous rank's into a new buffer."""
    world, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = (r + 1) % world, (r - 1) % world
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    buf = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group), dist.P2POp(dist.irecv, buf, prv, group)]
    with collective_guard("ring attention K/V pass"):
        return buf, dist.batch_isend_irecv(ops)


def _ring_finish(pending: tuple[torch.Tensor, list]) -> torch.Tensor:
    buf, works = pending
    with collective_guard("ring attention K/V pass"):
        for w in works:
            w.wait()
    return buf


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal: bool) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if diagonal:  # the rank's own chunk: query i reads keys j ≤ i
        t = s.shape[-1]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale: float, causal: bool, layout: str):  # type: ignore[override]
        world, r = dist.get_world_size(group), dist.get_rank(group)
        acc_t = torch.promote_types(q.dtype, torch.float32)
        n_rep = q.shape[1] // k.shape[1]
        mine = chunk_ids(r, world, layout)
        n = q.shape[2] // len(mine)  # tokens per chunk
        qs = q.to(acc_t).split(n, dim=2)
        # the online-softmax state of each of this rank's query chunks
        m = [torch.full((*x.shape[:3], 1), float("-inf"), dtype=acc_t, device=q.device) for x in qs]
        ell = [torch.zeros_like(x) for x in m]
        acc = [torch.zeros(*x.shape[:3], v.shape[-1], dtype=acc_t, device=q.device) for x in qs]
        kv = torch.stack([k, v])  # [2, B, Hkv, T, D] travels as one message
        for step in range(world):
            src = (r - step) % world
            pending = _ring_start(kv, group) if step < world - 1 else None  # travels while we compute
            kvs = kv.split(n, dim=3)
            for i, qc in enumerate(mine):
                for j, kc in enumerate(chunk_ids(src, world, layout)):
                    if causal and kc > qc:
                        continue  # a later chunk: fully masked
                    kb, vb = repeat_kv(kvs[j][0], n_rep).to(acc_t), repeat_kv(kvs[j][1], n_rep).to(acc_t)
                    s = _scores(qs[i], kb, scale, causal and kc == qc)
                    m_new = torch.maximum(m[i], s.amax(-1, keepdim=True))
                    p = torch.exp(s - m_new)
                    corr = torch.exp(m[i] - m_new)
                    ell[i] = ell[i] * corr + p.sum(-1, keepdim=True)
                    acc[i] = acc[i] * corr + torch.matmul(p, vb)
                    m[i] = m_new
            if pending is not None:
                kv = _ring_finish(pending)
        out = torch.cat([a / e for a, e in zip(acc, ell)], dim=2)
        lse = torch.cat([x + e.log() for x, e in zip(m, ell)], dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.causal, ctx.layout = group, scale, causal, layout
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, causal, layout = ctx.group, ctx.scale, ctx.causal, ctx.layout
        world, r = dist.get_world_size(group), dist.get_rank(group)
        acc_t = out.dtype
        n_rep = q.shape[1] // k.shape[1]
        b, hkv, _, d = k.shape
        mine = chunk_ids(r, world, layout)
        n = q.shape[2] // len(mine)
        qf, do = q.to(acc_t), dout.to(acc_t)
        delta = (do * out).sum(-1, keepdim=True)  # rowsum(dO ⊙ O) [B, H, T, 1]
        dq = torch.zeros_like(qf)
        qs, dos, deltas, lses, dqs = (x.split(n, dim=2) for x in (qf, do, delta, lse, dq))
        # [k, v, dk, dv] of the chunks this rank currently holds; the gradients ride along with their chunks
        pack = torch.stack([k.to(acc_t), v.to(acc_t), torch.zeros_like(k, dtype=acc_t),
                            torch.zeros_like(v, dtype=acc_t)])
        for step in range(world):
            src = (r - step) % world
            parts = pack.split(n, dim=3)  # views: adding into them adds into the pack
            for i, qc in enumerate(mine):
                for j, kc in enumerate(chunk_ids(src, world, layout)):
                    if causal and kc > qc:
                        continue
                    kb, vb = repeat_kv(parts[j][0], n_rep), repeat_kv(parts[j][1], n_rep)
                    p = torch.exp(_scores(qs[i], kb, scale, causal and kc == qc) - lses[i])  # [B, H, Tq, Tk]
                    dv = torch.matmul(p.transpose(-1, -2), dos[i])
                    ds = p * (torch.matmul(dos[i], vb.transpose(-1, -2)) - deltas[i])
                    dqs[i].add_(torch.matmul(ds, kb) * scale)
                    dk = torch.matmul(ds.transpose(-1, -2), qs[i]) * scale
                    # query heads of one K/V group add into that K/V head
                    parts[j][2].add_(dk.view(b, hkv, n_rep, n, d).sum(2))
                    parts[j][3].add_(dv.view(b, hkv, n_rep, n, d).sum(2))
            pack = _ring_finish(_ring_start(pack, group))  # after `world` hops every chunk (and its gradient) is home
        return dq.to(q.dtype), pack[2].to(k.dtype), pack[3].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                   scale: float | None = None, causal: bool = True, layout: str = "contiguous") -> torch.Tensor:
    """softmax(QKᵀ·scale)V over the whole ring, given this rank's tokens q [B, H, T, D], k/v [B, Hkv, T, D]
    (its chunks of `layout`, concatenated in `chunk_ids` order)."""
    if q.shape[2] != k.shape[2] or k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(f"ring_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "[B, H, T, D], [B, Hkv, T, D] with equal local T and H a multiple of Hkv")
    segs = len(chunk_ids(0, 1, layout))
    if q.shape[2] % segs:
        raise ValueError(f"ring_attention ({layout}): local length {q.shape[2]} holds {segs} equal chunks")
    return _RingAttention.apply(q, k, v, group, scale if scale is not None else q.shape[-1] ** -0.5, causal,
                                layout)


def _ring_attend(group, layout: str):
    def attend(q, k, v, mask, bias, is_causal, scale):  # the model's attention-backend signature
        if mask is not None or bias is not None:
            raise ValueError("context parallel attends plain causal (or full) attention only: no padding mask, "
                             "sliding window or ALiBi bias")
        return ring_attention(q, k, v, group, scale, is_causal, layout)

    return attend


def context_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                     layout: str = "contiguous") -> nn.Module:
    """Make every attention layer of a tinyllm CausalLM attend through the ring over `group` (in place); the
    model must then run on each rank's tokens of `layout` at their global positions (`local_positions`)."""
    chunk_ids(0, 1, layout)  # validates the layout
    cfg = model.config
    if cfg.sliding_window is not None or cfg.position_type == "alibi":
        raise ValueError(f"context_parallel: sliding_window={cfg.sliding_window!r}, position_type="
                         f"{cfg.position_type!r} — the ring supports plain causal attention with rope/learned/"
                         "sinusoidal/no positions")
    for layer in model.model.layers:
        layer.self_attn.attend = _ring_attend(group, layout)
    model.cp_group, model.cp_layout = group, layout
    return model


def cp_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None,
               ignore_index: int = -100, fused: bool = True, layout: str | None = None) -> torch.Tensor:
    """Run this rank's chunks of the (full, replicated) batch at their global positions; return its share of the
    global mean loss, so that the shares summed over the group — values and gradients — are the full loss.

    fused: the training loss of train.losses (lm_head fused, softmax in fp32); False: plain cross entropy on
    the chunk's logits in the model's dtype."""
    from tinyllm.train.losses import linear_cross_entropy

    world, r = dist.get_world_size(group), dist.get_rank(group)
    b, t = input_ids.shape
    idx = local_positions(t, r, world, layout or getattr(model, "cp_layout", "contiguous"), input_ids.device)
    x, y = input_ids[:, idx], labels[:, idx]
    h = model(x, positions=idx.expand(b, -1), hidden_only=True)
    if fused:
        loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, y.reshape(-1), ignore_index)
    else:
        loss = F.cross_entropy(model.lm_head(h).flatten(0, 1), y.reshape(-1), ignore_index=ignore_index)
    count = (y != ignore_index).sum().to(torch.float64).reshape(1)  # on the batch's device (NCCL needs it)
    mine = count.clone()
    with collective_guard("context-parallel token count"):
        dist.all_reduce(count, group=group)
    return loss * (mine / count.clamp(min=1)).item()


def all_reduce_grads(model: nn.Module | Iterable[torch.Tensor], group: dist.ProcessGroup | None,
                     average: bool = False) -> None:
    """Sum (or average) every gradient over `group` (tied weights once); `model` is a module or its parameters."""
    n = dist.get_world_size(group)
    params = model.parameters() if isinstance(model, nn.Module) else model
    with collective_guard("gradient all-reduce"):
        for p in dict.fromkeys(params):
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                if average:
                    p.grad /= n
