"""The training loop's strategy for expert parallel: `tinyllm pretrain|sft --ep N` under torchrun on N ranks.

Each rank takes its rows of the global micro-batch (data parallel), routes its own tokens and sends them to
the experts' owners (expert.py); after the last micro-batch the replicated parameters' gradients are averaged
over the ranks and the experts' are divided by N (`expert.sync_grads`), then clipped to the global norm.
Routing, Switch capacity and the auxiliary losses act on each rank's micro-batch, so a run on N ranks with
global micro-batch B equals one process with micro-batch B/N and N× the accumulation steps (tested).
Checkpoints: the experts are collected from every rank and rank 0 writes the full HF directory.

With `--ep E` below the world size N the ranks form a dp × ep grid (ep innermost): each group of E consecutive
ranks splits the experts, the N/E groups replicate them; replicated parameters are averaged over all N ranks and
an expert's gradient (already the sum over its ep group's tokens) is summed over its replicas, then divided by N.

`--ep E --tp T` (EP × TP): the ranks form a dp × ep × tp grid (tp innermost). Attention, embeddings and the head
are Megatron shards over each TP group (`tensor.tensor_parallel(replicate_moe=True)`); the MoE layers stay whole
there, and their experts are spread over the ep group of each TP index. The T ranks of a TP group read the same
rows (the data ranks are the dp × ep grid) and hold the same residual stream, so they route the same tokens and
their experts get the same gradients. Gradients are synced as above over ep and dp, clipping adds the TP shards'
squares over the TP group and the experts' over the ep group, and checkpoints gather the TP shards, then the
experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel import dist as tdist
from tinyllm.train.parallel.layout import adamw_order
from tinyllm.train.parallel.strategy import ModelParallelResume, Strategy, _copy_with, _slice_rows


class ExpertParallelStrategy(ModelParallelResume, Strategy):
    name = "ep"

    def __init__(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], opt_args: dict[str, Any],
                 ep: int | None = None, tp: int = 1) -> None:
        super().__init__(module, params, opt_args)
        from tinyllm.train.parallel.expert import expert_parallel

        world = dist.get_world_size()
        self._full_order = adamw_order(params)  # the single-process AdamW's indices, for checkpoints
        self.tp = tp
        ep = ep or world // tp
        self.ep_group = self.replicas = self.tp_group = None  # None: the one ep group is the world
        if ep * tp < world or tp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            # tp innermost, then ep: an expert group is ep ranks of one TP index; `replicas` joins the ranks
            # holding the same experts (one per ep group)
            dp = world // (ep * tp)
            mesh = init_device_mesh(self._comm_device().type, (dp, ep, tp), mesh_dim_names=("dp", "ep", "tp"))
            self.ep_group = mesh.get_group("ep")
            self.replicas = mesh.get_group("dp") if dp > 1 else None
            self.tp_group = mesh.get_group("tp") if tp > 1 else None
        if tp > 1:
            from tinyllm.train.parallel.tensor import tensor_parallel

            if any(not p.requires_grad for p in module.parameters()):
                raise ValueError("tensor parallel trains every parameter: the task freezes some (use --parallel dp)")
            tensor_parallel(module, self.tp_group, replicate_moe=True)
            params = list(module.named_parameters())  # the shards replaced the full parameters
            self.name = "ep×tp"
        self.world = world // tp  # data ranks: the TP ranks of a group share their rows
        self.data_rank = self.rank // tp
        expert_parallel(module, self.ep_group)
        local = {id(p) for p in module.parameters()}
        self.params = [(n, p) for n, p in params if id(p) in local]  # other ranks' experts left this one
        self.optimizer = build_optimizer(self.params, **opt_args)
        self._merge_state, self._merge_state_group = True, self.ep_group  # each rank adds its experts' states
        self._tp_state_group = self.tp_group

    def local_batch(self, batch: Any) -> Any:
        return _slice_rows(batch, self.data_rank, self.world)

    def mean(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self._comm_device())
        with tdist.collective_guard("loss all-reduce"):
            dist.all_reduce(t)
        return t.item() / dist.get_world_size()  # every TP rank holds its data rank's value once more

    def clip_grad_norm(self, max_norm: float) -> float:
        from tinyllm.train.parallel.expert import clip_grad_norm_, sync_grads

        sync_grads(self.module, self.ep_group, self.replicas)
        return float(clip_grad_norm_(self.module, max_norm, self.ep_group, self.tp_group))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from tinyllm.train.parallel.expert import gather_expert_state_dict

        if self.tp == 1:
            return gather_expert_state_dict(self.module, self.ep_group)
        from tinyllm.train.parallel.layout import gather_full_state_dict

        return gather_expert_state_dict(gather_full_state_dict(self.module, self.tp_group), self.ep_group)

    def full_model(self) -> nn.Module | None:
        state = self.full_state_dict()  # a collective: every rank contributes its experts
        return _copy_with(self.module, state) if dist.get_rank() == 0 else None
