"""DeepSpeed ZeRO stages 1/2/3 through a generated config (the reference implementation of ZeRO).

`deepspeed_config(...)` writes the JSON DeepSpeed expects from our training fields, so the same run can be
made on DeepSpeed's engine and on our `zero.py`: micro-batch per rank, accumulation steps, clipping, AdamW
(`torch_adam: true`: torch's AdamW, no compiled fused kernel — DeepSpeed's ops are not built, `DS_BUILD_OPS=0`),
ZeRO stage and bucket sizes, bf16. `initialize(model, ...)` returns DeepSpeed's engine; the weight-decay
groups are ours (`train.optim.param_groups`: no decay on 1-D gains), passed as `model_parameters`.

The engine owns accumulation: `engine.backward(loss)` divides by `gradient_accumulation_steps` itself, and
`engine.step()` after every micro-batch only updates at the accumulation boundary (clipping included).

On CPU: `DS_ACCELERATOR=cpu` (set here before the import when no CUDA is visible) and the gloo group that
`dist.init_from_env` made; `deepspeed.initialize` sees the group exists and joins it. Launch with torchrun as
every other strategy. The first run JIT-compiles DeepSpeed's small CPU shared-memory op (~60 s, then cached).

`DeepSpeedStrategy` is the training loop's `--parallel deepspeed` (`strategy.py` has the interface): the engine
steps inside `backward`, and `--resume` reads and writes plain AdamW state through DeepSpeed's fragment API.

Not covered: DeepSpeed's launcher and hostfiles, offload (`offload_optimizer`/`offload_param`), ZeRO++.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from tinyllm.train.optim import build_optimizer, param_groups
from tinyllm.train.parallel.strategy import LogitsForward, Strategy, _copy_with


def deepspeed_config(stage: int, micro_batch: int, grad_accum: int, lr: float, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, grad_clip: float = 1.0,
                     bf16: bool = False, bucket_mb: float = 25.0) -> dict[str, Any]:
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={stage!r} must be 0, 1, 2 or 3")
    bucket = int(bucket_mb * 2**20 / 4)  # DeepSpeed counts bucket sizes in elements
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                            "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": eps,
                                                  "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def import_deepspeed():
    """Import deepspeed with the CPU accelerator where no GPU is visible (it would probe for CUDA otherwise)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("--parallel deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install deepspeed "
                          "--no-build-isolation (or pip install 'tinyllm[deepspeed]')") from e
    return deepspeed


def initialize(model: nn.Module, config: dict[str, Any], named_params=None) -> Any:
    """DeepSpeed engine over `model` with our weight-decay groups; joins the existing process group."""
    deepspeed = import_deepspeed()
    named = list(named_params) if named_params is not None else list(model.named_parameters())
    groups = param_groups(named, config["optimizer"]["params"]["weight_decay"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config,
                                      dist_init_required=False)
    return engine


def full_state_dict(engine: Any, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Every rank: the whole weights of `module` (default: the engine's; stage 3 gathers its partitions)."""
    module = module if module is not None else engine.module
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class DeepSpeedStrategy(Strategy):
    """`--parallel deepspeed`: the training loop's strategy (`strategy.py`) over DeepSpeed's engine."""

    name = "deepspeed"

    def __init__(self, module, params, opt_args, stage: int, micro_batch: int, grad_accum: int,
                 grad_clip: float, bf16: bool, bucket_mb: float = 25.0):
        super().__init__(module, params, opt_args)
        if opt_args.get("kind", "adamw") != "adamw":
            raise ValueError(f"optimizer={opt_args['kind']!r} with parallel=deepspeed: the generated config uses "
                             "AdamW")
        self.stage = stage
        # bf16 stays the loop's autocast around the engine's forward: DeepSpeed's own bf16 mode would turn the
        # module's weights into bf16 copies (fp32 masters in the optimizer) and change what a checkpoint holds
        del bf16
        self.config = deepspeed_config(stage, micro_batch, grad_accum, opt_args["lr"], opt_args["weight_decay"],
                                           tuple(opt_args["betas"]), grad_clip=grad_clip, bf16=False,
                                           bucket_mb=bucket_mb)
        self.model = initialize(LogitsForward(module) if stage == 3 else module, self.config, params)
        self.optimizer = self.model.optimizer
        self._norm = 0.0

    def backward(self, loss: torch.Tensor, k: int) -> None:
        self.model.backward(loss)  # the engine divides by gradient_accumulation_steps itself
        self.model.step()  # updates (clipping included) only at the accumulation boundary

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self) -> None:
        pass  # done by the engine in backward()

    def full_state_dict(self):
        return full_state_dict(self.model, self.module)

    def full_model(self):
        if self.stage < 3:
            return super().full_model()
        state = self.full_state_dict()
        return _copy_with(self.module, state) if self.rank == 0 else None

    # --resume: checkpoints hold plain AdamW's state (layout.py's order), read from and written into DeepSpeed's
    # fp32 partitions through its tensor-fragment API (each call a collective over the data-parallel ranks)
    resumable = True

    def _plain_template(self) -> dict:
        probe = build_optimizer([("w", nn.Parameter(torch.zeros(2, 2)))], **{**self.opt_args, "fused": False})
        return probe.param_groups[0]

    def _link_states(self) -> None:
        """ZeRO-1/2: point each parameter's fragment at the optimizer's current state tensors. DeepSpeed links
        them once, at its first step, before torch's AdamW has made any state, and never again (stage 3 reads
        the state directly)."""
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _order(self) -> tuple[list[str], list[int]]:
        """layout.adamw_order over the parameters' full shapes (ZeRO-3 leaves each one an empty partition)."""
        from tinyllm.train.parallel import layout

        meta: dict[int, torch.Tensor] = {}
        for _, p in self.params:
            meta.setdefault(id(p), torch.empty(getattr(p, "ds_shape", p.shape), device="meta")
                            .requires_grad_(p.requires_grad))
        return layout.adamw_order([(n, meta[id(p)]) for n, p in self.params])

    def optimizer_state(self) -> dict | None:
        from deepspeed.utils import safe_get_full_optimizer_state

        from tinyllm.train.parallel import layout

        order, sizes = self._order()
        byname = dict(self.params)
        self._link_states()
        step = torch.tensor(float(self.model.global_steps))
        named = {}
        for n in order:
            p = byname[n]
            shape = getattr(p, "ds_shape", p.shape)
            named[n] = {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).detach().cpu().reshape(shape)
                                                 .clone() for k in ("exp_avg", "exp_avg_sq")}}
        return layout.plain_optimizer_state(named, order, sizes, self._plain_template(), self.opt_args["weight_decay"])

    def load_weights(self, path: Any) -> None:
        from pathlib import Path

        from deepspeed.utils import safe_set_full_fp32_param

        from tinyllm.train import checkpoint as ckpt

        module_params = list(self.module.parameters())
        if self.stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(module_params, modifier_rank=0)
        else:
            gathered = contextlib.nullcontext()
        with gathered, torch.no_grad():  # the working copy, and then DeepSpeed's fp32 master partitions
            ckpt.load_model_weights(self.module, Path(path))
            for _, p in self.params:
                safe_set_full_fp32_param(p, p.detach().clone())

    def load_optimizer_state(self, opt: dict, path: Any) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        from tinyllm.train.parallel import layout

        self._require_state(opt, path)
        order, _ = self._order()
        named = layout.named_optimizer_state(opt, order)
        steps = {float(st["step"]) for st in named.values()}
        if len(steps) > 1:
            raise ValueError(f"{path}: parameters at different step counts {sorted(steps)}; DeepSpeed keeps one")
        step = steps.pop() if steps else 0.0
        inner = self.optimizer.optimizer  # torch AdamW over DeepSpeed's flat fp32 partitions: state made up front
        flats = {id(f): f for g in inner.param_groups for f in g["params"]}
        flats.update({id(f): f for f in getattr(self.optimizer, "fp32_partitioned_groups_flat", [])})  # ZeRO-3
        for flat in flats.values():
            inner.state[flat] = {"step": torch.tensor(step), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        self._link_states()
        byname = dict(self.params)
        for n in order:
            if n in named:
                for k in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(byname[n], named[n][k].flatten(), k)
        self.model.global_steps = int(step)
