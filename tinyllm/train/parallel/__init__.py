"""Distributed training (notes ch.04), each strategy a wrapper applied from outside the model.

    dist.py      process group from torchrun's environment, backend by device, rank helpers, fail-fast errors
    config.py    ParallelConfig: which strategy and which degrees (dp × tp × pp × cp × ep = world size)
    ddp.py       data parallel: torch DDP with no_sync accumulation, and a bucketed all-reduce teaching version
    zero.py      ZeRO-1/2/3: sharded optimizer state, reduce-scattered gradients, all-gathered parameters
    fsdp.py      FSDP2 (fully_shard) and DeepSpeed ZeRO through a generated config
    checkpointing.py  activation checkpointing (full and selective) applied to a built model
    tensor.py    Megatron tensor parallel: column/row-parallel linears (f/g), heads with GQA, vocab-parallel CE
    sequence.py  sequence parallel inside TP: all-gather / reduce-scatter along T around the blocks
    context.py   context parallel: ring attention with the online-softmax merge
    pipeline.py  pipeline parallel: GPipe / 1F1B over send/recv, schedule simulator, measured bubble
    expert.py    expert parallel for MoE: all-to-all dispatch/combine (all-gather fallback)
    layout.py    checkpoints across layouts: gather TP/PP shards to the full HF state dict, shard a full one
    check.py     `tinyllm parallel check` (a strategy against one process, under torchrun) and `parallel schedule`
"""
