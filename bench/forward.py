"""Forward-pass benchmark (DESIGN §7): tinyllm vs transformers on SmolLM2-135M (fp32, CPU), same process.

Figures, each printed as one JSON line with ratio = ours / peer (higher is better for tok/s):
  prefill  batch 1 × `--tokens` tokens, one no-grad forward, tokens per second (median of `--repeats`);
  decode   batch 1 greedy decode of `--new-tokens` tokens after a 16-token prompt, new tokens per second
           (ours: tinyllm.infer.generate.generate with a KV cache; peer: HF generate with
           do_sample=False and min_new_tokens = max_new_tokens so both produce exactly the same count).
Plus a line with the machine ceilings (fp32 matmul GFLOP/s, memory-copy GB/s) from bench/_common.py.

    python bench/forward.py [--tokens 512] [--new-tokens 128] [--repeats 5] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_ceilings, paired_median_seconds, report


def load_pair(name: str):
    from transformers import AutoModelForCausalLM

    from tinyllm.model.hf import load_model, resolve_model_path

    path = resolve_model_path(name)
    ours = load_model(path)
    if path.suffix == ".gguf":
        peer = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        peer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return ours, peer.eval()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="GGUF file, HF directory or short name")
    ap.add_argument("--tokens", type=int, default=512, help="prefill length")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy decode length")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    ap.add_argument("--skip", choices=["prefill", "decode"], default=None, help="leave one figure out")
    args = ap.parse_args(argv)

    lines = [machine_ceilings()]
    print(json.dumps(lines[0]), flush=True)
    from tinyllm.infer.generate import GenerationConfig, generate

    ours, peer = load_pair(args.model)
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)

    with torch.inference_mode():
        if args.skip != "prefill":
            ids = torch.randint(3, vocab, (1, args.tokens), generator=g)
            a, b = paired_median_seconds(lambda: ours(ids), lambda: peer(ids, use_cache=False),
                                         args.repeats)
            lines.append(report("prefill", args.tokens / a, args.tokens / b, "tok/s",
                                shape=f"1x{args.tokens}", threads=torch.get_num_threads()))
        if args.skip != "decode":
            prompt = torch.randint(3, vocab, (1, 16), generator=g)
            n = args.new_tokens
            cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=[])
            mask = torch.ones_like(prompt)

            def run_ours() -> torch.Tensor:
                out = generate(ours, prompt, cfg)
                assert out.shape[1] == prompt.shape[1] + n
                return out

            def run_peer() -> torch.Tensor:
                out = peer.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n)
                assert out.shape[1] == prompt.shape[1] + n
                return out

            a, b = paired_median_seconds(run_ours, run_peer, max(1, args.repeats // 2 + 1))
            lines.append(report("decode", n / a, n / b, "tok/s", prompt=16, new_tokens=n,
                                threads=torch.get_num_threads()))
    return lines


if __name__ == "__main__":
    main()
