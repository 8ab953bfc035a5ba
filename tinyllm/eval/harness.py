"""Log-likelihood evaluation (notes ch.09 评估: multiple-choice benchmarks such as C-Eval/MMLU, perplexity).

- `choice_logprobs`: for a prompt and candidate continuations, Σ log p(choice tokens | prompt) — the
  multiple-choice protocol of lm-evaluation-harness; the prediction is the argmax (optionally normalised by the
  number of choice tokens).
- `sequence_nll`: total negative log-likelihood and token count of held-out token windows → perplexity.

Batched: prompts+choices are right-padded into one forward per batch (padding sits after the scored tokens, so
causal attention never sees it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def choice_logprobs(model: nn.Module, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]],
                    batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
    """[len(prompts), len(choices)] of Σ log p(choice | prompt) (same candidate list for every prompt)."""
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError("every choice needs at least one token")
    rows = [(list(p), list(c)) for p in prompts for c in choices]
    out = torch.empty(len(rows))
    device = next(model.parameters()).device
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for r, (p, c) in enumerate(chunk):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        logp = F.log_softmax(model(ids.to(device)).float(), dim=-1).cpu()  # [b, T, V]
        for r, (p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # logits at t predict token t+1
            out[s + r] = logp[r, pos, torch.tensor(c)].sum()
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
