"""The contiguous KV cache (notes ch.02.13, ch.06 "KV cache").

Keys and values of every past token are kept so each decode step only computes the new token's q/k/v:
per layer a [B, H_kv, capacity, D] buffer for K and one for V, written at [len : len+T] and read as
[: len+T]. Only K and V are cached, never Q. Memory: 2 · layers · H_kv · D · bytes · tokens · batch
(LLaMA-7B fp16: 16 KiB per token per layer). The buffer grows by doubling when a sequence outruns it.

Implements the model's `KVCache` protocol; the paged cache of the engine implements the same protocol.
"""

from __future__ import annotations

from typing import Any

import torch


class ContiguousKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if capacity <= 0:
            raise ValueError(f"capacity={capacity} must be positive")
        self.num_layers, self.batch = num_layers, batch
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, capacity: int = 256) -> ContiguousKVCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, capacity, p.dtype, p.device)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def get_seq_length(self) -> int:
        return self.lengths[0]

    def _grow(self, layer: int, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for buf in (self.k, self.v):
            old = buf[layer]
            b, h, _, d = old.shape
            grown = torch.zeros(b, h, new_cap, d, dtype=old.dtype, device=old.device)
            grown[:, :, : old.shape[2]] = old
            buf[layer] = grown

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, meta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.k[layer_idx].shape[2]:
            self._grow(layer_idx, end)
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search)."""
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                buf[i] = t.index_select(0, index.to(t.device))
        self.batch = int(index.numel())

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (rejected speculative tokens)."""
        if not 0 <= length <= self.get_seq_length():
            raise ValueError(f"crop length {length} outside [0, {self.get_seq_length()}]")
        self.lengths = [length] * self.num_layers

    def nbytes(self) -> int:
        used = self.get_seq_length()
        per = self.k[0][:, :, :used].numel() * self.k[0].element_size()
        return 2 * per * self.num_layers
