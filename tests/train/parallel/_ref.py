"""Shared pieces of the data-parallel equality tests: a tiny float64 decoder, a fixed global batch stream,
the single-process reference run, and a per-rank run driven by a strategy object.

A strategy run on N ranks uses the same global micro-batches as the reference; rank r takes rows
[r·b, (r+1)·b) of each. Everything returned is CPU float64 so the parent compares ranks to the reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tinyllm.model.config import preset
from tinyllm.model.hf import build_model
from tinyllm.train.optim import build_optimizer

VOCAB, SEQ = 64, 16
LR, WD, BETAS, CLIP = 3e-2, 0.1, (0.9, 0.95), 0.5


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    cfg = preset("tiny", **{**sizes, **over})  # any size may be overridden (model-parallel tests vary heads)
    return build_model(cfg).to(dtype)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain float64 cross entropy (the package's fused losses accumulate in fp32 on purpose)."""
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def global_batches(steps: int, accum: int, global_bs: int, seed: int = 1,
                   learnable: bool = False) -> list[list[tuple]]:
    """Random token rows, or (learnable) arithmetic progressions mod VOCAB a model learns within 20 steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            if learnable:
                start = torch.randint(0, VOCAB, (global_bs, 1), generator=g)
                stride = torch.randint(1, 4, (global_bs, 1), generator=g)
                ids = (start + stride * torch.arange(SEQ + 1)) % VOCAB
            else:
                ids = torch.randint(0, VOCAB, (global_bs, SEQ + 1), generator=g)
            micro.append((ids[:, :-1], ids[:, 1:]))
        out.append(micro)
    return out


def reference(steps: int = 3, accum: int = 2, global_bs: int = 4, clip: float = CLIP, **model_over) -> dict:
    """Single process on the global batch: per-step losses, the first step's gradients, final parameters."""
    model = tiny_model(**model_over)
    opt = build_optimizer(list(model.named_parameters()), LR, WD, BETAS)
    losses, grads0 = [], None
    for s, micro in enumerate(global_batches(steps, accum, global_bs)):
        total = 0.0
        for x, y in micro:
            loss = lm_loss(model, x, y)
            (loss / accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if s == 0:
            grads0 = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / accum)
    return {"losses": losses, "grads0": grads0, "params": {k: v.detach().clone()
                                                           for k, v in model.state_dict().items()}}


def local_rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    b = t.shape[0] // world
    return t[rank * b:(rank + 1) * b]


def mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def assert_close_dicts(got: dict, want: dict, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
