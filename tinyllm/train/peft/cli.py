"""`tinyllm merge-adapter --base PATH --adapter DIR --out DIR`: fold a LoRA adapter into its base weights.

W = W₀ + (α/r)·B·A for every adapted linear, then the LoRA wrappers are removed and the result is saved as
an ordinary HF checkpoint (transformers loads it; inference pays no adapter cost). The adapter directory may
come from tinyllm or from HF PEFT. An NF4 (QLoRA) adapter merges into the full-precision base, the usual
practice: the merged weight is W₀ + ΔW, not its 4-bit approximation. Soft prompts, bottleneck adapters and
BitFit's added biases have no weight to fold into and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tinyllm.train.pretrain import copy_tokenizer_files


@dataclass
class MergeAdapterConfig:
    base: str = field(default="", metadata={"help": "base checkpoint: HF directory, .gguf file or short name"})
    adapter: str = field(default="", metadata={"help": "LoRA adapter directory (PEFT or tinyllm)"})
    out: str = field(default="", metadata={"help": "output directory for the merged HF checkpoint"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the saved weights",
                                                     "choices": ["float32", "bfloat16", "float16"]})

    def __post_init__(self) -> None:
        for name in ("base", "adapter", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}='' : pass --{name}")


def run_merge_adapter(cfg: MergeAdapterConfig) -> Path:
    import torch

    from tinyllm.model.hf import load_model, save_pretrained
    from tinyllm.train.peft.io import AdapterError, load_adapter, read_adapter_config
    from tinyllm.train.peft.lora import merge_and_unload

    kind = read_adapter_config(cfg.adapter)["peft_type"]
    if kind != "LORA":
        raise AdapterError(f"{cfg.adapter}: peft_type={kind!r} has no weight to merge into (LoRA only)")
    model = load_adapter(load_model(cfg.base), cfg.adapter)
    merged = merge_and_unload(model)
    out = save_pretrained(merged, cfg.out, dtype=getattr(torch, cfg.dtype))
    copy_tokenizer_files(cfg.base, out)
    print(f"merged {cfg.adapter} into {cfg.base} → {out}")
    return out
