"""PagedAttention memory (notes ch.06.3.g, ch.06.4.a–b; Kwon et al. 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention"): a block manager, a paged KV cache and its attention.

The KV cache is one preallocated pool of fixed-size blocks (default 16 tokens) per layer, like pages of
virtual memory: a sequence's *block table* maps its logical block i (tokens i·B … i·B+B−1) to a physical
block, allocated on demand, so only the last block of a sequence wastes memory (< B tokens).

- `BlockManager`: free list (LRU order) and reference counts. Blocks are shared by several sequences when a
  request forks (n > 1: the prompt is computed once, refcount = n) and by prefix caching: a full block is
  named by hash(parent block's hash, its token ids), so a later request whose prompt starts with the same
  tokens reuses the physical blocks instead of recomputing them. A freed block keeps its hash and stays
  reusable until the allocator hands it out again (unnamed blocks are handed out first). Writing into a
  shared block copies it first (copy-on-write). Hash equality is trusted (a 64-bit collision would alias
  two prefixes, the same trade-off vLLM makes).
- `PagedKVCache`: the pool [layers, 2 (K, V), blocks, B, H_kv, D]; implements the model's `KVCache`
  protocol. A forward covers a *mixed batch* flattened into one row (B = 1, T = all new tokens of all
  sequences: decodes first, then prefill chunks); `update` scatters the new K/V into the pool by a slot
  mapping (slot = block_table[p // B]·B + p % B).
- Two attentions over the pool, equal by test (DESIGN rule 5):
  "gather" (the reference): `update` gathers every sequence's context by its block table into one key row
  and the model's own attention runs with a block-diagonal causal mask over (new tokens × gathered keys);
  "paged" (the fast path): `attend` runs one batched SDPA for all decode tokens over their padded block
  tables and one SDPA per prefill chunk over its own blocks, so no cross-sequence scores are computed.

Not covered: swapping blocks to host memory, block-sparse/sliding-window block freeing, custom kernels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tinyllm.model.attention import AttnMeta


class BlockOwner(Protocol):
    """What the block manager needs of a sequence."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    block_hashes: list[int]


class BlockManager:
    """Physical blocks: free list, reference counts, prefix-cache names, copy-on-write."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be positive")
        if block_size <= 0:
            raise ValueError(f"block_size={block_size} must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}  # physical block → its prefix hash
        self.cached: dict[int, int] = {}  # prefix hash → physical block
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) copy-on-write, run before the next forward
        self.prefix_hit_tokens = 0
        self.cow_copies = 0

    def reset(self) -> None:
        """Every block free, nothing cached, no copy pending: the pool as built (after a fault left it unknown)."""
        self.refcount = [0] * self.num_blocks
        self.free = OrderedDict((b, None) for b in range(self.num_blocks))
        self.hash_of.clear()
        self.cached.clear()
        self.pending_copies.clear()

    # -------------------------------------------------------------- block level
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError(f"out of KV-cache blocks (all {self.num_blocks} in use)")
        block, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block, None)
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]  # its content is about to be overwritten
        self.refcount[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.refcount[block] == 0:
            del self.free[block]  # a cached free block comes back into use
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} freed more often than allocated")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free[block] = None
            if block not in self.hash_of:
                self.free.move_to_end(block, last=False)  # hand out unnamed blocks before reusable ones

    # -------------------------------------------------------------- prefix caching
    def block_hash(self, parent: int | None, tokens: Sequence[int]) -> int:
        return hash((parent, tuple(tokens)))

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(blocks, hashes) of the longest cached run of full blocks at the start of token_ids. The last token
        is never matched: its logits are needed, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return [], []
        bs, blocks, hashes = self.block_size, [], []
        parent = None
        for i in range((len(token_ids) - 1) // bs):
            h = self.block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def commit_full_blocks(self, seq: BlockOwner) -> None:
        """Name the blocks that the last forward filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = self.block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h

    # -------------------------------------------------------------- sequence level
    def blocks_needed(self, seq: BlockOwner, num_new: int) -> int:
        """New physical blocks for writing num_new more tokens (a shared partial block costs one copy)."""
        total = -(-(seq.num_computed + num_new) // self.block_size)
        need = max(total - len(seq.block_table), 0)
        first = seq.num_computed // self.block_size
        if num_new and first < len(seq.block_table) and self.refcount[seq.block_table[first]] > 1:
            need += 1
        return need

    def allocate_slots(self, seq: BlockOwner, num_new: int) -> bool:
        """Make room for num_new tokens after the computed ones; False (and nothing changed) if the pool
        cannot hold them."""
        if self.blocks_needed(seq, num_new) > len(self.free):
            return False
        first = seq.num_computed // self.block_size
        if num_new and first < len(seq.block_table) and self.refcount[seq.block_table[first]] > 1:
            src = seq.block_table[first]
            dst = self.allocate()
            self.pending_copies.append((src, dst))
            self.decref(src)
            seq.block_table[first] = dst
            self.cow_copies += 1
        total = -(-(seq.num_computed + num_new) // self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self.allocate())
        return True

    def fork(self, parent: BlockOwner, child: BlockOwner) -> None:
        """child shares every block of parent (refcount + 1 each)."""
        for b in parent.block_table:
            self.incref(b)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed

    def free_seq(self, seq: BlockOwner) -> None:
        for b in reversed(seq.block_table):  # tail first: the prefix stays longest in the LRU cache
            self.decref(b)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0


# ------------------------------------------------------------------ the pool and its metadata
@dataclass
class PagedMeta:
    """Per-forward data of the paged cache, built once per step and shared by all layers."""

    slots: torch.Tensor  # [T] pool slot of every new token
    gather_slots: torch.Tensor | None = None  # [Tk] gather mode: the slots of all contexts, concatenated
    num_decode: int = 0  # the first num_decode tokens are single-token steps
    decode_tables: torch.Tensor | None = None  # [Nd, nb] padded block tables
    decode_len: int = 0  # longest decode context
    decode_mask: torch.Tensor | None = None  # [Nd, 1, 1, decode_len] or None when every context is full
    decode_lens: torch.Tensor | None = None  # [Nd] context length of each decode sequence (native kernel)
    window: int | None = None  # sliding window (native kernel)
    prefills: list[tuple[int, int, torch.Tensor, int, torch.Tensor | None]] = field(default_factory=list)
    # (q_start, q_len, block ids, context length, mask [q_len, ctx] or None for plain causal)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    return allowed


def build_paged_meta(block_tables: Sequence[Sequence[int]], starts: Sequence[int], lengths: Sequence[int],
                     block_size: int, mode: str = "paged", sliding_window: int | None = None,
                     device: torch.device | str = "cpu") -> AttnMeta:
    """AttnMeta for a flattened mixed batch: sequence i contributes tokens starts[i] … starts[i]+lengths[i]−1
    (its context is tokens 0 … starts[i]+lengths[i]−1). Single-token entries must come first."""
    if mode not in ("paged", "gather"):
        raise ValueError(f"mode={mode!r} must be 'paged' or 'gather'")
    bs = block_size
    slots: list[int] = []
    for bt, s, n in zip(block_tables, starts, lengths, strict=True):
        slots.extend(bt[p // bs] * bs + p % bs for p in range(s, s + n))
    meta = PagedMeta(torch.tensor(slots, dtype=torch.long, device=device))
    ctx = [s + n for s, n in zip(starts, lengths, strict=True)]
    if mode == "gather":
        gather: list[int] = []
        for bt, c in zip(block_tables, ctx, strict=True):
            gather.extend(bt[p // bs] * bs + p % bs for p in range(c))
        meta.gather_slots = torch.tensor(gather, dtype=torch.long, device=device)
        seq_of_q = torch.repeat_interleave(torch.arange(len(ctx)), torch.tensor(list(lengths)))
        seq_of_k = torch.repeat_interleave(torch.arange(len(ctx)), torch.tensor(ctx))
        q_pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        k_pos = torch.cat([torch.arange(c) for c in ctx])
        mask = _window_mask(q_pos, k_pos, sliding_window) & (seq_of_q[:, None] == seq_of_k[None, :])
        return AttnMeta(mask[None, None].to(device), True, k_pos[None].to(device), meta)
    nd = 0
    while nd < len(lengths) and lengths[nd] == 1:
        nd += 1
    if any(n == 1 for n in lengths[nd:]):
        raise ValueError(f"single-token entries must come first, got lengths {list(lengths)}")
    if nd:
        nb = max(len(bt) for bt in block_tables[:nd])
        meta.num_decode = nd
        meta.decode_tables = torch.tensor([list(bt) + [0] * (nb - len(bt)) for bt in block_tables[:nd]],
                                          dtype=torch.long, device=device)
        meta.decode_len = max(ctx[:nd])
        meta.decode_lens = torch.tensor(ctx[:nd], dtype=torch.long, device=device)
        meta.window = sliding_window
        if any(c != meta.decode_len for c in ctx[:nd]) or sliding_window is not None:
            lens = torch.tensor(ctx[:nd])
            k_pos = torch.arange(meta.decode_len)
            keep = k_pos[None, :] < lens[:, None]
            if sliding_window is not None:
                keep &= k_pos[None, :] >= (lens[:, None] - sliding_window)
            meta.decode_mask = keep[:, None, None, :].to(device)
    q_start = nd
    for bt, s, n, c in zip(block_tables[nd:], starts[nd:], lengths[nd:], ctx[nd:], strict=True):
        ids = torch.tensor(list(bt[:-(-c // bs)]), dtype=torch.long, device=device)
        mask = None
        if s > 0 or sliding_window is not None:
            mask = _window_mask(torch.arange(s, s + n), torch.arange(c), sliding_window).to(device)
        meta.prefills.append((q_start, n, ids, c, mask))
        q_start += n
    return AttnMeta(None, True, None, meta)


class PagedKVCache:
    """The block pool of every layer; `KVCache` protocol plus the paged attention fast path."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        # zeros, not empty: padded tails of blocks are read (masked) and must never hold NaN.
        # K and V of a layer side by side, so one scatter and one gather serve both
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # [layers, blocks, B, H_kv, D] views
        self.native = False  # decode through `cpu_kernels.paged_decode_attention` (see `use_native`)

    def use_native(self, enable: bool = True) -> bool:
        """Switch decode attention to the native CPU kernel (reads K/V straight from the blocks, no gather);
        returns whether it is on — off on other devices or when the kernel cannot be built."""
        self.native = False
        if enable and self.kv.device.type == "cpu" and self.kv.dtype in (torch.float32, torch.bfloat16):
            from tinyllm.infer import cpu_kernels

            self.native = cpu_kernels.load()
        return self.native

    @staticmethod
    def bytes_per_block(model: torch.nn.Module, block_size: int = 16, dtype: torch.dtype | None = None) -> int:
        """2 (K and V) · layers · B · H_kv · D · bytes per element."""
        cfg = model.config
        dtype = dtype or next(model.parameters()).dtype
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int | None = None, block_size: int = 16,
                  kv_cache_memory: int | None = None) -> PagedKVCache:
        """A pool of num_blocks blocks, or as many as fit in kv_cache_memory bytes."""
        if num_blocks is None:
            if kv_cache_memory is None:
                raise ValueError("give num_blocks or kv_cache_memory")
            num_blocks = int(kv_cache_memory) // cls.bytes_per_block(model, block_size)
            if num_blocks <= 0:
                raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds no block of "
                                 f"{cls.bytes_per_block(model, block_size)} bytes")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be positive")
        cfg, p = model.config, next(model.parameters())
        return cls(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                   p.dtype, p.device)

    def get_seq_length(self) -> int:
        return 0  # positions always come from the engine

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.kv.device)
        dst = torch.tensor([d for _, d in pairs], device=self.kv.device)
        self.kv[:, :, dst] = self.kv[:, :, src]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, meta: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [1, Hkv, T, D] → pool slots [T] of the flat view [2, blocks·B, Hkv, D]
        flat = self.kv[layer_idx].view(2, -1, self.num_kv_heads, self.head_dim)
        flat.index_copy_(1, meta.slots, torch.stack((k[0], v[0])).transpose(1, 2))  # [2, T, Hkv, D]
        if meta.gather_slots is None:
            return k, v  # the fast path reads the pool itself in `attend`
        kv = flat.index_select(1, meta.gather_slots).transpose(1, 2)  # [2, Hkv, Tk, D]
        return kv[0][None], kv[1][None]

    def _context(self, layer_idx: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # tables [N, nb] → [2, N·nb, B, Hkv, D] → K and V [N, Hkv, length, D]
        n = tables.shape[0]
        kv = self.kv[layer_idx].index_select(1, tables.view(-1))
        kv = kv.view(2, n, -1, self.num_kv_heads, self.head_dim)[:, :, :length].transpose(2, 3)
        return kv[0], kv[1]

    def attend(self, layer_idx: int, q: torch.Tensor, meta: Any, scale: float) -> torch.Tensor | None:
        """Attention of the new queries q [1, H, T, D] over their own sequences' blocks; None in gather mode
        (the model then runs its own attention over what `update` returned)."""
        if meta.gather_slots is not None:
            return None
        gqa = q.shape[1] != self.num_kv_heads
        outs = []
        nd = meta.num_decode
        if nd and self.native:
            from tinyllm.infer.cpu_kernels import paged_decode_attention

            od = paged_decode_attention(q[0, :, :nd].transpose(0, 1), self.kv[layer_idx], meta.decode_tables,
                                        meta.decode_lens, scale, meta.window)  # [Nd, H, D]
            outs.append(od.transpose(0, 1)[None])
        elif nd:
            qd = q[0, :, :nd].transpose(0, 1)[:, :, None]  # [Nd, H, 1, D]
            kd, vd = self._context(layer_idx, meta.decode_tables, meta.decode_len)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa)
            outs.append(od[:, :, 0].transpose(0, 1)[None])  # [1, H, Nd, D]
        for start, n, ids, ctx, mask in meta.prefills:
            kc, vc = self._context(layer_idx, ids[None], ctx)
            qc = q[:, :, start:start + n]
            outs.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, is_causal=mask is None,
                                                       scale=scale, enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
