"""QLoRA = frozen NF4 (+ double-quantized constants) base linears + LoRA adapters on top (notes ch.05.6.c).

`apply_qlora(model, LoraConfig(...), QLoraConfig(...))` replaces every nn.Linear of the decoder except the
output head by an `NF4Linear` (as `load_in_4bit` does; embeddings, norms and lm_head stay in their dtype),
then applies LoRA to the target modules. Gradients flow through the dequantized weights into the LoRA
factors (fp32 master copies; under bf16 autocast the matmuls run in bf16).

The paper's third ingredient, paged optimizers (CUDA unified memory paging optimizer states to the host on
a memory spike), is a CUDA driver feature with no CPU meaning and is not implemented.

`base_weight_memory(model)` answers the interview question "how much memory do the base weights take":
bytes of the quantizable linears as fp32, bf16, NF4 (4.5 bits) and NF4 + DQ (≈ 4.127 bits), measured from
the actual buffers after `apply_qlora`, or from the closed form before.
Why QLoRA trains slower than LoRA: every forward and backward dequantizes each weight again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tinyllm.train.peft.lora import LoraConfig, apply_lora
from tinyllm.train.peft.nf4 import BLOCK_SIZE, NF4Linear, bits_per_parameter
from tinyllm.train.peft.select import OUTPUT_HEADS, PEFT_PARTS, get_submodule_parent

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class QLoraConfig:
    block_size: int = BLOCK_SIZE
    double_quant: bool = True
    compute_dtype: str = "fp32"  # dtype of the dequantized weight when autocast is off

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"block_size={self.block_size!r} must be a positive even integer")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not one of {list(COMPUTE_DTYPES)}")


def quantizable_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] not in OUTPUT_HEADS
            and not (PEFT_PARTS - {"base_layer"}).intersection(n.split("."))]


def quantize_model_nf4(model: nn.Module, cfg: QLoraConfig | None = None) -> nn.Module:
    """Replace the decoder's linears (not lm_head) by frozen NF4Linear, in place; returns `model`."""
    cfg = cfg or QLoraConfig()
    for name in quantizable_linears(model):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, NF4Linear(getattr(parent, child), cfg.block_size, cfg.double_quant,
                                         COMPUTE_DTYPES[cfg.compute_dtype]))
    return model


def apply_qlora(model: nn.Module, lora: LoraConfig | None = None, quant: QLoraConfig | None = None,
                adapter_name: str = "default") -> nn.Module:
    """NF4-quantize the base linears, then add LoRA adapter `adapter_name` (in place; returns `model`)."""
    quantize_model_nf4(model, quant)
    apply_lora(model, lora or LoraConfig(), adapter_name)
    model.qlora_config = quant or QLoraConfig()  # type: ignore[assignment]
    return model


def base_weight_memory(model: nn.Module, block_size: int = BLOCK_SIZE) -> dict[str, Any]:
    """Bytes of the quantizable base linears in each storage format, and the bits per parameter.

    For NF4Linear layers the `nf4_dq_measured` entry is the sum of their real buffers."""
    numel, measured = 0, 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            numel += m.quantized_numel
            measured += m.nbytes()
    for name in quantizable_linears(model):
        mod = model.get_submodule(name)
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        numel += mod.weight.numel()
    out: dict[str, Any] = {
        "parameters": numel,
        "fp32": 4 * numel,
        "bf16": 2 * numel,
        "nf4": round(numel * bits_per_parameter(False, block_size) / 8),
        "nf4_dq": round(numel * bits_per_parameter(True, block_size) / 8),
        "bits_nf4": bits_per_parameter(False, block_size),
        "bits_nf4_dq": bits_per_parameter(True, block_size),
    }
    if measured:
        out["nf4_dq_measured"] = measured
        out["bits_measured"] = 8 * measured / numel
    return out
