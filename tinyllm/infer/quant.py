"""Weight-only quantization as a model transformation (notes ch.06.2 Q3 "INT8 vs FP16", ch.06.3.h
"quantization", ch.06.7 MLC "group quantization"; papers: Dettmers et al. 2022 "LLM.int8()" for per-channel
absmax int8, Frantar et al. 2022 "GPTQ" / Lin et al. 2023 "AWQ" for the group-wise int4 storage format, which
is also llama.cpp's Q4_1 block format).

`quantize_model(model, method, group_size)` replaces every `nn.Linear` (except `skip`) by a `QuantLinear`
holding integer weights plus scales; activations stay in floating point, and the matmul runs on the
dequantized weight (or on a packed-weight kernel of torch, tested equal). Formulas, per output row:

  int8, per-channel absmax   s = max_j |w_j| / 127,       q = round(w / s) ∈ [−127, 127],   ŵ = s·q
  int4, group-wise min/max   per group G of `group_size` input columns
                             s = (max_G w − min_G w) / 15,  q = round((w − min_G) / s) ∈ [0, 15],
                             ŵ = s·q + min_G          (asymmetric; the zero point is kept as the float min,
                                                       as in llama.cpp Q4_1 and torch's int4 CPU kernel)

Both round to nearest, so |w − ŵ| ≤ s/2 for every element (tested). Two int4 codes are packed per byte
(even column in the low nibble). Storage per weight: int8 1 B + 4/in_features B; int4 0.5 B + 8/group_size B
(fp32 scale and min). A row whose width is not a multiple of group_size is padded with zeros to the next
group (padding is never read back).

The notes only name the ideas (weights dequantized for compute because GPUs lack INT8×FP16 units; LLM.int8()
keeps outlier activations in higher precision; SmoothQuant-like range migration); GPTQ/AWQ/SmoothQuant are not
described there. Not covered: activation quantization (W8A8), outlier decomposition, calibration-based
rounding (GPTQ, AWQ), NF4/double quantization (see the LoRA chapter), quantized embeddings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.infer import cpu_kernels
from tinyllm.infer.cpu_kernels import NATIVE_MAX_ROWS, int4_linear, int8_linear

METHODS = ("int8", "int4")
# llama.cpp's block formats, written from the fp32 weights (`ggml_linear.quantize_blocks`) and run as stored by
# `GGMLLinear` with activations rounded to int8 blocks, as llama.cpp computes them
BLOCK_METHODS = {"q4_1": "Q4_1", "q8_0": "Q8_0"}
GROUP_SIZES = (32, 64, 128)


# ------------------------------------------------------------------ tensor-level reference
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (q int8 [N, K], scale fp32 [N]) with ŵ = scale[:, None] · q."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 15] (K even) → uint8 [N, K/2], column 2j in the low nibble, 2j+1 in the high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] → codes uint8 [N, K] (inverse of pack_int4)."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)  # interleave back: [N, K/2, 2] → [N, K]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] → (packed uint8 [N, Kp/2], scale fp32 [N, Kp/g], min fp32 [N, Kp/g]); Kp = K rounded up to g."""
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    wg = F.pad(w.float(), (0, kp - k)).view(n, kp // group_size, group_size)  # [N, groups, g]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, ŵ = min exactly
    codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return pack_int4(codes.view(n, kp)), scale, lo


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, in_features: int) -> torch.Tensor:
    n, groups = scale.shape
    codes = unpack_int4(packed).float().view(n, groups, -1)  # [N, groups, g]
    w = codes * scale[..., None] + lo[..., None]
    return w.view(n, -1)[:, :in_features]


# ------------------------------------------------------------------ the module
def _kernel_available(method: str) -> bool:
    if method == "int8":
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


class QuantLinear(nn.Module):
    """A weight-only quantized `nn.Linear`: y = x ŵᵀ + b with ŵ from integer codes and fp32 scales.

    `native=True` (default) sends inputs of at most `cpu_kernels.NATIVE_MAX_ROWS` rows (decode steps) through
    tinyllm's own int8/int4 matrix–vector kernels, which read each code once (`cpu_kernels`; off when they
    cannot be built). `use_kernel=True` runs torch's packed-weight CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
    instead of dequantize + `F.linear`; int4 then also keeps the kernel's own packing (+0.5 B per weight), and
    only for out_features divisible by 16 (the kernel's tile), other layers silently keep the reference path.
    """

    def __init__(self, linear: nn.Linear, method: str = "int8", group_size: int = 128,
                 use_kernel: bool = False, native: bool = True) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
        if method == "int4" and group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r} is not one of {list(GROUP_SIZES)}")
        if use_kernel and not _kernel_available(method):
            raise ValueError(f"use_kernel=True but this torch ({torch.__version__}) has no {method} packed kernel")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.method, self.group_size, self.use_kernel = method, group_size, use_kernel
        w = linear.weight.detach()
        self.dtype = w.dtype
        if method == "int8":
            q, scale = quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        else:
            packed, scale, lo = quantize_int4(w, group_size)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", lo)
            # the int4 kernel takes N in multiples of 16; other shapes keep the dequantize path
            self.use_kernel = use_kernel and self.out_features % 16 == 0
            if self.use_kernel:
                self._build_int4_kernel_weight()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # few-row inputs (decode) through the native matrix–vector kernels when they build; see cpu_kernels
        self.native = native and w.device.type == "cpu" and cpu_kernels.load()

    def _build_int4_kernel_weight(self) -> None:
        codes = unpack_int4(self.qweight).to(torch.int32)  # [N, Kp]
        self.register_buffer("kernel_weight", torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                             persistent=False)
        # the kernel computes ŵ = (q − 8)·s + z, so z = min + 8·s; layout [groups, N, 2]
        sz = torch.stack([self.scale.t(), (self.zero + 8 * self.scale).t()], dim=-1).contiguous()
        self.register_buffer("kernel_scale_zero", sz, persistent=False)

    def dequantize(self) -> torch.Tensor:
        """The reference ŵ [out, in] in fp32."""
        if self.method == "int8":
            return dequantize_int8(self.qweight, self.scale)
        return dequantize_int4(self.qweight, self.scale, self.zero, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """ŵ in the original dtype (materialized on every access; code that only peeks at .device/.dtype works)."""
        return self.dequantize().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.device.type == "cpu" and x.numel() <= NATIVE_MAX_ROWS * self.in_features:
            return self._native_forward(x)
        if self.use_kernel and x.device.type == "cpu":
            return self._kernel_forward(x)
        y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.method == "int8":
            y = int8_linear(x2, self.qweight, self.scale)
        else:
            kp = self.qweight.shape[1] * 2
            if kp != self.in_features:
                x2 = F.pad(x2, (0, kp - self.in_features))  # padded columns must meet zeros
            y = int4_linear(x2, self.qweight, self.scale, self.zero, self.group_size)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        if self.method == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale.to(x.dtype))
        else:
            kp = self.qweight.shape[1] * 2
            if kp != self.in_features:  # the padded columns dequantize to min ≠ 0: feed them zeros
                x2 = F.pad(x2, (0, kp - self.in_features))
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.kernel_weight, self.group_size,
                                                  self.kernel_scale_zero.to(x.dtype))
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{g}"


# ------------------------------------------------------------------ the transformation
def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A module is skipped when a skip entry is a run of whole dotted components of its name
    ("lm_head", "mlp", "layers.3", "model.layers.0.self_attn.q_proj"), never a partial word."""
    return any(f".{s}." in f".{name}." for s in skip)


def quantize_model(model: nn.Module, method: str = "int8", group_size: int = 128,
                   skip: Iterable[str] = ("lm_head",), use_kernel: bool = False, untie: bool = False,
                   inplace: bool = True, native: bool = True) -> nn.Module:
    """Replace every `nn.Linear` of `model` (except those matched by `skip`) by a `QuantLinear` (`method` "int8",
    "int4") or by a `GGMLLinear` on llama.cpp blocks ("q4_1", "q8_0": integer block products with activations
    rounded to int8, as llama.cpp's CPU backend computes; in_features must be a multiple of 32); return the model.

    A Linear whose weight is shared with another module (tied embeddings) is refused unless `untie=True`
    (the other module then keeps the full-precision weight, so the tie is broken knowingly and nothing is
    saved for that matrix). `inplace=False` quantizes a deep copy and leaves `model` untouched.
    """
    if method not in METHODS and method not in BLOCK_METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS) + list(BLOCK_METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not one of {list(GROUP_SIZES)}")
    skip = tuple(skip)
    if not inplace:
        model = copy.deepcopy(model)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not _skipped(name, skip)]
    for name, mod in targets:
        shared = [o for o in owners[id(mod.weight)] if o != f"{name}.weight"]
        if shared and not untie:
            raise ValueError(f"{name}.weight is tied to {shared}; quantizing it breaks the tie. Add "
                             f"{name!r} to skip (the default skips 'lm_head') or pass untie=True")
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _block_linear(name, mod, method, native) if method in BLOCK_METHODS
                else QuantLinear(mod, method, group_size, use_kernel, native))
    return model


def _block_linear(name: str, mod: nn.Linear, method: str, native: bool) -> nn.Module:
    from tinyllm.infer.ggml_linear import GGMLLinear, quantize_blocks

    if mod.in_features % 32:
        raise ValueError(f"{name}: in_features={mod.in_features} is not a multiple of the 32-weight block of "
                         f"{method}")
    blocks = quantize_blocks(mod.weight, BLOCK_METHODS[method]).to(mod.weight.device)
    return GGMLLinear(BLOCK_METHODS[method], blocks, mod.in_features, mod.bias, native, x_q8=True)


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared tensor counted once (tied embeddings)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        # by address and size, not storage: disjoint views of one storage (fused weights) all count
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
