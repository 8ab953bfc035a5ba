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

Not covered: DeepSpeed's launcher and hostfiles, offload (`offload_optimizer`/`offload_param`), ZeRO++.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from tinyllm.train.optim import param_groups


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
