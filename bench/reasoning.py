"""Chain-of-thought and self-consistency on arithmetic (notes ch.10): accuracy of direct answers, one greedy
CoT chain, and majority votes over k = 5 and 10 sampled chains, for SmolLM2-135M-Instruct (or `--model`).

Questions: reasoning-gym `basic_arithmetic` (2-3 terms of 1-2 digits, seed 0, `--n` of them). Prompts
and extraction: `tinyllm.eval.cot` (few-shot CoT with three worked examples when `--fewshot`). Chains are
sampled at temperature `--temperature` with seeds 0..9 through the engine; the k = 5 vote uses seeds 0..4
of the same chains. Prints one JSON line per mode and writes nothing else.

    python bench/reasoning.py [--n 50] [--fewshot] [--temperature 0.7] [--max-gen-toks 96]
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--fewshot", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-gen-toks", type=int, default=96)
    args = ap.parse_args(argv)

    from tinyllm.eval import cot
    from tinyllm.eval.lm import TinyLM
    from tinyllm.eval.tasks import arithmetic
    from tinyllm.model.hf import load_model, resolve_model_path
    from tinyllm.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    lm = TinyLM(load_model(path), load_tokenizer(path))
    docs = arithmetic(size=args.n).docs
    lines = []
    for mode in ("direct", "cot"):
        t0 = time.perf_counter()
        r = cot.evaluate_reasoning(lm, docs, mode, fewshot=args.fewshot, max_gen_toks=args.max_gen_toks)
        lines.append({"bench": "reasoning", "mode": mode, "fewshot": args.fewshot, "n": r["n"],
                      "accuracy": r["accuracy"], "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(lines[-1]), flush=True)
    t0 = time.perf_counter()
    until = ["\n\nQuestion:", "\nQuestion:"]
    reqs = [(cot.prompt(d["question"], "sc", args.fewshot), {"until": until, "max_gen_toks": args.max_gen_toks,
                                                             "temperature": args.temperature, "seed": s})
            for d in docs for s in range(10)]
    answers = [cot.chain_answer(t) for t in lm.generate_until(reqs, 32)]
    for k in (5, 10):
        correct = 0
        for i, d in enumerate(docs):
            winner, _ = cot.majority_vote(answers[i * 10: i * 10 + k])
            correct += cot.same_number(winner, d["answer"])
        lines.append({"bench": "reasoning", "mode": f"sc@{k}", "fewshot": args.fewshot, "n": len(docs),
                      "accuracy": correct / len(docs), "temperature": args.temperature,
                      "seconds_all_chains": round(time.perf_counter() - t0, 1)})
        print(json.dumps(lines[-1]), flush=True)
    return lines


if __name__ == "__main__":
    main()
