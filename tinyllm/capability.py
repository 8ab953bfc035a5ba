"""What this machine can do, measured once per process: CPU instruction sets, fast bf16 matmul, CUDA.

Defaults (training precision, native kernel paths, step budgets) must come from the machine the code runs
on, not from the one it was written on: bf16 matmul is ~2× faster than fp32 on a CPU with avx512_bf16/AMX
and ~50× *slower* on an AVX2-only CPU, where torch falls back to scalar conversion loops. So the bf16
question is answered by timing one small matmul in each precision, not by reading flags: flags say what the
silicon has, the timing says what this torch build (and `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA`, which
imitate an older CPU) actually does with it.

    cpu_flags()            the /proc/cpuinfo flags (empty where there is no such file)
    cpu_isa()              "avx512", "avx2" or "portable": the best native-kernel path this CPU runs
    bf16_matmul_speedup()  measured fp32 time / bf16 time of a 512×256×256 matmul (> 1: bf16 is faster)
    resolve_precision(p, device)   "auto" → "bf16" on CUDA with bf16 support, on CPU only where measured faster
    describe()             one line for logs and reports
"""

from __future__ import annotations

import functools
import os
import platform
import time

import torch

PRECISION_CHOICES = ("auto", "fp32", "bf16")
# bf16 must beat fp32 by this factor on the probe to be chosen: autocast adds casts the matmul alone lacks
BF16_MIN_SPEEDUP = 1.2


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest native-kernel path the CPU supports: avx512 (F+BW+VL), avx2 (with FMA and F16C) or portable."""
    fl = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= fl:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= fl:
        return "avx2"
    return "portable"


def _gflops(dtype: torch.dtype, m: int = 512, k: int = 256, n: int = 256, repeats: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    a @ b  # warm-up (first call picks and may JIT the kernel)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / max(best, 1e-9) / 1e9


@functools.lru_cache(maxsize=1)
def bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time for one small CPU matmul (best of 3 each; ~10 ms where bf16 is fast, ~0.1 s where
    it is emulated). `TINYLLM_BF16=1|0` overrides the measurement (returns 2.0 or 0.5)."""
    forced = os.environ.get("TINYLLM_BF16", "").strip()
    if forced in ("1", "0"):
        return 2.0 if forced == "1" else 0.5
    return _gflops(torch.bfloat16) / _gflops(torch.float32)


def cpu_bf16_is_fast() -> bool:
    return bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" / "bf16" pass through; "auto" becomes bf16 on a CUDA device that supports it, bf16 on a CPU only
    where the probe measures it faster than fp32, else fp32."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision={precision!r} is not one of {list(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_is_fast() else "fp32"


def describe(device: torch.device | str = "cpu") -> str:
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(dev)}"
    torch_isa = torch.backends.cpu.get_cpu_capability().lower()
    isa = cpu_isa() if torch_isa.startswith(cpu_isa()) else f"{cpu_isa()} CPU, torch on {torch_isa}"
    return (f"CPU {cpu_model()} ({isa}, {torch.get_num_threads()} threads, "
            f"bf16 matmul {bf16_matmul_speedup():.2f}× fp32)")
