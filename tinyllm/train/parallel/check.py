"""`tinyllm parallel check`: run a model-parallel strategy under torchrun and show it trains exactly like one process.

    torchrun --nproc_per_node 2 -m tinyllm parallel check --strategy tp
    torchrun --nproc_per_node 2 -m tinyllm parallel check --strategy pp-1f1b --micro-batches 4

Every rank builds the same tiny float64 decoder (a MoE one for `ep`), trains `steps` AdamW steps with gradient
clipping under the strategy, gathers the full parameters, and compares them and the losses with a
single-process run of the same global batches that each rank also computes. Rank 0 prints one JSON line per
step and a verdict; the exit code is 0 when everything agrees to `rtol`. On CUDA the same command runs on NCCL.

`tinyllm parallel schedule --kind 1f1b --stages 4 --micro-batches 8` prints a pipeline schedule's timeline and
bubble without any process group (and draws it with `--plot file.png`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tinyllm.train.parallel import dist as tdist

STRATEGIES = ("tp", "tp-sp", "cp", "pp-gpipe", "pp-1f1b", "ep")


@dataclass
class ParallelCheckConfig:
    strategy: str = "tp"
    steps: int = 3
    batch: int = 4  # global rows per step
    seq: int = 16
    micro_batches: int = 2  # pipeline micro-batches per step
    lr: float = 3e-2
    clip: float = 0.5
    rtol: float = 1e-9
    seed: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {list(STRATEGIES)}")
        for name in ("steps", "batch", "seq", "micro_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not self.rtol > 0 or not self.timeout_s > 0 or not self.clip > 0:
            raise ValueError(f"rtol={self.rtol}, clip={self.clip} and timeout_s={self.timeout_s} must be > 0")


def _model(cfg: ParallelCheckConfig):
    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model

    over = dict(num_local_experts=4, num_experts_per_tok=2, router_z_loss_coef=1e-3) if cfg.strategy == "ep" else {}
    torch.manual_seed(cfg.seed)
    mc = preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=cfg.seq, **over)
    return build_model(mc).to(torch.float64)


def _batches(cfg: ParallelCheckConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    out = []
    for _ in range(cfg.steps):
        ids = torch.randint(0, 64, (cfg.batch, cfg.seq + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _opt(params, cfg: ParallelCheckConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


def _rows(t: torch.Tensor, r: int, w: int) -> torch.Tensor:
    if t.shape[0] % w:
        raise ValueError(f"batch={t.shape[0]} does not split over {w} ranks")
    n = t.shape[0] // w
    return t[r * n:(r + 1) * n]


def reference(cfg: ParallelCheckConfig, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process on the global batches (for `ep`: each batch as `world` separately routed chunks)."""
    model = _model(cfg)
    opt = _opt(model.parameters(), cfg)
    chunks = world if cfg.strategy == "ep" else 1
    losses = []
    for x, y in _batches(cfg):
        loss = sum(_ce(model(_rows(x, r, chunks)), _rows(y, r, chunks)) + (model.aux_loss() or 0.0)
                   for r in range(chunks)) / chunks
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sum_over_ranks(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def parallel_run(cfg: ParallelCheckConfig) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The strategy on the current process group: per-step global losses and the gathered full parameters."""
    from tinyllm.train.parallel import context, expert, pipeline, tensor
    from tinyllm.train.parallel.layout import gather_full_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(cfg)
    s = cfg.strategy
    losses = []
    if s.startswith("pp"):
        stage = pipeline.PipelineStage(model, rank, world)
        runner = pipeline.PipelineRunner(stage, None, cfg.micro_batches, s.split("-")[1], loss_fn=_ce)
        opt = _opt(stage.parameters(), cfg)
        for x, y in _batches(cfg):
            loss = runner.step(x, y)
            pipeline.sync_tied_grads(stage, None)
            pipeline.clip_grad_norm_(stage, cfg.clip, None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(_sum_over_ranks(loss or 0.0))
        return losses, pipeline.gather_pipeline_state_dict(stage.state_dict(), None, tied=stage.tied)
    if s.startswith("tp"):
        tensor.tensor_parallel(model, None, sequence_parallel=s == "tp-sp")
    elif s == "cp":
        context.context_parallel(model, None)
    else:
        expert.expert_parallel(model, None)
    opt = _opt(model.parameters(), cfg)
    for x, y in _batches(cfg):
        if s.startswith("tp"):
            loss = tensor.tp_lm_loss(model, x, y)
        elif s == "cp":
            loss = context.cp_lm_loss(model, x, y, None, fused=False)
        else:
            loss = _ce(model(_rows(x, rank, world)), _rows(y, rank, world)) + model.aux_loss()
        loss.backward()
        if s.startswith("tp"):
            tensor.clip_grad_norm_(model.parameters(), cfg.clip)
            losses.append(loss.item())
        elif s == "cp":
            context.all_reduce_grads(model, None)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            losses.append(_sum_over_ranks(loss.item()))
        else:
            expert.sync_grads(model, None)
            expert.clip_grad_norm_(model, cfg.clip, None)
            losses.append(_sum_over_ranks(loss.item()) / world)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if s.startswith("tp"):
        return losses, gather_full_state_dict(model)
    if s == "ep":
        return losses, expert.gather_expert_state_dict(model)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_check(cfg: ParallelCheckConfig) -> int:
    tdist.init_from_env("cpu", timeout_s=cfg.timeout_s)
    if tdist.world_size() < 2:
        raise SystemExit("tinyllm parallel check needs ≥ 2 ranks: torchrun --nproc_per_node 2 -m tinyllm "
                         f"parallel check --strategy {cfg.strategy}")
    try:
        torch.set_num_threads(1)
        ours, params = parallel_run(cfg)
        ref, ref_params = reference(cfg, tdist.world_size())
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            tdist.rank_print(json.dumps({"step": i, "loss": a, "single_process": b, "rel_diff": abs(a - b) / abs(b)}))
        worst = max(((params[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)).item()
                    for k, v in ref_params.items())
        ok = worst <= cfg.rtol and all(abs(a - b) <= cfg.rtol * abs(b) for a, b in zip(ours, ref, strict=True))
        tdist.rank_print(json.dumps({"strategy": cfg.strategy, "world_size": tdist.world_size(),
                                     "max_param_rel_diff": worst, "equal": ok}))
        return 0 if ok else 1
    finally:
        tdist.destroy()


@dataclass
class ScheduleConfig:
    kind: str = "1f1b"
    stages: int = 4
    micro_batches: int = 8
    backward_cost: float = 2.0  # backward time / forward time
    plot: str = ""  # write a PNG of the timeline here (needs matplotlib)

    def __post_init__(self) -> None:
        from tinyllm.train.parallel.pipeline import SCHEDULES

        if self.kind not in SCHEDULES:
            raise ValueError(f"kind={self.kind!r} is not one of {list(SCHEDULES)}")
        if self.stages < 1 or self.micro_batches < 1 or not self.backward_cost > 0:
            raise ValueError(f"stages={self.stages}, micro_batches={self.micro_batches} must be ≥ 1 and "
                             f"backward_cost={self.backward_cost} > 0")


def run_schedule(cfg: ScheduleConfig) -> int:
    from tinyllm.train.parallel import pipeline

    ops = pipeline.simulate(pipeline.schedule(cfg.kind, cfg.stages, cfg.micro_batches), 1.0, cfg.backward_cost)
    print(pipeline.render(ops))
    print(json.dumps({"kind": cfg.kind, "stages": cfg.stages, "micro_batches": cfg.micro_batches,
                      "bubble": round(pipeline.bubble_fraction(ops), 6),
                      "formula": round(pipeline.expected_bubble(cfg.stages, cfg.micro_batches), 6)}))
    if cfg.plot:
        pipeline.plot(ops, cfg.plot, f"{cfg.kind}, p={cfg.stages}, m={cfg.micro_batches}")
    return 0
