"""HumanEval pass@1 (greedy) of SmolLM2-135M-Instruct (or `--model`) on the first `--n` problems, each
completion run in our sandbox (`tinyllm.eval.humaneval`). Two prompt formats: `plain` (the problem's prompt
as is, lm-eval's `humaneval`) and `instruct` (the problem in a chat turn, the answer started with the
prompt, lm-eval's `humaneval_instruct`). Prints one JSON line per format; `--output` keeps the completions.

    python bench/humaneval.py [--n 40] [--formats plain,instruct] [--output runs/eval/humaneval.json]
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--formats", default="plain,instruct")
    ap.add_argument("--max-gen-toks", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--output", default="")
    args = ap.parse_args(argv)

    from tinyllm.atomic import atomic_write_json
    from tinyllm.eval.humaneval import evaluate_humaneval
    from tinyllm.eval.lm import TinyLM
    from tinyllm.model.hf import load_model, resolve_model_path
    from tinyllm.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    lm = TinyLM(load_model(path), load_tokenizer(path))
    lines, runs = [], {}
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        r = evaluate_humaneval(lm, limit=args.n, instruct=fmt == "instruct", chat_template=lm.tokenizer.chat_template,
                               max_gen_toks=args.max_gen_toks, batch_size=args.batch_size)
        statuses: dict[str, int] = {}
        for s in r["samples"]:
            statuses[s["statuses"][0]] = statuses.get(s["statuses"][0], 0) + 1
        lines.append({"bench": "humaneval", "format": fmt, "n": r["n"], "pass@1": r["metrics"]["pass@1"],
                      "passed": sum(s["correct"] for s in r["samples"]), "statuses": statuses,
                      "seconds": round(time.perf_counter() - t0, 1)})
        runs[fmt] = r
        print(json.dumps(lines[-1]), flush=True)
    if args.output:
        atomic_write_json(args.output, {"lines": lines, "runs": runs})
    return lines


if __name__ == "__main__":
    main()
