"""Native matrix-vector kernels per instruction-set build (DESIGN §7): tinyllm's fp32 stream and its int8 and
int4 weight-only kernels (`tinyllm.infer.cpu_kernels`), once for every build this CPU runs (avx512, avx2,
portable), against torch's fp32 `F.linear`, batch 1 (or `--rows M` rows of x: a short prefill, a small decode
batch), on SmolLM2-135M's matrix shapes (out × in): 576×1536 (down_proj),
1536×576 (gate/up_proj) and 49152×576 (lm_head). One JSON line per (shape, format, build) with matvec/s,
ratio = ours / torch fp32 (> 1: faster), the weight bytes read per call and the GB/s that makes.

  cold   the weights stream from memory, as in a real decode step (the model's weights exceed the caches):
         each call uses the next of enough copies to fill `--working-set-mib` per format;
  hot    one copy called again and again, so it sits in the caches: the kernels' arithmetic speed.

Every call is timed on its own and all candidates take turns call by call; the figures are medians over
`--calls` calls, so a preemption on a shared machine spoils single calls, not the result.

    python bench/matvec.py [--threads 1] [--rows 1] [--calls 200] [--working-set-mib 128] [--cache cold hot]
                           [--isa ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_ceilings, report

from tinyllm import capability
from tinyllm.infer import cpu_kernels
from tinyllm.infer.quant import quantize_int4, quantize_int8

SHAPES = ((576, 1536), (1536, 576), (49152, 576))  # (out, in) of SmolLM2-135M's down, gate/up, lm_head
GROUP = 32  # int4 group size: the Q4_1 GGUF's grid


def _copies(nbytes: int, working_set_mib: int, cache: str) -> int:
    return 1 if cache == "hot" else max(2, math.ceil(working_set_mib * 2**20 / nbytes))


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_shape(out_f: int, in_f: int, args: argparse.Namespace, isas: tuple[str, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    x = torch.randn(args.rows, in_f, generator=g)
    q8, s8 = quantize_int8(w)
    p4, s4, z4 = quantize_int4(w, GROUP)
    fmt_bytes = {"fp32": w.numel() * 4, "int8": q8.numel() + s8.numel() * 4,
                 "int4": p4.numel() + (s4.numel() + z4.numel()) * 4}
    for cache in args.cache:
        n = {fmt: _copies(b, args.working_set_mib, cache) for fmt, b in fmt_bytes.items()}
        ws = [w.clone() for _ in range(n["fp32"])]
        peer = [lambda w_=w_: F.linear(x, w_) for w_ in ws]
        ws_ours = [w.clone() for _ in range(n["fp32"])]
        q8s = [(q8.clone(), s8.clone()) for _ in range(n["int8"])]
        p4s = [(p4.clone(), s4.clone(), z4.clone()) for _ in range(n["int4"])]
        ours: dict[tuple[str, str], list[Callable[[], object]]] = {}
        for isa in isas:
            ours["fp32", isa] = [lambda w_=w_: cpu_kernels.f32_matvec(x, w_) for w_ in ws_ours]
            ours["int8", isa] = [lambda a=a: cpu_kernels.int8_linear(x, *a) for a in q8s]
            ours["int4", isa] = [lambda a=a: cpu_kernels.int4_linear(x, *a, GROUP) for a in p4s]
        # every call timed on its own, all candidates interleaved call by call and in a rotating order: a
        # preemption on the shared machine spoils single calls (the median drops them), and drift in load or
        # whatever the call before leaves behind hits every candidate alike. The builds of one format share its
        # copies, staggered so that no call finds the copy the one before it has just read (cold stays cold)
        cands: list[tuple[object, str | None, list[Callable[[], object]], int]] = [("fp32", None, peer, 0)]
        for (fmt, isa), fns in ours.items():
            cands.append(((fmt, isa), isa, fns, isas.index(isa)))
        times: dict[object, list[float]] = {key: [] for key, *_ in cands}
        for i in range(args.warmup + args.calls):
            r = i % len(cands)
            for key, isa, fns, slot in cands[r:] + cands[:r]:
                if isa is not None:
                    cpu_kernels.load(isa)
                dt = _timed(fns[(i if isa is None else i * len(isas) + slot) % len(fns)])
                if i >= args.warmup:
                    times[key].append(dt)
        t_peer = statistics.median(times["fp32"])
        for (fmt, isa) in ours:
            t_ours = statistics.median(times[fmt, isa])
            report(f"matvec_{fmt}", 1 / t_ours, 1 / t_peer, "matvec/s", shape=f"{out_f}x{in_f}", rows=args.rows, isa=isa,
                   cache=cache, group=GROUP if fmt == "int4" else None, us=round(t_ours * 1e6, 1),
                   peer_us=round(t_peer * 1e6, 1), bytes=fmt_bytes[fmt], peer_bytes=fmt_bytes["fp32"],
                   gbps=round(fmt_bytes[fmt] / t_ours / 1e9, 2), peer_gbps=round(fmt_bytes["fp32"] / t_peer / 1e9, 2))
        del ws, ws_ours, peer, q8s, p4s, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (M): 1 is a batch-1 decode step")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per candidate (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per candidate first")
    ap.add_argument("--working-set-mib", type=int, default=128, help="bytes of weight copies per format (cold)")
    ap.add_argument("--cache", nargs="+", choices=("cold", "hot"), default=["cold", "hot"])
    ap.add_argument("--isa", nargs="+", choices=cpu_kernels.ISAS, help="builds to time (default: all the CPU runs)")
    args = ap.parse_args()
    if args.rows < 1:
        ap.error(f"--rows {args.rows}: need at least one row of x")
    torch.set_num_threads(args.threads)
    isas = tuple(args.isa or cpu_kernels.supported_isas())
    for isa in isas:
        if not cpu_kernels.load(isa) or cpu_kernels.active_isa() != isa:
            raise SystemExit(f"the {isa} build is unavailable: {cpu_kernels.kernel_status()}")
    print(json.dumps({**machine_ceilings(), "cpu": capability.cpu_model(), "cpu_isa": capability.cpu_isa()}),
          flush=True)
    for out_f, in_f in SHAPES:
        bench_shape(out_f, in_f, args, isas)


if __name__ == "__main__":
    main()
