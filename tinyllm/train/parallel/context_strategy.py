"""The training loop's strategy for context parallel: `tinyllm pretrain|sft --cp C [--parallel dp]` under torchrun.

The N ranks form a grid dp × cp (`init_device_mesh`, cp the inner axis). Every rank of a context-parallel group
holds the whole model and the same rows of each global micro-batch (its data-parallel slice), and keeps its
chunks of the sequence (`--cp-layout`): zigzag (default) — rank r of C takes chunks r and 2C−1−r of 2C, so every
rank does the same attention work under the causal mask — or contiguous — tokens [r·T/C, (r+1)·T/C), the last
rank doing C times the first one's work. A batch whose T does not divide into the chunks is padded at the end
with ignored labels, which the causal mask keeps from touching earlier tokens. Every attention layer becomes a
ring (`context.context_parallel`), and the model runs at the tokens' global positions (RoPE at those positions),
so each rank's hidden states are exactly the full-sequence model's on its tokens.

The task's loss is the mean over the chunk's labelled tokens; each rank weights it by w = n_rank / n (its share
of the *global* micro-batch's labelled tokens, counted locally — every rank reads the whole global batch before
keeping its rows), so Σ_ranks w·loss is the mean over all tokens of the micro-batch and the gradients summed over
the world are the single process's — exactly, even when SFT masks leave the chunks and the data-parallel slices
unequal counts (plain data parallel averages per-rank means there). After the last micro-batch one all-reduce
sums the gradients over the world, then clipping runs on the replicated gradients. The loss and token count
reported are summed over the world. Checkpoints are the (replicated) full model, written by rank 0 as a fresh plain
module: the ring is a property of the run, not of the weights. The optimizer is replicated too, so its state
goes into the checkpoint and `--resume` continues a `--cp` run exactly.

`--cp C --tp T`: the mesh becomes dp × cp × tp (tp innermost); the model is first split by tensor parallel over
each TP group (`tensor.tensor_parallel`), then its attention becomes the ring over the cp group — the ring
passes the local heads' K/V only. Losses and gradients are summed over the ranks holding the same TP shard, and
clipping takes the norm over the shards; checkpoints gather the TP shards and their optimizer moments
(`strategy.ModelParallelResume`), so `--resume` works under cp × tp as under any other layout.

With `--sp` the norms and residuals of a ring position run on a 1/T slice of its chunk (sequence.py): the
column-parallel projections gather the chunk back before attention, so the ring itself is unchanged; the chunk
length must divide by T.

Not covered: padding masks, sliding windows and ALiBi in the ring, pipeline parallel beside it, torch.compile.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.losses import IGNORE_INDEX
from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel import dist as tdist
from tinyllm.train.parallel.context import chunk_ids, context_parallel, local_positions
from tinyllm.train.parallel.layout import adamw_order
from tinyllm.train.parallel.strategy import (
    ModelParallelResume,
    Strategy,
    _copy_with,
    _slice_rows,
    input_ids_of,
)


def labels_of(batch: Any) -> torch.Tensor | None:
    """The labels of a task's batch: the second of an (input_ids, labels) tuple or "labels" (None: all count)."""
    if isinstance(batch, dict):
        return batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def global_label_count(batch: Any) -> int:
    """The labelled tokens of a whole (global) micro-batch: the denominator of every rank's loss weight."""
    labels = labels_of(batch)
    return int((labels != IGNORE_INDEX).sum()) if labels is not None else input_ids_of(batch).numel()


def cut_chunk(batch: Any, cp_rank: int, cp: int, layout: str) -> tuple[Any, int, torch.Tensor]:
    """(rank `cp_rank`'s tokens of `batch` in `layout`, its labelled tokens, their global positions).

    A sequence that does not divide into the chunks is padded at the end (ignored labels, token 0). A chunk
    without a labelled token still runs — the ring is collective — with one stand-in label, so its mean loss is
    finite; its count 0 gives it weight 0."""
    ids = input_ids_of(batch)
    if ids.dim() != 2:
        raise ValueError(f"context parallel splits [B, T] token ids, got shape {tuple(ids.shape)}")
    b, t = ids.shape
    chunks = cp * len(chunk_ids(0, 1, layout))
    padded = -(-t // chunks) * chunks
    idx = local_positions(padded, cp_rank, cp, layout)
    labels = labels_of(batch)

    def cut(x: Any, fill: int) -> Any:
        if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[:2] == (b, t)):
            return x
        if padded != t:
            pad = x.new_full((b, padded - t, *x.shape[2:]), fill)
            x = torch.cat([x, pad], dim=1)
        return x[:, idx.to(x.device)]

    if isinstance(batch, dict):
        out: Any = {k: cut(v, IGNORE_INDEX if k == "labels" else 0) for k, v in batch.items()}
    elif isinstance(batch, (tuple, list)):
        out = type(batch)(cut(v, IGNORE_INDEX if j == 1 else 0) for j, v in enumerate(batch))
    else:
        out = cut(batch, 0)
    if labels is None:
        return out, b * int((idx < t).sum()), idx
    mine = labels_of(out)
    count = int((mine != IGNORE_INDEX).sum())
    if count == 0:
        mine[0, 0] = 0
    return out, count, idx


class _ChunkPositions(nn.Module):
    """Runs the model on a rank's tokens at their global positions (`positions`, set per batch)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module  # `module`: train.losses.model_lm_loss finds the CausalLM (and its head) through it
        self.positions: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        if positions is None and self.positions is not None:
            positions = self.positions.to(input_ids.device).expand(input_ids.shape[0], -1)
        return self.module(input_ids, positions, *args, **kwargs)


class ContextParallelStrategy(ModelParallelResume, Strategy):
    name = "cp"

    def __init__(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], opt_args: dict[str, Any],
                 cp: int, layout: str = "zigzag", tp: int = 1, sp: bool = False) -> None:
        super().__init__(module, params, opt_args)
        if not hasattr(module, "config") or not hasattr(getattr(module, "model", None), "layers"):
            raise ValueError(f"context parallel rewires the attention of a tinyllm CausalLM, not a "
                             f"{type(module).__name__}")
        if getattr(module.config, "num_local_experts", 0):
            raise ValueError("context parallel with an MoE model: the router's auxiliary losses are not additive "
                             "over sequence chunks (train MoE with --ep or --parallel dp)")
        world = dist.get_world_size()
        self._full_order = adamw_order(params)  # the single-process AdamW's indices, for checkpoints
        self.dp, self.cp, self.tp = world // (cp * tp), cp, tp
        self.cp_group = self.dp_group = self.tp_group = self.replicas = None
        if world > cp:
            from torch.distributed.device_mesh import init_device_mesh

            # tp innermost (a TP group is tp consecutive ranks: one node), then the ring, then data parallel
            mesh = init_device_mesh(self._comm_device().type, (self.dp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))
            self.cp_group, self.dp_group = mesh.get_group("cp"), mesh.get_group("dp")
            if tp > 1:
                self.tp_group = mesh.get_group("tp")
                # the ranks holding the same tensor-parallel shard (every dp and cp index): gradients and losses
                # are summed over them; every rank creates every such group, in the same order
                for t in range(tp):
                    g = dist.new_group(list(range(t, world, tp)))
                    if self.rank % tp == t:
                        self.replicas = g
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        self._tp_state_group = self.tp_group
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else self.rank
        self.world = 1  # the loop counts tokens × world: forward_backward already sums them over every rank
        self.layout = layout
        self.segments = len(chunk_ids(0, 1, layout))  # chunks per rank (validates the layout)
        if tp > 1:
            from tinyllm.train.parallel.tensor import tensor_parallel

            if any(not p.requires_grad for p in module.parameters()):
                raise ValueError("tensor parallel trains every parameter: the task freezes some (use --parallel dp)")
            tensor_parallel(module, self.tp_group, sequence_parallel=sp)
            self.params = params = list(module.named_parameters())  # the shards replaced the full parameters
            self.name = "cp×tp" + ("+sp" if sp else "")
        context_parallel(module, self.cp_group, layout)
        self.model = _ChunkPositions(module)
        self.optimizer = build_optimizer(params, **opt_args)
        self._global_counts: list[int] = []

    def local_batch(self, batch: Any) -> Any:
        # the global micro-batch's labelled tokens: each rank's weight is its share of them (exact for SFT too)
        self._global_counts.append(global_label_count(batch))
        return _slice_rows(batch, self.dp_rank, self.dp)

    def chunk(self, batch: Any) -> tuple[Any, int]:
        """(this rank's tokens of `batch`, its labelled tokens); sets their positions."""
        out, count, self.model.positions = cut_chunk(batch, self.cp_rank, self.cp, self.layout)
        return out, count

    def _sum(self, values: list[float], group: Any) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        with tdist.collective_guard("context-parallel loss all-reduce"):
            dist.all_reduce(t, group=group)
        return t.tolist()

    def forward_backward(self, task: Any, batches: list[Any], autocast: Any) -> tuple[float, int, dict]:
        """Each micro-batch's chunk forward and backward, its loss weighted by the chunk's share of the global
        micro-batch's labelled tokens; returns (Σ micro-batch losses, tokens, task metrics) of the whole run."""
        k = len(batches)
        counts, self._global_counts = self._global_counts[-k:], []
        total, tokens, metrics = 0.0, 0, {}
        for batch, everyone in zip(batches, counts, strict=True):
            part, mine = self.chunk(batch)
            w = mine / max(everyone, 1)
            with autocast:
                loss, metrics = task.loss(self.model, part)
            (loss * (w / k)).backward()
            total += loss.item() * w if mine else 0.0
            tokens += int(metrics.get("tokens", input_ids_of(part).numel())) if mine else 0
        total, tok = self._sum([total, tokens], self.replicas)  # tensor-parallel ranks computed the same
        return total, int(tok), metrics

    @torch.no_grad()
    def eval_loss(self, task: Any, batch: Any, autocast: Any) -> float:
        """The whole eval batch on every data-parallel replica, its sequence split over the ring."""
        everyone = global_label_count(batch)
        part, mine = self.chunk(batch)
        with autocast:
            loss, _ = task.loss(self.model, part)
        return self._sum([loss.item() * mine / max(everyone, 1) if mine else 0.0], self.cp_group)[0]

    def clip_grad_norm(self, max_norm: float) -> float:
        with tdist.collective_guard("context-parallel gradient all-reduce"):
            for p in dict.fromkeys(p for _, p in self.params):
                if p.grad is not None:  # the weights already make the sum over the replicas the global mean
                    dist.all_reduce(p.grad, group=self.replicas)
        if self.tp > 1:
            from tinyllm.train.parallel.tensor import clip_grad_norm_

            return float(clip_grad_norm_([p for _, p in self.params], max_norm, self.tp_group))
        return float(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], max_norm))

    def mean(self, x: float) -> float:
        return x  # forward_backward summed the weighted losses over every rank

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.tp == 1:
            return super().full_state_dict()
        from tinyllm.train.parallel.layout import gather_full_state_dict

        return {k: v.cpu() for k, v in gather_full_state_dict(self.module, self.tp_group).items()}

    def full_model(self) -> nn.Module | None:
        state = self.full_state_dict()  # with --tp a collective over the TP group: every rank takes part
        return _copy_with(self.module, state) if self.rank == 0 else None
