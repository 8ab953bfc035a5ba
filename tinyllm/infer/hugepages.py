"""Weights on transparent huge pages for CPU decoding (notes ch.06.3: batch-1 decode is memory-bound).

A decode step streams every weight once: 513 MB a token for fp32 SmolLM2-135M. torch allocates tensors on 4 KiB
pages, so such a stream crosses a page every 4 KiB and each crossing costs a TLB miss and a page walk; the
hardware prefetchers also stop at page boundaries. On a 2-core AVX-512 EPYC the fp32 step read its weights at
~20 GB/s from 4 KiB pages and ~25 GB/s from 2 MiB pages (BENCHMARKS.md, "huge pages").

`rehome(tensors)` copies the storages of the given tensors into one anonymous mapping advised with
`MADV_HUGEPAGE` (Linux transparent huge pages, when the kernel allows them) and re-points every given tensor at
its copy in place (`Tensor.set_`): parameters stay the same Parameter objects, views of one storage stay views of
one storage, and the values are the same bytes. Each storage is copied and released in turn, so memory peaks at
the model plus its largest storage, not twice the model. Elsewhere (no THP, another OS) it does nothing.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Iterable

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
ALIGN = 64  # each storage starts on a cache line
_THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> bool:
    """True when advising huge pages can take effect: Linux, Python's MADV_HUGEPAGE, THP not set to `never`, and
    not switched off by TINYLLM_HUGE_PAGES=0."""
    if os.environ.get("TINYLLM_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_SYSFS) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _arena(nbytes: int) -> memoryview:
    """`nbytes` of a huge-page-advised anonymous mapping, starting on a 2 MiB boundary; pages are faulted in on
    first write, and the mapping lives as long as any view of it."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    start = (-torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()) % HUGE_PAGE
    return memoryview(m)[start:start + nbytes]


def empty_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes` on huge pages (plain `torch.empty` where they are not
    available)."""
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes} must be >= 0")
    if not nbytes or not available():
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(_arena(nbytes), dtype=torch.uint8)


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `module`, shared ones once."""
    return list(module.parameters()) + list(module.buffers())


def rehome(tensors: Iterable[torch.Tensor], min_bytes: int = HUGE_PAGE) -> int:
    """Move the CPU storages of `tensors` that hold at least `min_bytes` onto one huge-page arena, in place; the
    bytes moved (0 where huge pages are not available). Every tensor that shares a moved storage must be among
    `tensors`: one left out keeps the old storage (and its memory) alive."""
    if not available():
        return 0
    groups: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen or t.device.type != "cpu" or t.is_sparse or t.is_quantized:
            continue
        seen.add(id(t))
        s = t.untyped_storage()
        if s.nbytes() >= min_bytes and s.data_ptr():
            groups.setdefault(s.data_ptr(), (s, []))[1].append(t)
    if not groups:
        return 0
    items = list(groups.values())
    del groups, s
    sizes = [-(-old.nbytes() // ALIGN) * ALIGN for old, _ in items]
    arena, offset = _arena(sum(sizes)), 0
    with torch.no_grad():
        for i, size in enumerate(sizes):
            (old, ts), items[i] = items[i], None  # the old storage is freed once its tensors leave it
            # a storage of its own on the arena: saving one tensor (or checking shared memory, as safetensors
            # does) sees its own bytes, not the whole model's
            new = torch.frombuffer(arena[offset:offset + old.nbytes()], dtype=torch.uint8)
            new.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
            for t in ts:
                t.set_(new.untyped_storage(), t.storage_offset(), t.size(), t.stride())
            del old, ts
            offset += size
    return offset
