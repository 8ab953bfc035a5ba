"""Hallucination detection on the constructed inews fact set (notes ch.09): AUROC of each score — SelfCheck
consistency over k sampled titles, BM25 retrieval-grounded support, mean token entropy and length-normalised
log-probability — for SmolLM2-135M-Instruct (or `--model`).

Facts: `tinyllm.eval.hallucination.inews_fact_set` — the first `--n` usable inews test articles, each with its
real title (true) and one corrupted title (a number changed, an entity swapped, or another article's title).
Prints one JSON line per method; `--output` keeps every score and sample.

    python bench/hallucination.py [--n 100] [--k 5] [--max-gen-toks 32] [--output runs/eval/hallucination.json]
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-gen-toks", type=int, default=32)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--output", default="")
    args = ap.parse_args(argv)

    from tinyllm.atomic import atomic_write_json
    from tinyllm.eval.hallucination import inews_fact_set, score_fact_set
    from tinyllm.eval.lm import TinyLM
    from tinyllm.model.hf import load_model, resolve_model_path
    from tinyllm.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    lm = TinyLM(load_model(path), load_tokenizer(path))
    facts = inews_fact_set(n=args.n)
    t0 = time.perf_counter()
    r = score_fact_set(lm, facts, k=args.k, temperature=args.temperature, max_gen_toks=args.max_gen_toks)
    seconds = round(time.perf_counter() - t0, 1)
    lines = [{"bench": "hallucination", "method": m, "auroc": round(a, 4), "by_kind": {
        c: round(v, 4) for c, v in r["auroc_by_kind"][m].items()}, "n": r["n"], "kinds": r["kinds"], "k": args.k,
        "seconds": seconds} for m, a in r["auroc"].items()]
    for line in lines:
        print(json.dumps(line, ensure_ascii=False), flush=True)
    if args.output:
        atomic_write_json(args.output, {"lines": lines, "facts": facts, "scores": r["scores"],
                                        "samples": r["samples"]})
    return lines


if __name__ == "__main__":
    main()
