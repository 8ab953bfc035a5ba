"""Language-modelling losses (notes ch.01.1 language models, ch.02.17 ST-MoE z-loss).

Causal-LM cross entropy: L = −(1/|M|) Σ_{t∈M} log softmax(logits_t)[y_t], M = positions whose label is not
`ignore_index` (−100: prompt tokens in SFT, padding).

Label convention: tinyllm batches carry labels that are *already shifted* — labels[:, t] is the token that
should follow input_ids[:, t] (see tinyllm.data.text.PackedBatches) — so logits[:, t] is compared with
labels[:, t] directly. Hugging Face's `LlamaForCausalLM(labels=...)` takes unshifted labels (labels = input_ids)
and drops the last logit / first label internally; `shift_labels` converts that convention to ours.

z-loss (PaLM, Chowdhery et al. 2022; ST-MoE): coef · mean_t (log Z_t)², log Z_t = logsumexp(logits_t); it keeps
the softmax normaliser near 1 and the logits from drifting, with coefficient ~1e-4.

The loss is computed in fp32 whatever the logits' dtype (bf16 log-softmax over a large vocabulary loses
precision). Not covered: chunked/fused cross entropy that avoids materialising [B, T, V] logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross entropy of logits [B, T, V] against shifted labels [B, T] over non-ignored positions."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF-style labels (aligned with input_ids) → ours: labels[:, t] ← labels[:, t + 1], last = ignore."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def z_loss(logits: torch.Tensor, labels: torch.Tensor | None = None, coef: float = 1e-4,
           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """coef · mean (logsumexp logits)² over positions (only those with a label when `labels` is given)."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # [B, T]
    if labels is not None:
        lse = lse[labels != ignore_index]
    return coef * lse.pow(2).mean()
