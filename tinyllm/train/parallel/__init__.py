"""Distributed training (notes ch.04), each strategy a wrapper applied from outside the model.

    dist.py      process group from torchrun's environment, backend by device, rank helpers, fail-fast errors
    config.py    ParallelConfig: which strategy and which degrees (dp × tp × pp × cp × ep = world size)
    ddp.py       data parallel: torch DDP with no_sync accumulation, and a bucketed all-reduce teaching version
    zero.py      ZeRO-1/2/3: sharded optimizer state, reduce-scattered gradients, all-gathered parameters
    fsdp.py      FSDP2 (fully_shard) and DeepSpeed ZeRO through a generated config
    checkpointing.py  activation checkpointing (full and selective) applied to a built model
    tensor.py sequence.py context.py pipeline.py expert.py   model parallelism (tensor/sequence/context/pipeline/expert)
"""
