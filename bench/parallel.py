"""Data-parallel training benchmark (DESIGN §7): tokens/s and per-rank peak memory of one model under each
strategy at 1 and 2 ranks, and our ZeRO-2 step time against DeepSpeed's ZeRO-2 on the same run.

Every configuration is a separate `torchrun --nproc_per_node W` of this file in worker mode, so each starts
from a fresh process: same model (the `tiny` preset shape, fp32), same global batch, same AdamW and clipping;
the worker times whole optimizer steps (forward, backward, gradient sync, clip, step) after warm-up steps
and reports the median, tokens/s (global tokens / median step) and each rank's peak resident memory above
its state after imports (VmHWM reset once torch, FSDP and DeepSpeed are imported): model states, gradients,
activations and communication buffers.
Each rank runs one OpenMP thread by default (`--threads-per-rank`): W ranks use W cores, so tokens/s at W = 2
against W = 1 is the scaling, and the CPU time summed over the ranks shows what sharding and communication
add. (With 2 threads per rank on a busy machine, OpenMP's spin-waiting made CPU times vary several-fold.) Strategies:
    single      plain single-process loop (no torch.distributed), W = 1 only
    dp          torch DDP                       zero1/2/3   our ZeRO (train/parallel/zero.py)
    fsdp        FSDP2 (fully_shard)             ds1/ds2/ds3 DeepSpeed ZeRO stage 1/2/3 (generated config)

One JSON line per configuration, then the paired line {"bench": "parallel_zero2_vs_deepspeed", ratio = our
ZeRO-2 step time / DeepSpeed ZeRO-2 step time} for each W (wall time, and CPU time summed over the ranks:
on a shared machine the CPU time is the steadier figure), and the machine ceilings.

    python bench/parallel.py [--strategies single dp zero1 zero2 zero3 fsdp ds2] [--worlds 1 2] [--steps 6]
                             [--batch 4] [--seq 64] [--layers 4] [--rounds 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STRATEGIES = ("single", "dp", "zero1", "zero2", "zero3", "fsdp", "ds1", "ds2", "ds3")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> float:
    """Reset VmHWM to the current resident size and return that size (MB): the baseline after imports."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def worker(a: argparse.Namespace) -> None:
    import torch

    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model
    from tinyllm.train.losses import model_lm_loss
    from tinyllm.train.optim import build_optimizer

    if a.strategy.startswith("ds"):
        from tinyllm.train.parallel.deepspeed_zero import import_deepspeed

        import_deepspeed()  # its import (hundreds of MB of modules) is not part of the model's memory
    import torch.distributed.fsdp  # likewise

    base_mb = _reset_peak()
    torch.manual_seed(0)
    cfg = preset("tiny", num_hidden_layers=a.layers, max_position_embeddings=max(a.seq, 256))
    dev = torch.device(a.device)
    n_params = sum(p.numel() for p in build_model(cfg).parameters())
    par = None
    if a.strategy != "single":
        import torch.distributed as dist

        from tinyllm.train.parallel.config import ParallelConfig
        from tinyllm.train.parallel.dist import init_from_env
        from tinyllm.train.parallel.strategy import build_strategy

        dev = init_from_env(a.device)
        name = {"ds1": "deepspeed", "ds2": "deepspeed", "ds3": "deepspeed"}.get(a.strategy, a.strategy)
        stage = int(a.strategy[2]) if a.strategy.startswith("ds") else 2
        model = build_model(cfg).to(dev)
        par = build_strategy(ParallelConfig(parallel=name, zero_stage=stage), model,
                             list(model.named_parameters()),
                             {"lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.95), "kind": "adamw"},
                             micro_batch=a.batch, grad_accum=1, grad_clip=1.0)
        rank, world, fwd = dist.get_rank(), dist.get_world_size(), par.model
    else:
        model = build_model(cfg).to(dev)
        opt = build_optimizer(list(model.named_parameters()), 1e-4, 0.1, (0.9, 0.95))
        rank, world, fwd = 0, 1, model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g)
    b = a.batch // world
    x, y = ids[rank * b:(rank + 1) * b, :-1].to(dev), ids[rank * b:(rank + 1) * b, 1:].to(dev)

    def step() -> None:
        loss = model_lm_loss(fwd, x, y)
        if par is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            par.backward(loss, 1)
            par.clip_grad_norm(1.0)
            par.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(a.warmup):
        step()
    times, cpu = [], []
    for _ in range(a.steps):
        if par is not None:
            par.mean(0.0)  # line the ranks up: a step's time is the slowest rank's
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    mine = {"peak_rss_mb": round(_status_mb("VmHWM") - base_mb, 1), "step_s": med, "cpu_s": statistics.median(cpu),
            "cuda_peak_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None}
    per_rank = [mine]
    if par is not None:
        import torch.distributed as dist

        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
    if rank == 0:
        step_s = max(r["step_s"] for r in per_rank)
        print("RESULT " + json.dumps({
            "bench": "parallel", "strategy": a.strategy, "world": world, "device": dev.type,
            "step_ms": round(1e3 * step_s, 2), "tokens_per_s": round(a.batch * a.seq / step_s, 1),
            "cpu_ms_all_ranks": round(1e3 * sum(r["cpu_s"] for r in per_rank), 2),
            "peak_mb_above_imports_per_rank": [r["peak_rss_mb"] for r in per_rank],
            "cuda_peak_mb_per_rank": [r["cuda_peak_mb"] for r in per_rank] if dev.type == "cuda" else None,
            "params": n_params, "batch": a.batch, "seq": a.seq, "layers": a.layers}), flush=True)
    if par is not None:
        from tinyllm.train.parallel.dist import barrier, destroy

        barrier("bench end")  # leave together: a rank tearing down while its peer is still in a collective can hang
        destroy()


def launch(strategy: str, world: int, a: argparse.Namespace) -> dict | None:
    # a fixed mmap threshold hands freed large blocks back to the OS, so the peak resident size follows the peak
    # of live tensors rather than glibc's heap growth
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads_per_rank), "GLOO_SOCKET_IFNAME": "lo",
           "TINYLLM_BF16": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
    if strategy.startswith("ds") and a.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    args = ["--worker", "--strategy", strategy, "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch",
            str(a.batch), "--seq", str(a.seq), "--layers", str(a.layers), "--device", a.device]
    if strategy == "single":
        cmd = [sys.executable, os.path.abspath(__file__), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            print(json.dumps(out), flush=True)
            return out
    print(json.dumps({"bench": "parallel", "strategy": strategy, "world": world, "error": res.stderr[-800:]}),
          flush=True)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="single", choices=STRATEGIES)
    ap.add_argument("--strategies", nargs="+", default=["single", "dp", "zero1", "zero2", "zero3", "fsdp", "ds2"],
                    choices=STRATEGIES)
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows) per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads-per-rank", type=int, default=1,
                    help="OMP threads of each rank (1: no OpenMP spin-waiting on a busy machine; W ranks use W cores)")
    ap.add_argument("--rounds", type=int, default=1, help="launch every configuration this many times, interleaved")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    from _common import machine_ceilings

    print(json.dumps({"bench": "machine", **machine_ceilings()}), flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(a.rounds):  # rounds interleave the configurations, so a busy spell hits all of them
        for world in a.worlds:
            for s in a.strategies:
                if s == "single" and world != 1:
                    continue
                out = launch(s, world, a)
                if out:
                    results.setdefault((s, world), []).append(out)

    def med(key: tuple[str, int], field: str = "step_ms") -> float | None:
        runs = results.get(key)
        return statistics.median(r[field] for r in runs) if runs else None

    for (s, world), runs in results.items():
        if a.rounds > 1:
            print(json.dumps({"bench": "parallel_median", "strategy": s, "world": world, "rounds": len(runs),
                              "step_ms": med((s, world)), "cpu_ms_all_ranks": med((s, world), "cpu_ms_all_ranks"),
                              "tokens_per_s": round(a.batch * a.seq / med((s, world)) * 1e3, 1)}), flush=True)
    for world in a.worlds:
        for field, unit in (("step_ms", "wall ms/step"), ("cpu_ms_all_ranks", "CPU ms/step, all ranks")):
            ours, peer = med(("zero2", world), field), med(("ds2", world), field)
            if ours and peer:
                print(json.dumps({"bench": "parallel_zero2_vs_deepspeed", "world": world, "ours": ours,
                                  "peer": peer, "unit": unit + " (median over rounds)",
                                  "ratio": round(ours / peer, 3)}), flush=True)


if __name__ == "__main__":
    main()
