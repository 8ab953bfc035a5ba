"""The training loop's hook into data parallelism: one small object per strategy (dp, zero1-3, fsdp, deepspeed).

`train/loop.py` stays single-process code; when a ParallelConfig is enabled it asks `build_strategy` for an
object that answers the few questions where strategies differ:

    model            what the forward runs on (DDP wrapper, FSDP2 module, DeepSpeed engine, or the module)
    optimizer        exposes `param_groups` (the loop sets the scheduled lr there), `step`, `zero_grad`
    local_batch(b)   this rank's rows of the *global* micro-batch: `batch_size` is global, so N ranks see the
                     same data in the same order as one process, and equal it (tests)
    micro(i, k)      context for micro-batch i of k (DDP/FSDP2: skip gradient sync before the last)
    backward(loss, k), clip_grad_norm(max_norm), step()
    mean(x)          a logged number averaged over the data-parallel ranks
    full_model()     collective: a module holding all the weights on rank 0 (None elsewhere), for HF saving
    optimizer_state() collective: the optimizer state as a plain single-process optimizer's state dict (dp and cp
                     hold it whole; ZeRO gathers its shards into that layout; the model-parallel strategies gather
                     their pieces by parameter name: `ModelParallelResume`), else None
    resumable, load_checkpoint(path)   whether `--resume` works, and loading a checkpoint's weights and optimizer
                     state into this rank's pieces (returns the trainer state)

DeepSpeed's strategy lives beside the config it generates, in deepspeed_zero.py (imported only when asked for).
Model-parallel degrees have their own strategies, one axis at a time with plain data parallel around it:
tensor_strategy.py (--tp, --sp), pipeline_strategy.py (--pp), context_strategy.py (--cp), expert_strategy.py
(--ep). The pipeline and context strategies run a step's micro-batches themselves (`forward_backward(task,
batches, autocast)`, and `eval_loss(task, batch, autocast)` for evaluation); other combinations get a clear
error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel import dist as tdist
from tinyllm.train.parallel.config import ZERO_STAGE, ParallelConfig


def _slice_rows(batch: Any, rank: int, world: int) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] % world:
            raise ValueError(f"a batch of {tuple(batch.shape)} does not split over {world} data-parallel ranks: "
                             f"batch_size is the global micro-batch and must be a multiple of {world}")
        b = batch.shape[0] // world
        return batch[rank * b:(rank + 1) * b]
    if isinstance(batch, dict):
        return {k: _slice_rows(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_rows(v, rank, world) for v in batch)
    return batch


def _copy_with(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh CPU module of the same tinyllm config holding `state` (for sharded strategies' saves)."""
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model

    cfg = getattr(module, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cannot assemble a full copy of {type(module).__name__} for saving: sharded strategies "
                         "save tinyllm models (use --parallel dp for wrapped models)")
    clone = build_model(cfg).to(next(iter(state.values())).dtype)
    clone.load_state_dict(state)
    return clone


class LogitsForward(nn.Module):
    """Hides the model from losses that read `lm_head.weight` directly (train.losses.model_lm_loss fuses the head
    into the cross entropy): under FSDP2 and ZeRO-3 that weight is only whole inside the forward, so the loss must
    take the logits the forward returns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


class Strategy:
    name = "base"

    def __init__(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], opt_args: dict[str, Any]):
        self.module, self.params, self.opt_args = module, params, opt_args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model: nn.Module = module
        self.optimizer: Any = None

    def local_batch(self, batch: Any) -> Any:
        return _slice_rows(batch, self.rank, self.world)

    def micro(self, i: int, k: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, k: int) -> None:
        (loss / k).backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], max_norm))

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def mean(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self._comm_device())
        with tdist.collective_guard("loss all-reduce"):
            dist.all_reduce(t)
        return t.item() / self.world

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
            torch.device("cpu")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def full_model(self) -> nn.Module | None:
        return self.module if self.rank == 0 else None

    def optimizer_state(self) -> dict | None:
        return None

    resumable = False

    def load_checkpoint(self, path: Any) -> dict:
        from tinyllm.train import checkpoint as ckpt

        state = ckpt.load_checkpoint(path, None)  # the trainer state first: a directory without it loads nothing
        self.load_weights(path)
        self.load_optimizer_state(state["optimizer"], path)
        return state

    def load_weights(self, path: Any) -> None:
        """A checkpoint's full weights into this rank's model (here: the module as it is)."""
        from pathlib import Path

        from tinyllm.train import checkpoint as ckpt

        ckpt.load_model_weights(self.module, Path(path))

    @staticmethod
    def _require_state(opt: dict, path: Any) -> None:
        if opt.get("sharded"):
            raise ValueError(f"{path}: this checkpoint holds no optimizer state (written by a strategy whose state "
                             f"stays sharded); continue from it with --init-from {path} instead of --resume")

    def load_optimizer_state(self, opt: dict, path: Any) -> None:
        self._require_state(opt, path)
        self.optimizer.load_state_dict(opt)


class ModelParallelResume:
    """`--resume` for strategies whose ranks hold pieces of the model (tensor, pipeline, expert parallel and their
    combinations): checkpoints carry the plain single-process AdamW state (layout.py's optimizer-state helpers
    gather the pieces by parameter name), and loading cuts it again, so a run resumes under the same layout or
    another one (dp, ZeRO, a different tp or pp).

    A strategy sets `_full_order` (`layout.adamw_order` of the loop's parameters, taken before any sharding),
    `_tp_state_group` (its tensor-parallel group), `_merge_state` / `_merge_state_group` (whether and over which
    ranks disjoint pieces merge: stages, expert ranks), `_state_alias` (local copies that read another
    parameter's state) and implements `_load_full_weights(sd)`."""

    _full_order: tuple[list[str], list[int]] = ([], [])
    _tp_state_group: Any = None
    _merge_state = False
    _merge_state_group: Any = None
    _state_alias: ClassVar[dict[str, str]] = {}  # instances assign their own

    @property
    def resumable(self) -> bool:  # type: ignore[override]
        return self.opt_args.get("kind", "adamw") == "adamw"  # Muon's state is nested per optimizer

    def _local_plain(self) -> dict:
        zero = getattr(self, "zero_stage", 0)
        return self.optimizer.full_optimizer_state() if zero else self.optimizer.state_dict()

    def _load_local_plain(self, sd: dict) -> None:
        if getattr(self, "zero_stage", 0):
            self.optimizer.load_full_optimizer_state(sd)
        else:
            self.optimizer.load_state_dict(sd)

    def optimizer_state(self) -> dict | None:
        from tinyllm.train.parallel import layout

        if not self.resumable:
            return None
        local = self._local_plain()  # a collective under ZeRO
        order, _ = layout.adamw_order(self.params)
        named = layout.named_optimizer_state(local, order) if local.get("param_groups") else {}
        full = layout.gather_named_state(named, dict(self.params), self._tp_state_group, self._merge_state,
                                         self._merge_state_group)
        template = local["param_groups"][0] if local.get("param_groups") else {}
        return layout.plain_optimizer_state(full, *self._full_order, template, self.opt_args["weight_decay"])

    def load_checkpoint(self, path: Any) -> dict:
        from tinyllm.model.hf import hf_to_tinyllm, read_hf_weights
        from tinyllm.train import checkpoint as ckpt

        state = ckpt.load_checkpoint(path, None)
        self._load_full_weights(hf_to_tinyllm(self.module.config, read_hf_weights(path)))
        self.load_optimizer_state(state["optimizer"], path)
        return state

    def load_optimizer_state(self, opt: dict, path: Any) -> None:
        from tinyllm.train.parallel import layout

        Strategy._require_state(opt, path)
        full = layout.named_optimizer_state(opt, self._full_order[0])
        local = layout.cut_named_state(full, dict(self.params), self._tp_state_group, self._state_alias)
        order, sizes = layout.adamw_order(self.params)
        if not order:
            return
        template = self.optimizer.param_groups[0]  # lr, betas, eps (not a state gather: that is a collective)
        self._load_local_plain(layout.plain_optimizer_state(local, order, sizes, template,
                                                            self.opt_args["weight_decay"]))

    def _load_full_weights(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy this rank's pieces of the full state dict `sd` in (its TP slices; under ZeRO the buckets follow)."""
        from tinyllm.train.parallel.layout import load_full_state_dict

        target = getattr(self, "stage", None) or self.module  # a pipeline rank holds its stage only
        sd = {**{k: sd[v] for k, v in self._state_alias.items() if v in sd}, **sd}
        missing = [k for k in target.state_dict() if k not in sd]
        if missing:
            raise KeyError(f"the checkpoint lacks {missing[:5]}: not the same model")

        def load(module: nn.Module) -> None:
            load_full_state_dict(module, sd, self._tp_state_group, strict=False)

        if getattr(self, "zero_stage", 0):
            self.optimizer.load_full_state_dict(load)
        else:
            load(target)


class DDPStrategy(Strategy):
    name = "dp"
    resumable = True

    def __init__(self, module, params, opt_args, bucket_mb: float = 25.0):
        super().__init__(module, params, opt_args)
        from tinyllm.train.parallel.ddp import wrap_ddp

        self.model = wrap_ddp(module, bucket_mb)
        self.optimizer = build_optimizer(params, **opt_args)

    def micro(self, i: int, k: int):
        return self.model.no_sync() if i < k - 1 else contextlib.nullcontext()

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()


class ZeROStrategy(Strategy):
    def __init__(self, module, params, opt_args, stage: int, bucket_mb: float = 25.0):
        super().__init__(module, params, opt_args)
        from tinyllm.train.parallel.zero import ZeRO

        if opt_args.get("kind", "adamw") != "adamw":
            raise ValueError(f"optimizer={opt_args['kind']!r} with parallel=zero{stage}: our ZeRO shards AdamW "
                             "only (Muon orthogonalises whole matrices)")
        self.name = f"zero{stage}"
        self.resumable = True
        self.stage = stage
        self.optimizer = ZeRO(module, stage, lr=opt_args["lr"], weight_decay=opt_args["weight_decay"],
                              betas=opt_args["betas"], bucket_mb=bucket_mb, named_params=params)

    def clip_grad_norm(self, max_norm: float) -> float:
        return self.optimizer.clip_grad_norm_(max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def full_state_dict(self):
        return self.optimizer.full_state_dict()

    def optimizer_state(self) -> dict | None:
        return self.optimizer.full_optimizer_state()  # collective: the shards gathered into AdamW's layout

    def load_checkpoint(self, path: Any) -> dict:
        from tinyllm.train import checkpoint as ckpt

        state: dict = {}
        self.optimizer.load_full_state_dict(lambda m: state.update(ckpt.load_checkpoint(path, m)))
        self.load_optimizer_state(state["optimizer"], path)
        return state

    def load_optimizer_state(self, opt: dict, path: Any) -> None:
        self._require_state(opt, path)
        self.optimizer.load_full_optimizer_state(opt)

    def full_model(self):
        if self.stage < 3:
            return super().full_model()
        state = self.full_state_dict()
        return _copy_with(self.module, state) if self.rank == 0 else None


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, module, params, opt_args):
        super().__init__(module, params, opt_args)
        from tinyllm.train.parallel.fsdp import apply_fsdp2

        self.model = LogitsForward(apply_fsdp2(module))
        # the parameters are now DTensors: name them afresh (same names, new objects)
        ids = {n for n, _ in params}
        self.params = [(n, p) for n, p in module.named_parameters() if n in ids]
        self.optimizer = build_optimizer(self.params, **{**opt_args, "fused": False})

    def micro(self, i: int, k: int):
        from tinyllm.train.parallel.fsdp import no_sync

        return no_sync(self.module) if i < k - 1 else contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        from tinyllm.train.parallel.fsdp import clip_grad_norm_

        return clip_grad_norm_(self.module, max_norm)

    def full_state_dict(self):
        from tinyllm.train.parallel.fsdp import full_state_dict

        return full_state_dict(self.module)

    def full_model(self):
        state = self.full_state_dict()
        return _copy_with(self.module, state) if self.rank == 0 else None

    resumable = True

    def optimizer_state(self) -> dict | None:
        from tinyllm.train.parallel.fsdp import full_optimizer_state

        return full_optimizer_state(self.optimizer)  # collective: each DTensor state gathered whole

    def load_weights(self, path: Any) -> None:
        from pathlib import Path

        from tinyllm.train.parallel.fsdp import load_full_weights

        load_full_weights(self.module, Path(path))  # each rank cuts its shards from the full tensors

    def load_optimizer_state(self, opt: dict, path: Any) -> None:
        from tinyllm.train.parallel.fsdp import load_full_optimizer_state

        self._require_state(opt, path)
        load_full_optimizer_state(self.optimizer, opt)


def input_ids_of(batch: Any) -> torch.Tensor:
    """The token ids of a task's batch: a tensor, the first of a tuple (pretraining's (x, y)), or "input_ids"."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(f"cannot find the token ids in a batch of type {type(batch).__name__}: model-parallel "
                     "training needs a tensor, an (input_ids, labels) tuple or a dict with 'input_ids'")


def build_strategy(pcfg: ParallelConfig, module: nn.Module, params: Iterable[tuple[str, nn.Parameter]],
                   opt_args: dict[str, Any], micro_batch: int = 1, grad_accum: int = 1, grad_clip: float = 1.0,
                   bf16: bool = False) -> Strategy:
    """The strategy `pcfg.parallel` names, over the default process group (which must exist)."""
    if not tdist.is_dist():
        raise RuntimeError(f"parallel={pcfg.parallel!r} needs a process group: launch with torchrun "
                           "(torchrun --nproc_per_node N -m tinyllm ...)")
    deg = pcfg.degrees(dist.get_world_size())
    if pcfg.model_parallel > 1:
        if pcfg.cp > 1 and pcfg.model_parallel == pcfg.cp * pcfg.tp and pcfg.parallel in ("dp", "none"):
            # CP (with TP, and SP, inside each ring position), plain DP around it
            from tinyllm.train.parallel.context_strategy import ContextParallelStrategy

            return ContextParallelStrategy(module, list(params), opt_args, pcfg.cp, pcfg.cp_layout, pcfg.tp,
                                           pcfg.sp)
        if pcfg.model_parallel == pcfg.tp and pcfg.parallel in ("dp", "none", *ZERO_STAGE):
            # TP (+SP), plain DP or our ZeRO around it
            from tinyllm.train.parallel.tensor_strategy import TensorParallelStrategy

            return TensorParallelStrategy(module, list(params), opt_args, pcfg.tp, pcfg.sp,
                                          ZERO_STAGE.get(pcfg.parallel, 0))
        if pcfg.ep > 1 and pcfg.model_parallel == pcfg.ep * pcfg.tp and not pcfg.sp and pcfg.parallel in ("dp", "none"):
            from tinyllm.train.parallel.expert_strategy import (
                ExpertParallelStrategy,  # data + experts (replicated over dp when ep < WORLD_SIZE); --tp: attention
            )

            return ExpertParallelStrategy(module, list(params), opt_args, pcfg.ep, pcfg.tp)
        if pcfg.pp > 1 and pcfg.model_parallel == pcfg.pp * pcfg.tp * pcfg.cp and pcfg.parallel in ("dp", "none"):
            # PP (with TP and SP, and the CP ring, inside each stage), plain DP around it
            from tinyllm.train.parallel.pipeline_strategy import PipelineParallelStrategy

            return PipelineParallelStrategy(module, list(params), opt_args, pcfg.pp, pcfg.pp_schedule, pcfg.tp,
                                            pcfg.sp, pcfg.cp, pcfg.cp_layout)
        raise ValueError(f"tp={pcfg.tp}, pp={pcfg.pp}, cp={pcfg.cp}, ep={pcfg.ep} with parallel={pcfg.parallel!r}: "
                         "the training loop runs tensor (--tp, with --sp; --parallel dp, none or zero1-3 around it), "
                         "pipeline (--pp) or context parallel (--cp), the last two also with --tp (and --sp) inside, --pp also with --cp, "
                         "and "
                         "--parallel dp or none around them — "
                         "expert parallel (--ep, with --tp beside it, --parallel dp or none) and the data-parallel strategies; "
                         "combine the wrappers of train/parallel/ in your own script for the rest")
    params = list(params)
    if pcfg.parallel in ("dp", "none"):
        return DDPStrategy(module, params, opt_args, pcfg.bucket_mb)
    if pcfg.parallel in ZERO_STAGE:
        return ZeROStrategy(module, params, opt_args, ZERO_STAGE[pcfg.parallel], pcfg.bucket_mb)
    if pcfg.parallel == "fsdp":
        return FSDPStrategy(module, params, opt_args)
    from tinyllm.train.parallel.deepspeed_zero import DeepSpeedStrategy

    return DeepSpeedStrategy(module, params, opt_args, pcfg.zero_stage, micro_batch // deg["dp"], grad_accum,
                             grad_clip, bf16, pcfg.bucket_mb)
