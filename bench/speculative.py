"""Speculative decoding in the engine (DESIGN §7): tokens/s of `LLM(..., speculative=...)` over the same engine
decoding plainly, greedy, same model, same process, runs alternated (the machine is shared), medians; the
tokens must be identical. One JSON line per figure with ratio = speculative / plain.

  ngram       batch 1, prompt lookup (k tokens, n-grams 1–4) on a repetitive-text workload: a chat prompt
              asking to copy a passage back, so the output repeats its input;
  draft       batch 1, the same workload drafted by a quantized copy of the target (self-speculation: Q4_1 blocks
              and a Q8_0 head by default, --draft-quantization int4 for tinyllm's int4 g32 with an int8 head),
              optionally cut to its first --draft-layers layers;
  batched     --batch requests of the workload (different passages) together, prompt lookup.

Each line carries the acceptance rate and the tokens emitted per verification from the engine's stats.

    python bench/speculative.py [--model smollm2] [--new-tokens 128] [--repeats 5] [--k 4] [--threads 2]
                                [--draft-layers N] [--batch 8] [--skip draft ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_ceilings, report

FIGURES = ("ngram", "draft", "batched")

PASSAGES = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick "
    "daft zebras jump! The five boxing wizards jump quickly. Sphinx of black quartz, judge my vow.",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b"
    "\n\n\ndef div(a, b):\n    return a / b\n",
    "Monday: wake up at seven, run five kilometres, shower, breakfast. Tuesday: wake up at seven, swim one "
    "kilometre, shower, breakfast. Wednesday: wake up at seven, run five kilometres, shower, breakfast.",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain. Rome is "
    "the capital of Italy. Lisbon is the capital of Portugal. Vienna is the capital of Austria.",
]


def workload(tokenizer, i: int) -> list[int]:
    from tinyllm.tokenizer import encode_chat

    text = PASSAGES[i % len(PASSAGES)]
    chat = [{"role": "user", "content": f"Copy this text exactly, twice:\n\n{text}"}]
    return encode_chat(tokenizer, chat, add_generation_prompt=True)[0]


def run(llm, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]], dict]:
    """(seconds, output token ids, spec stats) of one generate call; stats are this call's only."""
    from tinyllm import SamplingParams
    from tinyllm.infer.speculative import SpecStats

    eng = llm.engine
    eng.spec_stats = SpecStats()
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sec = time.perf_counter() - t0
    return sec, [o.outputs[0].token_ids for o in outs], dict(eng.stats)


def compare(name: str, plain, spec, prompts: list[list[int]], n: int, repeats: int, **extra) -> dict:
    run(plain, prompts, n)  # warm-up: native kernels, RoPE tables, allocator
    run(spec, prompts, n)
    a: list[float] = []
    b: list[float] = []
    same = True
    stats: dict = {}
    steps = spec.engine.num_steps
    for _ in range(repeats):
        sa, ta, _ = run(plain, prompts, n)
        sb, tb, stats = run(spec, prompts, n)
        a.append(sa)
        b.append(sb)
        same &= ta == tb
    stats["steps_per_run"] = (spec.engine.num_steps - steps) / repeats
    tokens = n * len(prompts)
    # the load of a shared machine swings within seconds: each plain run is paired with the speculative run
    # right after it, and the median of those ratios is the speedup
    pairs = statistics.median(x / y for x, y in zip(a, b, strict=True))
    return report(f"speculative_{name}", tokens / statistics.median(b), tokens / statistics.median(a), "tok/s",
                  paired_speedup=round(pairs, 3), identical_tokens=same, batch=len(prompts), new_tokens=n, repeats=repeats,
                  acceptance_rate=round(stats.get("spec_acceptance_rate", 0.0), 3),
                  tokens_per_verification=round(stats.get("spec_tokens_per_verification", 0.0), 3),
                  spec_steps_per_run=stats["steps_per_run"],
                  plain_runs_s=[round(x, 3) for x in a], spec_runs_s=[round(x, 3) for x in b], **extra)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="GGUF file, HF directory or short name")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (prompt lookup)")
    ap.add_argument("--draft-k", type=int, default=6, help="draft tokens per step (draft model)")
    ap.add_argument("--draft-layers", type=int, default=None, help="cut the self-draft to N layers")
    from tinyllm.infer.drafters import DRAFT_QUANTIZATIONS

    ap.add_argument("--draft-quantization", default="q4_1", choices=list(DRAFT_QUANTIZATIONS),
                    help="the self-draft's layers (its LM head: q8_0 beside llama.cpp blocks, int8 beside our own)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=FIGURES)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tinyllm import LLM
    from tinyllm.capability import describe
    from tinyllm.model.hf import load_model, resolve_model_path
    from tinyllm.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    model = load_model(path, dtype=torch.float32)
    tok = load_tokenizer(path)
    lines = [machine_ceilings()]
    lines[0]["cpu"] = describe()
    plain = LLM(model, tok, max_model_len=1024, max_num_seqs=max(args.batch, 1))
    one = [workload(tok, 0)]
    if "ngram" not in args.skip:
        spec = LLM(model, tok, max_model_len=1024, speculative=dict(method="ngram", num_speculative_tokens=args.k))
        lines.append(compare("ngram", plain, spec, one, args.new_tokens, args.repeats, k=args.k))
    if "draft" not in args.skip:
        q = args.draft_quantization
        cfg = dict(method="draft", num_speculative_tokens=args.draft_k, draft_quantization=q,
                   draft_head_quantization="q8_0" if q.startswith("q") else "int8", draft_group_size=32,
                   draft_num_layers=args.draft_layers)
        spec = LLM(model, tok, max_model_len=1024, speculative=cfg)
        lines.append(compare(f"draft_{q}", plain, spec, one, args.new_tokens, args.repeats, k=args.draft_k,
                             draft_layers=args.draft_layers or model.config.num_hidden_layers))
    if "batched" not in args.skip:
        many = [workload(tok, i) for i in range(args.batch)]
        spec = LLM(model, tok, max_model_len=1024, max_num_seqs=args.batch,
                   speculative=dict(method="ngram", num_speculative_tokens=args.k))
        lines.append(compare("ngram_batched", plain, spec, many, args.new_tokens, max(1, args.repeats // 2),
                             k=args.k))
    return lines


if __name__ == "__main__":
    main()
