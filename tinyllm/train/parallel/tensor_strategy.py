"""The training loop's strategy for tensor parallel (with sequence parallel, and data parallel around it).

`tinyllm pretrain|sft --tp T [--sp] [--parallel dp]` under torchrun: the N ranks form a grid dp × tp
(`init_device_mesh`, tp the inner axis, so a TP group is T consecutive ranks — one node on a GPU cluster). The
model is sharded in place by `tensor.tensor_parallel` over its TP group; every rank of a TP group sees the same
rows of the global micro-batch (its data-parallel slice); after the last micro-batch the gradients are averaged
over the DP group by a plain all-reduce, then clipped to the global norm over the TP shards. Checkpoints are
the full model, gathered over the TP group and written by rank 0, so they load anywhere.

`--parallel zero1|zero2|zero3` with `--tp` puts our ZeRO (zero.py) over the data-parallel group in place of the
plain all-reduce: each TP rank's shards are ZeRO-sharded again over its dp peers, and the gradient norm sums
over both (TP-sharded elements fully, replicated ones once).

`--resume` (`strategy.ModelParallelResume`): checkpoints carry the single-process AdamW state, the TP shards'
moments gathered by parameter name, so a run resumes under any tp, with or without ZeRO, or under plain dp.

The loss the task computes runs on full logits (the model's forward all-gathers the vocabulary slices); use
`tensor.tp_lm_loss` in your own loop to keep the logits split.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel import dist as tdist
from tinyllm.train.parallel.context import all_reduce_grads
from tinyllm.train.parallel.layout import adamw_order
from tinyllm.train.parallel.strategy import ModelParallelResume, Strategy, _copy_with, _slice_rows


class TensorParallelStrategy(ModelParallelResume, Strategy):
    name = "tp"

    def __init__(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], opt_args: dict[str, Any],
                 tp: int, sequence_parallel: bool = False, zero_stage: int = 0) -> None:
        super().__init__(module, params, opt_args)
        from tinyllm.train.parallel.tensor import tensor_parallel

        if any(not p.requires_grad for p in module.parameters()):
            raise ValueError("tensor parallel trains every parameter: the task freezes some (use --parallel dp)")
        world = dist.get_world_size()
        self._full_order = adamw_order(params)  # the single-process AdamW's indices, for checkpoints
        self.dp = world // tp
        self.tp_group = self.dp_group = None
        if self.dp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self._comm_device().type, (self.dp, tp), mesh_dim_names=("dp", "tp"))
            self.tp_group, self.dp_group = mesh.get_group("tp"), mesh.get_group("dp")
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        self._tp_state_group = self.tp_group
        self.world = self.dp  # the loop counts tokens × world: TP ranks share their rows
        tensor_parallel(module, self.tp_group, sequence_parallel)
        self.params = list(module.named_parameters())  # the shards replaced the full parameters
        self.zero_stage = zero_stage
        if zero_stage:
            from tinyllm.train.parallel.zero import ZeRO

            if self.dp_group is None:
                raise ValueError(f"--parallel zero{zero_stage} with --tp {tp} on {world} ranks: ZeRO shards over "
                                 "the data-parallel ranks and there is only one (use more ranks or --parallel dp)")
            if opt_args.get("kind", "adamw") != "adamw":
                raise ValueError(f"optimizer={opt_args['kind']!r} with parallel=zero{zero_stage}: our ZeRO shards "
                                 "AdamW only")
            self.name = f"zero{zero_stage}×tp"
            self.optimizer = ZeRO(module, zero_stage, lr=opt_args["lr"], weight_decay=opt_args["weight_decay"],
                                  betas=opt_args["betas"], named_params=self.params, group=self.dp_group,
                                  norm_group=self.tp_group)
        else:
            self.optimizer = build_optimizer(self.params, **opt_args)

    def local_batch(self, batch: Any) -> Any:
        return _slice_rows(batch, self.dp_rank, self.dp)

    def micro(self, i: int, k: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        from tinyllm.train.parallel.tensor import clip_grad_norm_

        if self.zero_stage:  # ZeRO reduce-scatters over dp; its norm also sums the TP shards
            return self.optimizer.clip_grad_norm_(max_norm)
        if self.dp_group is not None:
            all_reduce_grads([p for _, p in self.params], self.dp_group, average=True)
        return float(clip_grad_norm_([p for _, p in self.params], max_norm, self.tp_group))

    def mean(self, x: float) -> float:
        if self.dp_group is None:
            return x  # every rank of the one TP group computed the same loss
        t = torch.tensor([x], dtype=torch.float64, device=self._comm_device())
        with tdist.collective_guard("loss all-reduce"):
            dist.all_reduce(t, group=self.dp_group)
        return t.item() / self.dp

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from tinyllm.train.parallel.layout import gather_full_state_dict

        gathered = self.optimizer.gathered() if self.zero_stage else contextlib.nullcontext(self.module)
        with gathered as module:  # ZeRO-3: the units' TP shards back first, then the TP gather
            return {k: v.cpu() for k, v in gather_full_state_dict(module, self.tp_group).items()}

    def full_model(self) -> nn.Module | None:
        state = self.full_state_dict()  # a collective over the TP group: every rank takes part
        return _copy_with(self.module, state) if self.rank == 0 else None
