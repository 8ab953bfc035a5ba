"""Expert parallel for MoE (notes ch.04 专家并行, ch.02.16–18; Lepikhin et al. 2020 "GShard", Fedus et al. 2021
"Switch Transformers"): the E experts of every MoE layer are spread over the ep ranks (rank r owns experts
[r·E/ep, (r+1)·E/ep)), everything else — attention, router, shared experts — is replicated and trained data
parallel over the same ranks. Each rank routes *its own* tokens, then

    dispatch  all-to-all: every token copy goes to the rank that owns its chosen expert (k copies for top-k)
    compute   each rank runs its experts on what it received
    combine   all-to-all back along the same routes; y_t = Σ_k gate_tk · E_{e_tk}(x_t) (+ shared experts)

Routing, capacity (Switch drops a token past ⌈tokens/experts · factor⌉, counted over the rank's own tokens) and
the auxiliary losses are computed by moe.py's own code on the rank's tokens, so an expert-parallel layer is
exactly the single-process `MoE` applied to that rank's batch (tested), and ep ranks with b rows each train
like one process accumulating gradients over ep micro-batches of b rows.

Where a backend lacks all-to-all (`supports_all_to_all` probes once per group), the all-gather fallback runs:
every rank gathers all ranks' tokens and choices, computes its experts' outputs for every (token, choice),
and a reduce-scatter returns to each rank the sum for its own tokens — the same result with ep× the traffic.

    expert_parallel(model, group, dispatch="auto"|"all_to_all"|"all_gather")   in place on a tinyllm CausalLM
    sync_grads(model, group, expert_dp_group)   data-parallel mean of every gradient (after backward); with
                               expert_dp_group the ep groups are themselves replicated (EP × DP on ep·dp ranks)

With tensor parallel beside it (EP × TP, expert_strategy.py) the experts stay whole on the TP ranks of an ep
group and attention is split over them. Not covered: tensor parallel inside an expert, capacity counted over the global batch, token
dropping/padding to fixed all-to-all sizes (ours sends variable counts), hierarchical all-to-all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.model.moe import MoE
from tinyllm.train.parallel.dist import collective_guard
from tinyllm.train.parallel.sequence import gather_sequence, reduce_scatter_to_sequence

DISPATCH = ("auto", "all_to_all", "all_gather")
_A2A_SUPPORT: dict[str, bool] = {}


def supports_all_to_all(group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> bool:
    """Whether the group's backend implements all_to_all_single (probed once per backend with 1 number each)."""
    backend = str(dist.get_backend(group))
    if backend not in _A2A_SUPPORT:
        n = dist.get_world_size(group)
        try:
            dist.all_to_all_single(torch.zeros(n, device=device), torch.ones(n, device=device), group=group)
            _A2A_SUPPORT[backend] = True
        except (RuntimeError, NotImplementedError):  # e.g. "ProcessGroupGloo does not support alltoall"
            _A2A_SUPPORT[backend] = False
    return _A2A_SUPPORT[backend]


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send), ...] scattered by `send` counts, gathered by `recv` counts; backward swaps them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        with collective_guard("expert-parallel all-to-all"):
            dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _AllToAll.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    recv = torch.empty_like(send)
    with collective_guard("expert-parallel count exchange"):
        dist.all_to_all_single(recv, send, group=group)
    return recv


class ExpertParallelMoE(nn.Module):
    """An MoE layer whose experts live on different ranks; same parameter names as `MoE` (global expert ids)."""

    def __init__(self, moe: MoE, group, dispatch: str = "auto") -> None:
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch={dispatch!r} is not one of {list(DISPATCH)}")
        world, r = dist.get_world_size(group), dist.get_rank(group)
        if moe.num_experts % world:
            raise ValueError(f"num_local_experts={moe.num_experts} does not divide by ep={world}")
        self.group, self.world, self.rank = group, world, r
        self.num_experts, self.lb_coef, self.z_coef = moe.num_experts, moe.lb_coef, moe.z_coef
        self.per_rank = moe.num_experts // world
        self.first = r * self.per_rank
        self.gate = moe.gate
        self.experts = nn.ModuleDict({str(j): moe.experts[j] for j in range(self.first, self.first + self.per_rank)})
        for p in self.experts.parameters():
            p._expert_parallel = True  # type: ignore[attr-defined]
        self.shared_experts = moe.shared_experts
        if dispatch == "auto":
            dispatch = "all_to_all" if supports_all_to_all(group, moe.gate.weight.device) else "all_gather"
        self.dispatch = dispatch
        self.aux_loss = self.router_logits = self.routing = None

    _route = MoE._route  # routing, capacity and aux losses: moe.py's code on this rank's tokens
    _shared = MoE._shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # [N, d]
        r = self._route(flat)
        chosen = torch.where(r.keep, r.experts, -1)  # [N, k]; dropped choices go nowhere
        weights = r.weights.to(x.dtype)
        if self.dispatch == "all_to_all":
            y = self._all_to_all(flat, chosen, weights)
        else:
            y = self._all_gather(flat, chosen, weights)
        return self._shared(flat, y).view(b, t, d)

    def _run_local(self, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(rows)
        for j, expert in self.experts.items():
            idx = torch.where(expert_ids == int(j))[0]
            if idx.numel():
                out = out.index_copy(0, idx, expert(rows[idx]))
        return out

    def _all_to_all(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tok, slot = torch.where(chosen >= 0)
        e = chosen[tok, slot]
        order = torch.argsort(e, stable=True)  # grouped by expert, hence by owning rank
        tok, slot, e = tok[order], slot[order], e[order]
        send = torch.bincount(e // self.per_rank, minlength=self.world)
        recv = _exchange_counts(send, self.group)
        send_l, recv_l = send.tolist(), recv.tolist()
        x_in = _AllToAll.apply(flat[tok], send_l, recv_l, self.group)  # [Σ recv, d]
        e_in = e.new_empty(sum(recv_l))
        with collective_guard("expert-parallel expert ids"):
            dist.all_to_all_single(e_in, e, recv_l, send_l, group=self.group)
        out = _AllToAll.apply(self._run_local(x_in, e_in), recv_l, send_l, self.group)  # back home
        return torch.zeros_like(flat).index_add(0, tok, out * weights[tok, slot, None])

    def _all_gather(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = chosen.shape
        every = [torch.empty_like(chosen) for _ in range(self.world)]
        with collective_guard("expert-parallel choices all-gather"):
            dist.all_gather(every, chosen.contiguous(), group=self.group)
        chosen_all = torch.cat(every)  # [W·N, k]
        x_all = gather_sequence(flat[None], self.group)[0]  # [W·N, d]; backward: reduce-scatter
        per_choice = torch.zeros(chosen_all.shape[0], k, flat.shape[1], dtype=flat.dtype, device=flat.device)
        for s in range(k):
            per_choice = per_choice.index_copy(1, torch.tensor([s], device=flat.device),
                                               self._run_local(x_all, chosen_all[:, s])[:, None])
        mine = reduce_scatter_to_sequence(per_choice.reshape(1, -1, k * flat.shape[1]), self.group)[0]
        mine = mine.view(n, k, -1)  # each (token, choice) was computed on exactly one rank
        return (mine * weights[:, :, None]).sum(1)


def expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, dispatch: str = "auto") -> nn.Module:
    """Spread every MoE layer's experts over `group` (in place); the model must be built identically on all ranks."""
    layers = [layer for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    if not layers:
        raise ValueError("expert_parallel: the model has no MoE layer (num_local_experts=0)")
    for layer in layers:
        layer.mlp = ExpertParallelMoE(layer.mlp, group, dispatch)
    model.ep_group = group
    return model


def is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "_expert_parallel", False)


def sync_grads(model: nn.Module, group: dist.ProcessGroup | None = None,
               expert_dp_group: dist.ProcessGroup | None = None) -> None:
    """After backward of each rank's mean loss, make every gradient the data-parallel mean.

    Every rank holds different data. Replicated parameters are averaged over all data ranks: the ep group,
    and, when the ep groups are replicated (`expert_dp_group`: the ranks that hold the same experts, one per
    ep group), over those too. An expert's gradient already sums the tokens of its whole ep group, so it is
    only summed over its replicas; both are then divided by the number of data ranks."""
    n = dist.get_world_size(group) * (dist.get_world_size(expert_dp_group) if expert_dp_group is not None else 1)
    with collective_guard("expert-parallel gradient all-reduce"):
        for p in dict.fromkeys(model.parameters()):
            if p.grad is None:
                continue
            if not is_expert(p):
                dist.all_reduce(p.grad, group=group)
            if expert_dp_group is not None:
                dist.all_reduce(p.grad, group=expert_dp_group)
            p.grad /= n


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None,
                    tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global norm: the experts' squares summed over the group, tensor-parallel shards' over `tp_group` (EP × TP),
    the replicated parameters' counted once."""
    from tinyllm.train.parallel.tensor import is_sharded

    params = [p for p in dict.fromkeys(model.parameters()) if p.grad is not None]
    # each parameter's squares are summed over the group that splits it: experts over `group`, TP shards over
    # `tp_group`, replicated parameters nowhere (every rank holds them whole)
    parts: dict[str, list[nn.Parameter]] = {"expert": [], "tp": [], "whole": []}
    for p in params:
        parts["expert" if is_expert(p) else "tp" if tp_group is not None and is_sharded(p) else "whole"].append(p)
    zero = torch.zeros((), dtype=torch.float64, device=params[0].grad.device if params else None)
    squares = {k: sum((p.grad.double().pow(2).sum() for p in ps), zero) for k, ps in parts.items()}
    with collective_guard("expert-parallel gradient norm"):
        dist.all_reduce(squares["expert"], group=group)
    if tp_group is not None:
        with collective_guard("tensor-parallel gradient norm"):
            dist.all_reduce(squares["tp"], group=tp_group)
    sq = squares["expert"] + squares["tp"] + squares["whole"]
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


def gather_expert_state_dict(model: nn.Module | dict[str, torch.Tensor],
                             group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """The full state dict (every expert) of an expert_parallel model, or of this rank's state dict (e.g. its TP
    shards already gathered), on every rank (a collective)."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, {k: v.detach().cpu() for k, v in sd.items()}, group=group)
    full: dict[str, torch.Tensor] = {}
    for sd in every:
        for k, v in sd.items():
            full.setdefault(k, v)
    return full
