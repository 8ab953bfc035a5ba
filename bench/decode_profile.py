"""Where one batch-1 decode step goes (issue: decode speed vs llama.cpp): the engine's step split into
scheduler, metadata, forward (tensor ops vs native matrix-vector kernels vs everything else), LM head,
sampling and output bookkeeping, for one SmolLM2-135M request decoding greedily.

Each part is timed by wrapping the engine's own methods with perf_counter (medians over `--steps` decode
steps); the forward's op mix comes from torch.profiler (self CPU time per op, summed by kind). One JSON
line per configuration.

    python bench/decode_profile.py [--model smollm2] [--steps 48] [--prompt-len 16] [--configs fp32 int4 gguf gguf_fused] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

KINDS = {  # profiler op name → kind
    "aten::addmm": "matmul", "aten::mm": "matmul", "aten::linear": None, "aten::matmul": None,
    "aten::bmm": "matmul",
}


def _kind(name: str) -> str:
    if name.startswith("tinyllm_cpu_"):
        return "native:" + name.split("::")[-1]
    if name in ("aten::addmm", "aten::mm", "aten::bmm"):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    return "other_ops"


def _wrap(obj: Any, attr: str, times: dict[str, list[float]], key: str) -> None:
    fn = getattr(obj, attr)

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[key].append(time.perf_counter() - t0)

    setattr(obj, attr, timed)


def build(cfg: str, path: Any, tokenizer: Any) -> Any:
    from tinyllm import LLM
    from tinyllm.model.hf import load_model

    if cfg.startswith("gguf"):
        llm = LLM(path, tokenizer, max_model_len=1024, max_num_seqs=4, quantization="gguf")
        if cfg == "gguf_fused":  # the fast path's twin: FusedForward over the same GGUF-block modules
            llm.engine.runner.fast_step = None
        return llm
    q = None if cfg == "fp32" else cfg
    return LLM(load_model(path), tokenizer, max_model_len=1024, max_num_seqs=4, quantization=q, group_size=32)


def profile(llm: Any, prompt: list[int], steps: int) -> dict[str, Any]:
    from tinyllm import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    times: dict[str, list[float]] = defaultdict(list)
    eng.add_request("warm", None, params, prompt_token_ids=prompt)
    while eng.has_unfinished_requests():
        eng.step()
    _wrap(eng.scheduler, "schedule", times, "scheduler")
    _wrap(eng.runner, "forward", times, "forward_total")
    _wrap(eng.runner, "sample", times, "sample")
    _wrap(eng, "_append", times, "append_detok")
    _wrap(eng, "_output", times, "output")
    if eng.runner.fused is not None:  # a dunder is looked up on the type: wrap the object instead
        inner = eng.runner.fused

        class _Timed:
            def __call__(self, *a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    times["trunk"].append(time.perf_counter() - t0)

        eng.runner.fused = _Timed()
    step = getattr(eng.runner, "fast_step", None)
    if step is not None:  # the decode fast path (decode_fast): its layers and its LM head, timed apart

        class _TimedStep:
            max_rows = step.max_rows

            def rows(self, *a: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return step.rows(*a)
                finally:
                    times["decode_fast_layers"].append(time.perf_counter() - t0)

            def logits(self, h: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return step.logits(h)
                finally:
                    times["lm_head"].append(time.perf_counter() - t0)

        eng.runner.fast_step = _TimedStep()
    else:
        _wrap(eng.runner.model.lm_head, "forward", times, "lm_head")
    eng.add_request("r", None, params, prompt_token_ids=prompt)
    eng.step()  # prefill
    for k in list(times):
        times[k].clear()
    step_t: list[float] = []
    ops: dict[str, float] = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps // 2):
            t0 = time.perf_counter()
            eng.step()
            step_t.append(time.perf_counter() - t0)
    for ev in prof.key_averages():
        ops[_kind(ev.key)] += ev.self_cpu_time_total / 1e3 / (steps // 2)
    prof_step = statistics.median(step_t)
    plain: list[float] = []
    for k in list(times):
        times[k].clear()
    for _ in range(steps // 2):  # the same steps without the profiler's own overhead
        t0 = time.perf_counter()
        eng.step()
        plain.append(time.perf_counter() - t0)
    med = {k: round(1e3 * statistics.median(v), 3) for k, v in times.items() if v}
    step = statistics.median(plain)
    fwd = med.get("forward_total", 0.0)
    inner = med.get("trunk", 0.0) + med.get("decode_fast_layers", 0.0) + med.get("lm_head", 0.0)
    med["forward_outside_layers_and_head"] = round(fwd - inner, 3)
    med["engine_outside_forward_and_sample"] = round(1e3 * step - fwd - med.get("sample", 0.0), 3)
    return {"step_ms": round(1e3 * step, 3), "tok_s": round(1 / step, 1), "parts_ms": med,
            "profiled_step_ms": round(1e3 * prof_step, 3),
            "profiler_self_ms_per_step": {k: round(v, 3) for k, v in sorted(ops.items(), key=lambda x: -x[1])}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=16, help="context before the profiled steps")
    ap.add_argument("--configs", nargs="*", default=["fp32", "int4", "gguf"],
                    choices=["fp32", "int8", "int4", "gguf", "gguf_fused"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.prompt_len < 1:
        ap.error(f"--prompt-len must be at least 1, got {args.prompt_len}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tinyllm.infer import cpu_kernels
    from tinyllm.model.hf import resolve_model_path
    from tinyllm.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    prompt = torch.randint(3, 49152, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    for cfg in args.configs:
        with torch.inference_mode():
            llm = build(cfg, path, tokenizer)
            line = {"bench": "decode_profile", "config": cfg, "threads": torch.get_num_threads(),
                    "native_isa": cpu_kernels.active_isa(), **profile(llm, prompt, args.steps)}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
