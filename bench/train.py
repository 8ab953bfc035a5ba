"""Pretraining-step benchmark (DESIGN §7): tinyllm's training loop vs transformers LlamaForCausalLM, same process.

Both sides start from the same weights (the peer loads ours through the HF export), train on the same random
token batches with the same fused AdamW, gradient clipping at 1.0 and precision:
  ours   one optimizer step of tinyllm.train.loop (schedule, autocast, loss, backward, clip, AdamW) with the
         loss of PretrainTask (train.losses.model_lm_loss: the lm_head fused into a chunked cross entropy);
  peer   a plain PyTorch loop: `model(input_ids, labels=input_ids).loss.backward()`, clip_grad_norm_, AdamW.
One JSON line per precision (fp32, bf16 autocast; with --compile also ours under torch.compile against the
same eager peer) with tokens/s ours and peer, ratio = ours / peer, and each side's MFU (6·N + attention FLOPs
per token against the measured matmul ceiling of that precision), plus a line with the machine ceilings
(bench/_common.py). Default size: the `tiny` preset (d256, L6, V8192, 8 heads) at B16×T256.

    python bench/train.py [--batch 16] [--seq 256] [--repeats 3] [--precision fp32 bf16] [--layers 6] [--threads 1]
                          [--compile] [--profile [--profile-rows 14]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_ceilings, paired_median_seconds, report


class _BenchTask:
    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def train_batches(self):
        import itertools

        return itertools.cycle(self.batches)

    def eval_batches(self):
        return None

    def loss(self, model, batch):
        from tinyllm.train.losses import model_lm_loss

        x, y = batch  # what PretrainTask.loss does for a dense model
        return model_lm_loss(model, x, y), {}

    def trainable_parameters(self, model):
        return model.named_parameters()


def build_pair(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model, save_pretrained

    cfg = preset("tiny", num_hidden_layers=args.layers, num_key_value_heads=args.kv_heads,
                 max_position_embeddings=max(1024, args.seq))
    torch.manual_seed(0)
    ours = build_model(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        peer = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    return ours, peer.train()


def bench_variant(args: argparse.Namespace, batches: list, precision: str, compiled: bool, peak: float) -> dict:
    """Time ours and the peer alternately for one precision; print and return the JSON line."""
    from tinyllm.train.loop import TrainConfig, _Run, model_flops_per_token

    ours, peer = build_pair(args)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=10**6, batch_size=args.batch, lr=1e-4, warmup_steps=0,
                          precision=precision, device="cpu", progress=False, compile=compiled)
        run = _Run(ours, _BenchTask(batches), cfg)
        peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        step = {"ours": 0, "peer": 0}

        def ours_step() -> None:
            run.step(step["ours"])
            step["ours"] += 1

        def peer_step() -> None:
            x = batches[step["peer"] % len(batches)][0]
            with autocast:
                loss = peer(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
            peer_opt.step()
            peer_opt.zero_grad(set_to_none=True)
            step["peer"] += 1

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name, fn in (("ours", ours_step), ("peer", peer_step)):
                fn()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
                print(f"--- {name} {precision}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        a, b = paired_median_seconds(ours_step, peer_step, repeats=args.repeats, warmup=1)
    fpt = model_flops_per_token(ours, args.seq)
    name = f"train_step_{precision}" + ("_compiled" if compiled else "")
    return report(name, tokens / a, tokens / b, "tokens/s", mfu_ours=round(fpt * tokens / a / peak, 4),
                  mfu_peer=round(fpt * tokens / b / peak, 4), batch=args.batch, seq=args.seq, layers=args.layers,
                  threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=8, help="8 = plain multi-head attention")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per side (median), alternating")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--profile", action="store_true", help="print the top ops of one step of each side")
    ap.add_argument("--profile-rows", type=int, default=14, help="ops per --profile table")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from _common import matmul_gflops

    ceilings = machine_ceilings()
    # MFU against the ceiling of the precision the matmuls run in (bf16 is faster on CPUs with AMX/AVX512-BF16);
    # best of three, since a busy neighbour lowers one measurement and would inflate MFU past 1
    ceilings["matmul_fp32_gflops"] = round(max(ceilings["matmul_fp32_gflops"], matmul_gflops(), matmul_gflops()), 1)
    peaks = {"fp32": ceilings["matmul_fp32_gflops"] * 1e9}
    if "bf16" in args.precision:
        ceilings["matmul_bf16_gflops"] = round(max(matmul_gflops(dtype=torch.bfloat16) for _ in range(3)), 1)
        peaks["bf16"] = ceilings["matmul_bf16_gflops"] * 1e9
    print(json.dumps(ceilings), flush=True)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 8192, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    batches = [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]
    variants = [(p, False) for p in args.precision] + [(p, True) for p in args.precision if args.compile]
    return [ceilings] + [bench_variant(args, batches, p, c, peaks[p]) for p, c in variants]


if __name__ == "__main__":
    main()
