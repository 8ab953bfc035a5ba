"""ParallelConfig: which data-parallel strategy and which model-parallel degrees a run uses (notes ch.04).

The world of N ranks is a grid dp × tp × pp × cp × ep = N (any axis of size 1 is absent). `parallel` picks how
the data-parallel axis treats parameters, gradients and optimizer state:

    none        one process, nothing distributed (the default; also what N = 1 means)
    dp          torch DDP: full replica per rank, gradients all-reduced
    zero1/2/3   our ZeRO: optimizer state / + gradients / + parameters sharded over the dp ranks
    fsdp        torch FSDP2 (fully_shard), the ZeRO-3 of torch
    deepspeed   DeepSpeed ZeRO (stage `zero_stage`) through a generated config

`tp`, `pp`, `cp`, `ep` are consumed by the model-parallel wrappers (tensor.py, pipeline.py, context.py,
expert.py); `sp` turns on sequence parallel inside the tensor-parallel group, so it needs tp > 1.
`dp = 0` means "whatever is left": N / (tp·pp·cp·ep), which must divide exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinyllm.utils import require_int

PP_SCHEDULES = ("1f1b", "gpipe")
STRATEGIES = ("none", "dp", "zero1", "zero2", "zero3", "fsdp", "deepspeed")
CHECKPOINTING = ("none", "full", "selective")
CP_LAYOUTS = ("zigzag", "contiguous")  # context-parallel chunk orders (context.chunk_ids)
ZERO_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3}


@dataclass
class ParallelConfig:
    parallel: str = "none"
    dp: int = 0
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"  # the pipeline's schedule (pipeline.py): 1f1b or gpipe
    sp: bool = False
    cp: int = 1
    cp_layout: str = "zigzag"  # the ring's chunk order (context.py): zigzag (balanced) or contiguous
    ep: int = 1
    zero_stage: int = 2  # DeepSpeed only; our ZeRO takes the stage from the strategy name
    bucket_mb: float = 25.0  # gradient all-reduce / reduce-scatter bucket size (DDP's default)
    timeout_s: float = 120.0  # every collective; a dead peer fails the run within this
    activation_checkpointing: str = "none"  # none | full | selective (checkpointing.py); also single-process

    def __post_init__(self) -> None:
        if self.parallel not in STRATEGIES:
            raise ValueError(f"parallel={self.parallel!r} is not one of {list(STRATEGIES)}")
        require_int("dp", self.dp, 0)
        for name in ("tp", "pp", "cp", "ep"):
            require_int(name, getattr(self, name), 1)
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"pp_schedule={self.pp_schedule!r} is not one of {list(PP_SCHEDULES)}")
        if self.cp_layout not in CP_LAYOUTS:
            raise ValueError(f"cp_layout={self.cp_layout!r} is not one of {list(CP_LAYOUTS)}")
        if not isinstance(self.sp, bool):
            raise ValueError(f"sp={self.sp!r} must be true or false")
        if self.sp and self.tp == 1:
            raise ValueError("sp=True needs tp > 1: sequence parallel splits activations over the tensor-parallel "
                             "group")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb={self.bucket_mb!r} must be > 0")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing={self.activation_checkpointing!r} is not one of "
                             f"{list(CHECKPOINTING)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r} must be > 0")

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp * self.ep

    @property
    def enabled(self) -> bool:
        return self.parallel != "none" or self.model_parallel > 1

    def degrees(self, world_size: int) -> dict[str, int]:
        """{"dp", "tp", "pp", "cp", "ep"} for this world, dp inferred when 0; a clear error when they do not fit."""
        require_int("world_size", world_size, 1)
        mp_ = self.model_parallel
        dp = self.dp or (world_size // mp_ if world_size % mp_ == 0 else 0)
        if dp * mp_ != world_size:
            raise ValueError(
                f"parallel degrees do not fill the world: dp={self.dp or '(auto)'} × tp={self.tp} × pp={self.pp} "
                f"× cp={self.cp} × ep={self.ep} = {max(dp, 1) * mp_ if self.dp else f'? × {mp_}'}, but WORLD_SIZE="
                f"{world_size} (the product must equal the number of ranks; "
                f"torchrun --nproc_per_node sets it)")
        if self.parallel == "none" and world_size > 1 and dp > 1:
            raise ValueError(f"WORLD_SIZE={world_size} with parallel='none' would train {dp} identical copies; "
                             "pick --parallel dp|zero1|zero2|zero3|fsdp|deepspeed")
        return {"dp": dp, "tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep}


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class ParallelFields:
    """The command-line face of ParallelConfig, mixed into the pretrain and sft configs (`--parallel zero2 ...`)."""

    parallel: str = field(default="none", metadata=_h(
        "data-parallel strategy under torchrun: dp (DDP), zero1/2/3 (ours), fsdp (FSDP2), deepspeed; "
        "batch_size stays the global micro-batch", choices=list(STRATEGIES)))
    tp: int = field(default=1, metadata=_h("tensor-parallel degree (model-parallel wrappers)"))
    pp: int = field(default=1, metadata=_h("pipeline-parallel degree (stages; the micro-batches are the "
                                           "grad_accum_steps)"))
    pp_schedule: str = field(default="1f1b", metadata=_h("pipeline schedule of --pp", choices=list(PP_SCHEDULES)))
    sp: bool = field(default=False, metadata=_h("sequence parallel inside the tensor-parallel group"))
    cp: int = field(default=1, metadata=_h("context-parallel degree (ring attention)"))
    cp_layout: str = field(default="zigzag", metadata=_h(
        "sequence chunks of --cp: zigzag (rank r holds chunks r and 2C-1-r of 2C: equal causal work) or "
        "contiguous (rank r holds tokens [rT/C, (r+1)T/C))", choices=list(CP_LAYOUTS)))
    ep: int = field(default=1, metadata=_h("expert-parallel degree"))
    zero_stage: int = field(default=2, metadata=_h("ZeRO stage of --parallel deepspeed", choices=[0, 1, 2, 3]))
    dist_timeout_s: float = field(default=120.0, metadata=_h("seconds any collective may wait before the run "
                                                             "fails (a dead rank ends the job within this)"))
    activation_checkpointing: str = field(default="none", metadata=_h(
        "recompute activations in backward: full (keep layer inputs only) or selective (keep matmul outputs)",
        choices=list(CHECKPOINTING)))

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(parallel=self.parallel, tp=self.tp, pp=self.pp, pp_schedule=self.pp_schedule,
                              sp=self.sp, cp=self.cp, cp_layout=self.cp_layout, ep=self.ep, zero_stage=self.zero_stage,
                              timeout_s=self.dist_timeout_s,
                              activation_checkpointing=self.activation_checkpointing)
