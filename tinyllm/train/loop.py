"""THE training loop (DESIGN rule 7; notes ch.04 training practice, ch.04.1.b MFU).

`train(model, task, cfg)` owns everything generic about optimisation; a `Task` (pretraining, SFT, reward,
DPO, PPO, GRPO) supplies only batches, a loss and the trainable parameters.

One optimizer step s:
  lr ← schedule(s)                                   (optim.lr_at: a pure function of s)
  for each of the k = grad_accum_steps micro-batches:  (loss_i / k).backward()   under bf16 autocast if asked
  g ← clip(g, grad_clip)                             (= torch.nn.utils.clip_grad_norm_; the norm is logged)
  AdamW update; zero the gradients
Gradient accumulation is exact for mean losses over equal-sized micro-batches: k micro-batches of b give the
same gradient as one batch of k·b (tested). With masked labels of unequal counts (SFT) the average of
per-micro-batch means weights tokens unequally, as in most trainers.

Precision: "fp32", or "bf16" = autocast to bfloat16 for matmuls with fp32 master weights, gradients and
optimizer state (no loss scaling needed: bf16 has fp32's exponent range). `compile` wraps the forward in
torch.compile, the fast option: inductor fuses the element-wise work (RMSNorm, RoPE, SwiGLU) that eager mode
runs as separate passes over memory; the first steps pay the compilation (about a minute on a CPU), which
inductor caches on disk (TORCHINDUCTOR_CACHE_DIR), so later runs of the same model start quickly. Eager mode
is already lean: the pretraining loss fuses the lm_head into a chunked cross entropy (losses.model_lm_loss),
and RMSNorm/RoPE use hand-derived backwards in fp32 (bench/train.py, BENCHMARKS.md "Training"). Throughput is reported as tokens/s and MFU = achieved model FLOP/s ÷ the device's matmul peak,
with model FLOPs per token = 6·N (N = parameters that take part in matmuls) + 12·L·H·d_head·T (attention
scores and values, PaLM appendix B), and the peak measured once per process by timing a square matmul.

Outputs under `cfg.out_dir`: `train_config.json`, `metrics.jsonl` (one JSON object per log/eval line),
`loss.png` (plot.py) and `checkpoints/step-XXXXXX/` (checkpoint.py). Ctrl-C saves a checkpoint of the last
completed step (with the data position and RNG states as they were at that step's start) and returns with
`interrupted=True`; `resume=True` continues from `checkpoints/latest` and reproduces the uninterrupted run
bit-exactly in fp32.

Data parallelism (notes ch.04) enters through one hook: `train(..., parallel=ParallelConfig(...))` under
torchrun joins the process group and lets a `train/parallel/strategy.py` object wrap the model and own the
optimizer, the gradient sync, clipping and the step; `batch_size` stays the *global* micro-batch (each rank
takes its rows), so N ranks reproduce the single-process run. Pipeline and context parallel strategies run a
step's k micro-batches themselves (`forward_backward`: the k are the pipeline's micro-batches, or each is cut
along the sequence), and evaluate through `eval_loss`. Only rank 0 writes metrics, plots and
checkpoints (the full weights, gathered where sharded). Without a parallel config the loop is single-process
code and never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tinyllm.atomic import atomic_write_json, trim_torn_tail
from tinyllm.capability import PRECISION_CHOICES, resolve_precision
from tinyllm.train import checkpoint as ckpt
from tinyllm.train.budget import StepBudget, replan_floor, replan_open
from tinyllm.train.optim import (
    DECAY_SHAPES,
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    check_adamw_lr_scale,
    lr_at,
)
from tinyllm.utils import pick_device, seed_everything

PRECISIONS = PRECISION_CHOICES  # "auto": bf16 where measured faster (tinyllm.capability)


@runtime_checkable
class Task(Protocol):
    def train_batches(self) -> Iterator[Any]:
        """An endless batch iterator with state_dict()/load_state_dict() (its data position)."""
        ...

    def eval_batches(self) -> Iterable[Any] | None:
        """A fresh pass over held-out batches (None: no eval)."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and extra metrics to log (a "tokens" entry sets the token count)."""
        ...

    def trainable_parameters(self, model: nn.Module) -> Iterable[Any]:
        """(name, parameter) pairs, or bare parameters, that the optimizer updates."""
        ...


def _meta(help_text: str, **kw: Any) -> dict[str, Any]:
    return {"help": help_text, **kw}


@dataclass
class TrainConfig:
    out_dir: str = field(default="out", metadata=_meta("directory for checkpoints, metrics and plots"))
    max_steps: int = field(default=1000, metadata=_meta("optimizer steps"))
    time_budget_s: float = field(default=0.0, metadata=_meta(
        "wall-clock budget in seconds: re-plan max_steps from the measured step time so the run ends near it "
        "(never past max_steps; wsd keeps its whole decay; single-process runs; 0: run max_steps)"))
    batch_size: int = field(default=8, metadata=_meta("sequences per micro-batch"))
    grad_accum_steps: int = field(default=1, metadata=_meta("micro-batches per optimizer step"))
    lr: float = field(default=3e-4, metadata=_meta("peak learning rate"))
    min_lr: float = field(default=3e-5, metadata=_meta("final learning rate of cosine/wsd"))
    warmup_steps: int = field(default=100, metadata=_meta("linear warm-up steps"))
    schedule: str = field(default="cosine", metadata=_meta("learning-rate schedule", choices=list(SCHEDULES)))
    decay_fraction: float = field(default=0.2, metadata=_meta("wsd: fraction of steps spent decaying"))
    decay_shape: str = field(default="linear", metadata=_meta("wsd decay shape", choices=list(DECAY_SHAPES)))
    optimizer: str = field(default="adamw", metadata=_meta("adamw, or muon (Muon on hidden matrices, AdamW on "
                                                           "embeddings, head and gains)", choices=list(OPTIMIZERS)))
    adamw_lr_scale: float = field(default=1.0, metadata=_meta(
        "optimizer=muon: the AdamW part (embeddings, head, gains) runs at this multiple of the scheduled lr"))
    weight_decay: float = field(default=0.1, metadata=_meta("AdamW decoupled weight decay (≥2-D params)"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=_meta("AdamW β1 β2"))
    grad_clip: float = field(default=1.0, metadata=_meta("max global gradient norm (0: no clipping)"))
    precision: str = field(default="auto", metadata=_meta(
        "fp32, bf16 autocast, or auto (bf16 on CUDA and on CPUs where bf16 matmul measures faster than fp32)",
        choices=list(PRECISIONS)))
    compile: bool = field(default=False, metadata=_meta("wrap the forward in torch.compile (faster steps after a "
                                                         "one-off compilation, cached on disk)"))
    eval_interval: int = field(default=200, metadata=_meta("evaluate every N steps (0: only at the end)"))
    eval_steps: int = field(default=20, metadata=_meta("eval batches per evaluation (0: no eval)"))
    log_interval: int = field(default=10, metadata=_meta("write a metrics line every N steps"))
    save_interval: int = field(default=500, metadata=_meta("checkpoint every N steps (0: only at the end)"))
    keep_last: int = field(default=0, metadata=_meta("keep only the newest N checkpoints (0: all)"))
    seed: int = field(default=0, metadata=_meta("seed for python/numpy/torch and the data order"))
    device: str = field(default="auto", metadata=_meta("cpu, cuda, cuda:N or auto"))
    resume: bool = field(default=False, metadata=_meta("continue from out_dir/checkpoints/latest"))
    progress: bool = field(default=True, metadata=_meta("show a progress bar"))

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("warmup_steps", "eval_interval", "eval_steps", "save_interval", "keep_last"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not (self.time_budget_s >= 0 and math.isfinite(self.time_budget_s)):
            raise ValueError(f"time_budget_s={self.time_budget_s!r} must be a finite number >= 0 (0: no budget)")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr!r} must be in [0, lr={self.lr}]")
        for name, allowed in (("schedule", SCHEDULES), ("decay_shape", DECAY_SHAPES), ("precision", PRECISIONS),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        check_adamw_lr_scale(self.adamw_lr_scale, self.optimizer)
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction!r} must be in (0, 1]")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        self.betas = [float(b) for b in self.betas]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be >= 0")

    def train_fields(self) -> dict[str, Any]:
        """This config's TrainConfig fields (also for subclasses that add their own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}


@dataclass
class TrainResult:
    step: int  # optimizer steps completed in total
    start_step: int  # step this call started from (> 0 after resume)
    losses: list[float]  # training loss of each step run in this call
    eval_losses: dict[int, float]
    tokens: int  # tokens trained on in this call
    seconds: float
    interrupted: bool = False
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    model: nn.Module | None = None  # the trained weights as a plain module (rank 0 of a parallel run; else None)


# ------------------------------------------------------------------ throughput accounting
@functools.lru_cache(maxsize=8)
def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None) -> float:
    """Measured FLOP/s of an n×n matmul on `device` (best of a few runs; cached per process). n defaults to 1024
    on a CPU and 8192 on CUDA, where a 1024² product lasts a few microseconds, is bound by the launch and so
    understates the peak (MFU then read above 100 %)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = math.inf
    for i in range(6):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:  # the first run warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6·N_matmul + 12·L·H·d_head·T training FLOPs per token (forward + backward)."""
    matmul_params = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    n = sum(matmul_params.values())
    cfg = getattr(model, "config", None)
    attn = 0.0
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        attn = 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.head_dim or 0) * seq_len
    return 6.0 * n + attn


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def describe_config(cfg: Any) -> str:
    """`Name(field=value, ...)` listing only the fields that differ from their defaults (for run logs)."""
    changed = []
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        value = getattr(cfg, f.name)
        if value != default:
            changed.append(f"{f.name}={value!r}")
    return f"{type(cfg).__name__}({', '.join(changed)})"


def write_run_config(cfg: Any, out_dir: Path, name: str, **extra: Any) -> Path:
    """Write the run's resolved config (+ `extra` facts) to out_dir/name atomically; echo it when
    `cfg.progress`."""
    path = out_dir / name
    if os.environ.get("RANK", "0") not in ("", "0"):
        return path  # a torchrun worker other than rank 0: rank 0 writes the run's files
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**dataclasses.asdict(cfg), **extra}, default=str, ensure_ascii=True)
    if getattr(cfg, "progress", False):
        print(f"{describe_config(cfg)} → {path}", flush=True)
    return path


def _named(params: Iterable[Any]) -> list[tuple[str, nn.Parameter]]:
    return [p if isinstance(p, tuple) else (f"param{i}", p) for i, p in enumerate(params)]


# ------------------------------------------------------------------ the loop
class _Run:
    """State of one `train` call; methods are the loop's phases."""

    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, parallel: Any = None) -> None:
        # before touching the model or joining a process group: a refused run must not leave one behind
        if cfg.time_budget_s and parallel is not None and parallel.enabled:
            raise ValueError(f"time_budget_s={cfg.time_budget_s} with parallel={parallel.parallel!r}: every rank must "
                             "run the same steps, and each would time its own; give a fixed --max-steps")
        self.model, self.task, self.cfg = model, task, cfg
        self.out = Path(cfg.out_dir)
        self.par = None
        if parallel is not None and parallel.activation_checkpointing != "none":
            from tinyllm.train.parallel.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model, parallel.activation_checkpointing)
        self.owns_group = False
        if (parallel is None or not parallel.enabled) and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise ValueError(f"launched on WORLD_SIZE={os.environ['WORLD_SIZE']} ranks but parallel='none': every "
                             "rank would train the same copy; pick --parallel dp|zero1|zero2|zero3|fsdp|deepspeed")
        if parallel is not None and parallel.enabled:
            from tinyllm.train.parallel.dist import init_from_env, is_dist

            self.owns_group = not is_dist()  # a group the caller made outlives this call
            self.device = init_from_env(cfg.device, timeout_s=parallel.timeout_s)
        else:
            self.device = pick_device(cfg.device)
        self.max_steps = cfg.max_steps  # the plan; a time budget may move it below cfg.max_steps
        self.spent_s = 0.0  # budget seconds used before a resume
        self.model.to(self.device)
        self.params = _named(task.trainable_parameters(model))
        self.precision = resolve_precision(cfg.precision, self.device)
        if parallel is not None and parallel.enabled:
            from tinyllm.train.parallel.strategy import build_strategy

            opt_args = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": tuple(cfg.betas),
                        "kind": cfg.optimizer}
            if cfg.adamw_lr_scale != 1.0:
                opt_args["adamw_lr_scale"] = cfg.adamw_lr_scale
            self.par = build_strategy(parallel, model, self.params, opt_args, cfg.batch_size, cfg.grad_accum_steps,
                                      cfg.grad_clip, self.precision == "bf16")
            self.opt, model = self.par.optimizer, self.par.model
        else:
            self.opt = build_optimizer(self.params, cfg.lr, cfg.weight_decay, tuple(cfg.betas), kind=cfg.optimizer,
                                       adamw_lr_scale=cfg.adamw_lr_scale)
        self.main = self.par is None or self.par.rank == 0
        if cfg.compile and self.par is not None and hasattr(self.par, "forward_backward"):
            raise ValueError(f"compile=True with parallel strategy {self.par.name!r}: pipeline and context parallel "
                             "run their stages/ring eagerly (drop --compile)")
        self.fwd = torch.compile(model) if cfg.compile else model
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        self.data = task.train_batches()
        self.flops_per_token: float | None = None
        self.eval_losses: dict[int, float] = {}

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, c.schedule, c.lr, c.min_lr, c.warmup_steps, self.max_steps, c.decay_fraction, c.decay_shape)

    def data_state(self) -> Any:
        fn = getattr(self.data, "state_dict", None)
        return fn() if fn is not None else None

    def resume(self) -> int:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise FileNotFoundError(f"resume=True but {self.out / 'checkpoints'} holds no checkpoint")
        if self.par is None:
            state = ckpt.load_checkpoint(path, self.model, self.opt)
        elif not self.par.resumable:
            raise ValueError(f"resume=True with parallel={self.par.name!r}: this optimizer's state stays in "
                             "model-parallel pieces that checkpoints do not gather (Muon); every layout resumes "
                             f"under AdamW — or start a new run from the weights with --init-from {path}")
        else:
            state = self.par.load_checkpoint(path)
        if state.get("data") is not None:
            self.data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        if self.cfg.time_budget_s and state.get("max_steps"):  # the plan as it stood, and the budget used
            self.max_steps = min(self.cfg.max_steps, int(state["max_steps"]))
            self.spent_s = float(state.get("budget_spent_s", 0.0))
        return int(state["step"])

    def save(self, step: int, data_state: Any, rng: dict[str, Any], spent_s: float = 0.0) -> Path | None:
        trainer_state = {"lr_schedule_step": step, "rng": rng, "data": data_state}
        if self.cfg.time_budget_s:
            trainer_state.update(max_steps=self.max_steps, budget_spent_s=spent_s)
        if self.par is None:
            return ckpt.save_checkpoint(self.out, step, self.model, self.opt, trainer_state,
                                        dataclasses.asdict(self.cfg), self.cfg.keep_last)
        full = self.par.full_model()  # a collective: every rank takes part, rank 0 gets the module
        opt_state = self.par.optimizer_state()  # a collective too where the state is sharded (ZeRO)
        path = None
        if full is not None:
            path = ckpt.save_checkpoint(self.out, step, full, _StateOnly(opt_state), trainer_state,
                                        dataclasses.asdict(self.cfg), self.cfg.keep_last)
        from tinyllm.train.parallel.dist import barrier

        barrier("checkpoint save")  # nobody races ahead (or exits) while rank 0 writes
        return path

    def step(self, step: int) -> tuple[float, int, float, dict[str, float]]:
        """One optimizer step; returns (mean micro-batch loss, tokens, grad norm, task metrics)."""
        lr = self.lr(step)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        k = self.cfg.grad_accum_steps
        total, tokens, metrics = 0.0, 0, {}
        par = self.par
        if par is not None and hasattr(par, "forward_backward"):  # pipeline / context parallel run the k themselves
            batches = [_to_device(par.local_batch(next(self.data)), self.device) for _ in range(k)]
            total, tokens, metrics = par.forward_backward(self.task, batches, self.autocast)
            first = _first_tensor(batches[0])
            if self.flops_per_token is None and first is not None:
                self.flops_per_token = model_flops_per_token(self.model, first.shape[-1])
        else:
            for i in range(k):
                batch = next(self.data)
                if par is not None:
                    batch = par.local_batch(batch)
                batch = _to_device(batch, self.device)
                with par.micro(i, k) if par is not None else contextlib.nullcontext():
                    with self.autocast:
                        loss, metrics = self.task.loss(self.fwd, batch)
                    if par is None:
                        (loss / k).backward()
                    else:
                        par.backward(loss, k)
                total += loss.item()
                first = _first_tensor(batch)
                tokens += int(metrics.get("tokens", first.numel() if first is not None else 0))
                if self.flops_per_token is None and first is not None:
                    self.flops_per_token = model_flops_per_token(self.model, first.shape[-1])
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        if par is not None:
            norm = par.clip_grad_norm(max_norm)
            par.step()
            return par.mean(total / k), tokens * par.world, norm, metrics
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], max_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total / k, tokens, float(norm), metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.cfg.eval_steps == 0:
            return None
        batches = self.task.eval_batches()
        if batches is None:
            return None
        self.model.eval()
        losses = []
        try:
            for i, batch in enumerate(batches):
                if i == self.cfg.eval_steps:
                    break
                batch = _to_device(batch, self.device)
                if self.par is not None and hasattr(self.par, "eval_loss"):  # stages / sequence chunks
                    losses.append(self.par.eval_loss(self.task, batch, self.autocast))
                    continue
                with self.autocast:
                    loss, _ = self.task.loss(self.fwd, batch)
                losses.append(loss.item())
        finally:
            self.model.train()
        return sum(losses) / len(losses) if losses else None


def train(model: nn.Module, task: Task, cfg: TrainConfig, parallel: Any = None) -> TrainResult:
    """Optimise `model` on `task` for cfg.max_steps steps, or fewer to fit cfg.time_budget_s (train.budget; see
    the module docstring). `parallel`: a
    train.parallel.config.ParallelConfig (data-parallel strategy, activation checkpointing) or None."""
    seed_everything(cfg.seed)
    run = _Run(model, task, cfg, parallel)
    try:
        result = _train(run)
        if run.owns_group:
            from tinyllm.train.parallel.dist import barrier

            barrier("end of training")  # ranks tear the group down together (a lone teardown can hang a peer)
    finally:
        if run.owns_group:
            from tinyllm.train.parallel.dist import destroy

            destroy()
    return result


class _StateOnly:
    """What save_checkpoint needs of an optimizer: its state dict ({} where the state is sharded)."""

    def __init__(self, state: dict | None) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state if self.state is not None else {"sharded": True}


def _train(run: _Run) -> TrainResult:
    from tqdm.auto import tqdm

    cfg = run.cfg
    run.out.mkdir(parents=True, exist_ok=True)
    if run.main:
        atomic_write_json(run.out / "train_config.json", dataclasses.asdict(cfg), default=str, ensure_ascii=True)
    start = run.resume() if cfg.resume else 0
    metrics_path = run.out / "metrics.jsonl"
    if not run.main:
        pass  # only rank 0 writes metrics
    elif not cfg.resume:
        metrics_path.unlink(missing_ok=True)
    else:
        trim_torn_tail(metrics_path)  # a killed run may have left half a record
    run.model.train()
    losses: list[float] = []
    total_tokens, window_tokens, window_losses = 0, 0, []
    t_start = t_window = time.perf_counter()
    peak = None
    interrupted, last_ckpt = False, None
    budget = (StepBudget(cfg.time_budget_s, cfg.max_steps, spent=run.spent_s, start=start, plan=run.max_steps)
              if cfg.time_budget_s else None)

    def spent() -> float:  # budget seconds used so far, earlier parts of a resumed run included
        return run.spent_s + time.perf_counter() - t_start

    bar = tqdm(total=run.max_steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and run.main),
               dynamic_ncols=True)
    step, in_step, data_state, rng = start, False, None, None
    with open(metrics_path if run.main else os.devnull, "a") as log:
        def emit(record: dict[str, Any]) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        try:
            while step < run.max_steps:
                # what a checkpoint of "step completed steps" must hold, captured before the step consumes it
                in_step, data_state, rng = True, run.data_state(), ckpt.rng_state()
                loss, tokens, norm, task_metrics = run.step(step)
                step += 1
                in_step = False
                losses.append(loss)
                window_losses.append(loss)
                total_tokens += tokens
                window_tokens += tokens
                if step % cfg.log_interval == 0 or step == run.max_steps:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - t_window, 1e-9)
                    if peak is None:
                        peak = matmul_peak_flops(str(run.device), torch.bfloat16 if run.precision == "bf16"
                                                 else torch.float32)
                    mfu = tps * (run.flops_per_token or 0.0) / peak
                    emit({"step": step, "loss": sum(window_losses) / len(window_losses), "lr": run.lr(step - 1),
                          "grad_norm": norm, "tokens": total_tokens, "tokens_per_s": tps, "mfu": mfu,
                          "elapsed_s": now - t_start, **({"max_steps": run.max_steps} if budget else {}),
                          **{k: float(v) for k, v in task_metrics.items() if k != "tokens"}})
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%")
                    t_window, window_tokens, window_losses = now, 0, []
                bar.update(1)
                if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == run.max_steps:
                    ev = run.evaluate()
                    if ev is not None:
                        run.eval_losses[step] = ev
                        emit({"step": step, "eval_loss": ev})
                if (cfg.save_interval and step % cfg.save_interval == 0) or step == run.max_steps:
                    last_ckpt = run.save(step, run.data_state(), ckpt.rng_state(), spent())
                if budget is not None and replan_open(step, run.max_steps, cfg.schedule, cfg.decay_fraction):
                    planned = budget.replan(step, time.perf_counter() - t_start,
                                            replan_floor(step, cfg.schedule, cfg.decay_fraction))
                    if planned != run.max_steps:
                        run.max_steps = bar.total = planned
                        bar.refresh()
        except KeyboardInterrupt:
            interrupted = True
            run.opt.zero_grad(set_to_none=True)
            if not in_step:  # the step had completed: its own end state is the one to keep
                data_state, rng = run.data_state(), ckpt.rng_state()
            bar.write(f"interrupted: saving a checkpoint of step {step}")
            last_ckpt = run.save(step, data_state, rng, spent())
        finally:
            bar.close()
    plot_path = write_plot(metrics_path, run.out / "loss.png") if run.main else None
    final = run.model if run.par is None else (run.par.full_model() if not interrupted else None)
    return TrainResult(step=step, start_step=start, losses=losses, eval_losses=run.eval_losses,
                       tokens=total_tokens, seconds=time.perf_counter() - t_start, interrupted=interrupted,
                       checkpoint=last_ckpt, metrics_path=metrics_path if run.main else None, plot_path=plot_path,
                       model=final)


def write_plot(metrics_path: Path, png_path: Path) -> Path | None:
    """Train and eval loss curves from metrics.jsonl → PNG (None when there is nothing to plot)."""
    from tinyllm.train.plot import write_loss_plot

    train_xy: tuple[list[float], list[float]] = ([], [])
    eval_xy: tuple[list[float], list[float]] = ([], [])
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        for key, xy in (("loss", train_xy), ("eval_loss", eval_xy)):
            if key in rec:
                xy[0].append(rec["step"])
                xy[1].append(rec[key])
    if not train_xy[0]:
        return None
    return write_loss_plot(png_path, {"train": train_xy, "eval": eval_xy})
