"""The training loop's strategy for expert parallel: `tinyllm pretrain|sft --ep N` under torchrun on N ranks.

Each rank takes its rows of the global micro-batch (data parallel), routes its own tokens and sends them to
the experts' owners (expert.py); after the last micro-batch the replicated parameters' gradients are averaged
over the ranks and the experts' are divided by N (`expert.sync_grads`), then clipped to the global norm.
Routing, Switch capacity and the auxiliary losses act on each rank's micro-batch, so a run on N ranks with
global micro-batch B equals one process with micro-batch B/N and N× the accumulation steps (tested).
Checkpoints: the experts are collected from every rank and rank 0 writes the full HF directory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel.strategy import Strategy, _copy_with


class ExpertParallelStrategy(Strategy):
    name = "ep"

    def __init__(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], opt_args: dict[str, Any]) -> None:
        super().__init__(module, params, opt_args)
        from tinyllm.train.parallel.expert import expert_parallel

        expert_parallel(module, None)
        local = {id(p) for p in module.parameters()}
        self.params = [(n, p) for n, p in params if id(p) in local]  # other ranks' experts left this one
        self.optimizer = build_optimizer(self.params, **opt_args)

    def clip_grad_norm(self, max_norm: float) -> float:
        from tinyllm.train.parallel.expert import clip_grad_norm_, sync_grads

        sync_grads(self.module, None)
        return float(clip_grad_norm_(self.module, max_norm, None))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from tinyllm.train.parallel.expert import gather_expert_state_dict

        return gather_expert_state_dict(self.module, None)

    def full_model(self) -> nn.Module | None:
        state = self.full_state_dict()  # a collective: every rank contributes its experts
        return _copy_with(self.module, state) if dist.get_rank() == 0 else None
