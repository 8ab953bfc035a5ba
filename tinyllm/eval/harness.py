"""Log-likelihood evaluation (notes ch.09 评估: multiple-choice benchmarks such as C-Eval/MMLU, perplexity).

- `choice_logprobs`: for a prompt and candidate continuations, Σ log p(choice tokens | prompt) — the
  multiple-choice protocol of lm-evaluation-harness; the prediction is the argmax (optionally normalised by the
  number of choice tokens).
- `sequence_nll`: total negative log-likelihood and token count of held-out token windows → perplexity.

Batched: prompts+choices are right-padded into one forward per batch (padding sits after the scored tokens, so
causal attention never sees it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def scored_logits(model: nn.Module, x: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """fp32 logits [n, V] at the `scored` positions (a bool mask) of x [b, t], in row-major order. A CausalLM
    applies its lm_head only there: scoring a few positions of long prompts then skips the head's product (and
    the softmax) over every other position — most of the work at a small model's vocabulary."""
    from tinyllm.model.transformer import CausalLM

    if isinstance(model, CausalLM):
        return model.lm_head(model(x, hidden_only=True)[scored]).float()
    return model(x)[scored].float()


@torch.no_grad()
def choice_logprobs(model: nn.Module, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]],
                    batch_size: int = 32, pad_id: int = 0) -> torch.Tensor:
    """[len(prompts), len(choices)] of Σ log p(choice | prompt) (same candidate list for every prompt).
    Rows are batched by length (little padding) and the logits taken only where a choice token is predicted."""
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError("every choice needs at least one token")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    rows = [(list(p), list(c)) for p in prompts for c in choices]
    if any(not p for p, _ in rows):
        raise ValueError("every prompt needs at least one token (the first choice token is predicted from it)")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out = torch.empty(len(rows))
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        scored = torch.zeros((len(idx), width), dtype=torch.bool)
        targets = []
        for r, i in enumerate(idx):
            p, c = rows[i]
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            scored[r, len(p) - 1 : len(p) + len(c) - 1] = True  # logits at t predict token t+1
            targets += c
        logp = F.log_softmax(scored_logits(model, ids.to(device), scored.to(device)), dim=-1).cpu()
        picked = logp[torch.arange(len(targets)), torch.tensor(targets)]
        k = 0
        for i in idx:
            n = len(rows[i][1])
            out[i] = picked[k : k + n].sum()
            k += n
    return out.view(len(prompts), len(choices))


@torch.no_grad()
def sequence_nll(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 ignore_index: int = -100) -> tuple[float, int]:
    """(Σ NLL in nats, number of predicted tokens) over (input_ids, shifted labels) batches."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for x, y in batches:
        logits = model(x.to(device)).float()
        y = y.to(device)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=ignore_index,
                                       reduction="sum"))
        count += int((y != ignore_index).sum())
    return total, count


# ------------------------------------------------------------------ the task harness (lm-eval semantics)

def _mc_metrics(lls: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """acc: argmax of Σ log p; acc_norm: argmax of Σ log p / len(choice in characters) (lm-eval)."""
    norm = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    return {"acc": float(max(range(len(lls)), key=lls.__getitem__) == gold),
            "acc_norm": float(max(range(len(norm)), key=norm.__getitem__) == gold)}


def evaluate_task(lm: Any, task: Any, num_fewshot: int = 0, limit: int | None = None, batch_size: int = 16,
                  seed: int = 1234, progress: bool = False) -> dict[str, Any]:
    """Score one `tasks.Task` with an `lm.LM`; returns {"metrics": {...}, "samples": [...]} where each sample
    keeps the document's requests' raw results (log-likelihoods, generations)."""
    import math

    from tqdm.auto import tqdm

    from tinyllm.eval.metrics import rouge_l

    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 or None")
    docs = task.docs[:limit] if limit else task.docs
    if not docs:
        raise ValueError(f"task {task.name}: no documents")
    contexts = task.contexts(num_fewshot, docs, seed=seed) if task.output_type != "loglikelihood_rolling" else []
    chunk = max(batch_size, 1) * 4
    bar = tqdm(total=len(docs), desc=task.name, disable=not progress)
    samples: list[dict[str, Any]] = []
    for s in range(0, len(docs), chunk):
        part = docs[s: s + chunk]
        if task.output_type == "multiple_choice":
            reqs, owner = [], []
            for j, (doc, ctx) in enumerate(zip(part, contexts[s: s + chunk])):
                for c in task.doc_to_choice(doc):
                    reqs.append((ctx, task.target_delimiter + c))
                    owner.append(j)
            res = lm.loglikelihood(reqs, batch_size)
            for j, doc in enumerate(part):
                mine = [r for r, o in zip(res, owner) if o == j]
                lls, choices = [r[0] for r in mine], task.doc_to_choice(doc)
                samples.append({"loglikelihoods": lls, "is_greedy": [r[1] for r in mine], "target": task.doc_to_target(doc),
                                **_mc_metrics(lls, choices, task.doc_to_target(doc))})
        elif task.output_type == "loglikelihood_rolling":
            texts = [str(task.doc_to_target(d)) for d in part]
            for text, ll in zip(texts, lm.loglikelihood_rolling(texts, batch_size)):
                samples.append({"loglikelihood": ll, "words": len(re.split(r"\s+", text)),
                                "bytes": len(text.encode("utf-8"))})
        else:
            reqs = [(ctx, dict(task.generation_kwargs)) for ctx in contexts[s: s + chunk]]
            texts = lm.generate_until(reqs, batch_size)
            preds = [task.extract(t) if task.extract else t.strip() for t in texts]
            run = task.scorer(part, preds) if task.scorer is not None else None  # e.g. code run in a sandbox
            for j, (doc, text, pred) in enumerate(zip(part, texts, preds)):
                gold = str(task.doc_to_target(doc)).strip()
                if run is not None:
                    score = float(run[j])
                else:
                    score = rouge_l(pred, gold, "char").fmeasure if task.metric == "rouge_l" else float(pred == gold)
                samples.append({"generation": text, "prediction": pred, "target": gold, task.metric: score})
        bar.update(len(part))
    bar.close()
    n = len(samples)
    if task.output_type == "multiple_choice":
        metrics = {m: sum(x[m] for x in samples) / n for m in ("acc", "acc_norm")}
    elif task.output_type == "loglikelihood_rolling":
        ll = sum(x["loglikelihood"] for x in samples)
        words, nbytes = sum(x["words"] for x in samples), sum(x["bytes"] for x in samples)
        metrics = {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
                   "bits_per_byte": -ll / nbytes / math.log(2)}
    else:
        metrics = {task.metric: sum(x[task.metric] for x in samples) / n}
    return {"metrics": metrics, "n": n, "num_fewshot": num_fewshot, "samples": samples}
