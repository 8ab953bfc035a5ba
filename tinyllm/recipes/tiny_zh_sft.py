"""How SFT is sized inside the tiny-zh recipe's budget: its steps (priced by the widths of the batches it will
draw), its learning rate (scaled with the planned batch) and its batch shape (rows of the scale's SFT width
holding the pretraining batch's tokens). `sc` is a `tiny_zh.Scale`."""

from __future__ import annotations

import math
from typing import Any


def sft_steps_for_budget(batches: Any, seconds: float, step_seconds: float, seq_len: int) -> int:
    """How many SFT steps fit `seconds` when a full-width step (`seq_len` tokens per row) takes `step_seconds`:
    each batch costs step_seconds·width/seq_len for the padded width of the batch it will actually draw
    (`SFTBatches.widths`). Measured at the default scale on a 2-core AVX2 EPYC, a step's time grows a little
    faster than its width (0.165 s at a mean width of 142, 0.337 s at 245, AdamW) and the pretraining probe's
    step (Muon, +10 %) is 0.41 s at 256, so the estimate errs on the short side."""
    per_token = max(step_seconds, 1e-6) / seq_len
    spent, steps = 0.0, 0
    for w in batches.widths(int(seconds / per_token) + 1):
        spent += per_token * min(w, seq_len)
        if spent > seconds:
            break
        steps += 1
    return steps


def sft_learning_rate(sc: Any, batch: int) -> float:
    """The SFT peak learning rate for the (pretraining) batch the plan chose: the scale's `sft_lr` at its own batch
    size, times sqrt(batch / batch_size) for another batch (square-root scaling, as for Adam-style optimizers;
    SFT's batch holds the same tokens, `sft_shape`). Measured on an AVX2 EPYC with 256-token windows, SFT from the
    same pretrained models (bits/char drift after SFT, sentiment accuracy): batch 16 (461 steps): lr 1e-3
    +0.063 / 68.2 %, 7.07e-4 +0.028 / 68.2 %, 5e-4 +0.007 / 67.0 %;
    batch 8 (735 steps): lr 1e-3 +0.146 / 66.5 %, 7.07e-4 +0.087 / 66.5 %, 5e-4 +0.043 / 67.2 %; more replay
    instead (40 % of the rows, lr 1e-3) +0.016 but 59.8 % (BENCHMARKS.md, main job)."""
    if batch <= 0:
        raise ValueError(f"batch={batch} must be positive")
    return sc.sft_lr * math.sqrt(batch / sc.batch_size)


def sft_shape(sc: Any, plan: dict[str, Any]) -> tuple[int, int]:
    """(rows per batch, tokens per row) for SFT and the title tagger: rows up to `sc.sft_seq_len` tokens (default
    `seq_len`), as many as make the plan's pretraining batch of tokens."""
    width = sc.sft_width
    return max(1, plan.get("batch_size", sc.batch_size) * sc.seq_len // width), width
