"""Shared helpers for the benchmarks (DESIGN §7): machine ceilings, timing, and the one-JSON-line report.

Absolute times on shared machines are noise; every benchmark runs tinyllm and its peer in the same process
on the same input and reports the ratio ours / peer. The ceilings (fp32 matmul GFLOP/s, memory-copy GB/s)
say how far from the hardware limits both sides are.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed runs."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_median_seconds(ours: Callable[[], Any], peer: Callable[[], Any], repeats: int = 5,
                          warmup: int = 1) -> tuple[float, float]:
    """Median wall times of two functions timed alternately, so load changes on a shared machine hit both."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    for _ in range(warmup):
        ours()
        peer()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, times in ((ours, a), (peer, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def matmul_gflops(n: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of an n×n @ n×n matmul (2·n³ flops), median of `repeats`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=g, dtype=torch.float32).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    sec = median_seconds(lambda: torch.matmul(a, b, out=out), repeats, warmup=2)
    return 2 * n**3 / sec / 1e9


def memory_gbps(mib: int = 256, repeats: int = 5) -> float:
    """Achieved GB/s of a large tensor copy (bytes read + bytes written per second)."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    sec = median_seconds(lambda: dst.copy_(src), repeats, warmup=1)
    return 2 * src.numel() * src.element_size() / sec / 1e9


def copy_traffic(nbytes: int, mib: int = 256) -> tuple[Callable[[], None], int]:
    """A function that moves about `nbytes` through memory as copies of a `mib` MiB buffer, and the bytes it
    moves (read + write, as `memory_gbps` counts them): the peer of a bandwidth-bound loop, timed alternately
    with it by `paired_median_seconds` so that a neighbour's load hits both. The buffers sit on the pages the
    engine's weights sit on (transparent huge pages where the OS offers them, `hugepages.rehome`), which copy
    faster than 4 KiB pages: the bound is the better of the two."""
    from tinyllm.infer import hugepages

    src = hugepages.empty_bytes(mib * 2**20).view(torch.float32).fill_(1.0)
    dst = hugepages.empty_bytes(mib * 2**20).view(torch.float32).zero_()
    per_copy = 2 * src.numel() * src.element_size()
    copies = max(1, round(nbytes / per_copy))

    def run() -> None:
        for _ in range(copies):
            dst.copy_(src)

    return run, copies * per_copy


def machine_ceilings() -> dict[str, Any]:
    """The machine's measured limits under the current thread setting."""
    return {"bench": "machine", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "matmul_fp32_gflops": round(matmul_gflops(), 1), "memory_copy_gbps": round(memory_gbps(), 2)}


def report(bench: str, ours: float, peer: float, unit: str, **extra: Any) -> dict[str, Any]:
    """Print (and return) one JSON line: the two figures, their unit and the ratio ours / peer."""
    line = {"bench": bench, "ours": round(ours, 3), "peer": round(peer, 3), "unit": unit,
            "ratio": round(ours / peer, 3) if peer else None, **extra}
    print(json.dumps(line, ensure_ascii=False), flush=True)
    return line
