"""All 14,042 MMLU test questions through tinyllm's harness, 0-shot, one subject at a time (resumable).

Each finished subject appends one JSON line {subject, category, n, acc, acc_norm, seconds} to `--out`; a rerun
skips the subjects already there, so an interrupted run continues. At the end it prints the four lm-eval
categories (STEM, humanities, social sciences, other) and the overall accuracy, micro-averaged over questions
as lm-eval's `mmlu` group does, and with `--docs-data` records them for the documentation's chart.

    python bench/mmlu_full.py --out runs/eval/mmlu-letters.jsonl                 # lm-eval's `mmlu` template
    python bench/mmlu_full.py --out runs/eval/mmlu-cloze.jsonl --template cloze  # `mmlu_continuation`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

# lm-eval's grouping of the 57 subjects (its mmlu_{stem,humanities,social_sciences,other}_tasks tags)
CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
CATEGORY_OF = {s: c for c, subjects in CATEGORIES.items() for s in subjects.split()}


def summarise(rows: list[dict]) -> dict:
    """{"categories": {name: {n, acc, acc_norm}}, "overall": {...}}, micro-averaged over questions."""
    def agg(part: list[dict]) -> dict:
        n = sum(r["n"] for r in part)
        return {"n": n, **{m: round(sum(r[m] * r["n"] for r in part) / n, 4) for m in ("acc", "acc_norm")}}

    by = defaultdict(list)
    for r in rows:
        by[CATEGORY_OF.get(r["subject"], "other")].append(r)
    return {"categories": {c: agg(by[c]) for c in CATEGORIES if by[c]}, "overall": agg(rows)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON-lines file, one line per finished subject (resumed)")
    ap.add_argument("--template", choices=["letters", "cloze"], default="letters")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--docs-data", default="", help="also record the summary under this key of "
                                                    "docs/data/eval-results.json")
    args = ap.parse_args(argv)

    from tinyllm.eval.harness import evaluate_task
    from tinyllm.eval.lm import TinyLM
    from tinyllm.eval.tasks import mc_task, mmlu_docs
    from tinyllm.model.hf import load_model, resolve_model_path
    from tinyllm.tokenizer import load_tokenizer

    out = Path(args.out)
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    done = {r["subject"] for r in rows}
    by = defaultdict(list)
    for d in mmlu_docs():
        by[d["subject"]].append(d)
    unknown = sorted(set(by) - set(CATEGORY_OF))
    if unknown:
        print(f"subjects outside lm-eval's categories (counted as 'other'): {unknown}", file=sys.stderr)
    todo = [s for s in sorted(by) if s not in done]
    if todo:
        path = resolve_model_path(args.model)
        lm = TinyLM(load_model(path), load_tokenizer(path))
        out.parent.mkdir(parents=True, exist_ok=True)
    for i, subject in enumerate(todo, 1):
        t0 = time.perf_counter()
        task = mc_task(f"mmlu_{subject}", by[subject], cloze=args.template == "cloze")
        r = evaluate_task(lm, task, batch_size=args.batch_size)
        row = {"subject": subject, "category": CATEGORY_OF.get(subject, "other"), "n": r["n"],
               **r["metrics"], "seconds": round(time.perf_counter() - t0, 1)}
        with out.open("a") as f:  # one whole line per subject: a killed run loses at most the current subject
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"[{len(done) + i}/{len(by)}] {subject}: acc {row['acc']:.3f} ({row['n']} q, {row['seconds']} s)",
              flush=True)
    summary = {"model": args.model, "template": args.template, "subjects": len(rows), **summarise(rows)}
    print(json.dumps(summary))
    if args.docs_data:
        from tinyllm.atomic import atomic_write_json

        data = Path(__file__).resolve().parent.parent / "docs" / "data" / "eval-results.json"
        existing = json.loads(data.read_text()) if data.exists() else {}
        existing[args.docs_data] = summary
        atomic_write_json(data, existing, indent=1)
    return summary


if __name__ == "__main__":
    main()
