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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel.layout import adamw_order
from tinyllm.train.parallel.strategy import ModelParallelResume, Strategy, _copy_with


class ExpertParallelStrategy(ModelParallelResume, Strategy):
    name = "ep"

    def __init__(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], opt_args: dict[str, Any],
                 ep: int | None = None) -> None:
        super().__init__(module, params, opt_args)
        from tinyllm.train.parallel.expert import expert_parallel

        world = dist.get_world_size()
        self._full_order = adamw_order(params)  # the single-process AdamW's indices, for checkpoints
        ep = ep or world
        self.ep_group = self.replicas = None  # None: the one ep group is the world
        if ep < world:
            from torch.distributed.device_mesh import init_device_mesh

            # ep innermost: an expert group is ep consecutive ranks; `replicas` joins the ranks holding the
            # same experts (one per ep group)
            mesh = init_device_mesh(self._comm_device().type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
            self.ep_group, self.replicas = mesh.get_group("ep"), mesh.get_group("dp")
        expert_parallel(module, self.ep_group)
        local = {id(p) for p in module.parameters()}
        self.params = [(n, p) for n, p in params if id(p) in local]  # other ranks' experts left this one
        self.optimizer = build_optimizer(self.params, **opt_args)
        self._merge_state, self._merge_state_group = True, self.ep_group  # each rank adds its experts' states

    def clip_grad_norm(self, max_norm: float) -> float:
        from tinyllm.train.parallel.expert import clip_grad_norm_, sync_grads

        sync_grads(self.module, self.ep_group, self.replicas)
        return float(clip_grad_norm_(self.module, max_norm, self.ep_group))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from tinyllm.train.parallel.expert import gather_expert_state_dict

        return gather_expert_state_dict(self.module, self.ep_group)

    def full_model(self) -> nn.Module | None:
        state = self.full_state_dict()  # a collective: every rank contributes its experts
        return _copy_with(self.module, state) if dist.get_rank() == 0 else None
