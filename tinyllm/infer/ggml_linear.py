"""GGUF weights run as stored: llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks as the engine's linear layers (notes
ch.06 "quantization / deployment"; format: ggml's block quantization, see `tinyllm.model.gguf`).

`load_model` dequantizes a GGUF file to fp32; `quantization="int4"` then re-quantizes it on its own grid.
Both leave the bytes a decode step reads different from the file's. `use_gguf_blocks(model, path)` instead
replaces every linear layer whose GGUF tensor is Q4_0/Q4_1/Q8_0 by a `GGMLLinear` that keeps the block rows
exactly as the file stores them (20 B per 32 weights for Q4_1, 34 B for Q8_0) and multiplies with them
directly: the native kernel (`cpu_kernels.ggml_linear`) turns codes into floats in registers and never
writes a dequantized weight. A decode step therefore reads the same bytes per token as llama.cpp on the
same file. A tied LM head (SmolLM2) runs on the Q8_0 `token_embd` blocks; the embedding lookup keeps its
fp32 table (one row per token, not read per step).

Reference twin: `GGMLLinear.dequantize()` + `F.linear`, used for inputs of more than `NATIVE_MAX_ROWS` rows
(prefill: compute-bound, where BLAS wins), on non-CPU devices and when the kernels cannot be built; tests show
both agree to rounding. The dequantization is native and parallel where the kernels are loaded (numpy's took
~0.26 s of every prefill of SmolLM2's 210 block matrices at one thread) and equals the numpy dequantizer of
`model.gguf` (`dequantize_reference`) value for value. Activations: fp32 by
default here (`x_q8=False`: the dequantized model's arithmetic), or rounded to int8 blocks of 32 as llama.cpp
does (`x_q8=True`, what `LLM(..., quantization="gguf")` uses unless `gguf_activations="fp32"`): integer block dot
products, ~1.2x faster batch-1 decode on an AVX2 CPU, and llama.cpp's greedy text rather than the fp32
model's (SmolLM2-135M's MLP activations have outliers that int8 blocks round coarsely).
Not covered: k-quant kernels (Q4_K/Q6_K dequantize only), GPU kernels, writing GGUF.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.infer import cpu_kernels
from tinyllm.infer.cpu_kernels import GGML_NATIVE_TYPES, NATIVE_MAX_ROWS

_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


class GGMLLinear(nn.Module):
    """y = x ŵᵀ + b with ŵ held as GGUF blocks `blocks` uint8 [out, in/32 · block bytes] of `ggml_type`."""

    def __init__(self, ggml_type: str, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
                 native: bool = True, x_q8: bool = False) -> None:
        super().__init__()
        if ggml_type not in _BLOCK_BYTES:
            raise ValueError(f"ggml_type={ggml_type!r} is not one of {sorted(_BLOCK_BYTES)}")
        if in_features % 32:
            raise ValueError(f"in_features={in_features} is not a multiple of the 32-weight block")
        row = in_features // 32 * _BLOCK_BYTES[ggml_type]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row:
            raise ValueError(f"blocks must be uint8 [out, {row}] for {ggml_type} with in_features={in_features}, "
                             f"got {blocks.dtype} {tuple(blocks.shape)}")
        self.ggml_type, self.in_features, self.out_features = ggml_type, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.native = native and blocks.device.type == "cpu" and cpu_kernels.load()
        self.x_q8 = x_q8  # the kernel rounds x to int8 blocks as llama.cpp does (the reference path never does)

    def dequantize(self) -> torch.Tensor:
        """ŵ [out, in] fp32: native (`cpu_kernels.ggml_dequantize`, parallel) when the kernels are loaded, else
        `dequantize_reference`; the same values (tested)."""
        if self.native and self.blocks.device.type == "cpu":
            return cpu_kernels.ggml_dequantize(self.blocks, self.ggml_type)
        return self.dequantize_reference()

    def dequantize_reference(self) -> torch.Tensor:
        """The reference ŵ [out, in] fp32, through `model.gguf.dequantize` (numpy)."""
        from tinyllm.model.gguf import dequantize

        w = dequantize(self.blocks.cpu().numpy(), self.ggml_type)
        return torch.from_numpy(w).view(self.out_features, self.in_features).to(self.blocks.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.device.type == "cpu" and x.numel() <= NATIVE_MAX_ROWS * self.in_features:
            y = cpu_kernels.ggml_linear(x.reshape(-1, self.in_features), self.blocks, self.ggml_type, self.x_q8)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={self.ggml_type}"
                + (", x_q8=True" if self.x_q8 else ""))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), computed so that x + 0.5 rounding up in fp32 cannot carry
    0.49999997 to 1."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def quantize_blocks(w: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """fp32 weights [N, K] (K a multiple of 32) → ggml blocks uint8 [N, K/32 · block bytes], as llama.cpp's
    reference quantizers write them (tested byte-equal to `gguf.quants.quantize`):

      Q8_0: d = max|w| / 127 (fp16), q = roundf(w / d) ∈ [−127, 127];                         ŵ = d·q
      Q4_1: d = (max w − min w) / 15 (fp16), m = min w (fp16), q = trunc((w − m)/d + ½) ∈ [0, 15]; ŵ = d·q + m
            (codes from the fp32 d and m; nibble j of a byte is column j, the high nibble column j + 16)
    """
    if ggml_type not in ("Q4_1", "Q8_0"):
        raise ValueError(f"ggml_type={ggml_type!r}: quantize_blocks writes Q4_1 or Q8_0")
    if w.dim() != 2 or w.shape[1] % 32:
        raise ValueError(f"w must be [N, K] with K a multiple of 32, got {tuple(w.shape)}")
    n = w.shape[0]
    b = w.detach().float().cpu().reshape(-1, 32)
    if ggml_type == "Q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d == 0, torch.zeros_like(b), b / d)
        codes = _round_half_away(q).to(torch.int8).view(torch.uint8)
        return torch.cat([d.half().view(torch.uint8), codes], dim=1).reshape(n, -1)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((b - lo) * inv + 0.5).to(torch.uint8).clamp_(0, 15)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8), packed], dim=1).reshape(n, -1)


def use_gguf_blocks(model: nn.Module, path: str | os.PathLike, native: bool = True, x_q8: bool = False) -> nn.Module:
    """Replace, in place, every `nn.Linear` of `model` (loaded from the GGUF file `path`) whose tensor the
    file stores as Q4_0/Q4_1/Q8_0 by a `GGMLLinear` on those blocks; a tied LM head gets the embedding's
    blocks (the tie is broken: the embedding keeps its fp32 table for lookups). `x_q8`: the kernels round
    activations to int8 blocks, as llama.cpp does. Returns the model."""
    from tinyllm.model.gguf import read_gguf_blocks

    blocks = read_gguf_blocks(path, tuple(GGML_NATIVE_TYPES))
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and "model.embed_tokens.weight" in blocks:
        blocks.setdefault("lm_head.weight", blocks["model.embed_tokens.weight"])
    replaced = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or f"{name}.weight" not in blocks:
            continue
        ggml_type, rows = blocks[f"{name}.weight"]
        if rows.shape[0] != mod.out_features or mod.in_features % 32:
            raise ValueError(f"{path}: {name} is [{mod.out_features}, {mod.in_features}] in the model but "
                             f"{ggml_type} [{rows.shape[0]}, …] in the file")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, GGMLLinear(ggml_type, rows.to(mod.weight.device), mod.in_features, mod.bias, native,
                                               x_q8))
        replaced += 1
    if not replaced:
        raise ValueError(f"{path}: no linear layer is stored as {sorted(GGML_NATIVE_TYPES)}")
    return model
