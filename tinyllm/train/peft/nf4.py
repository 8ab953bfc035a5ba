"""NF4 with double quantization: QLoRA's frozen 4-bit base weights (notes ch.05.6.c; Dettmers et al. 2023).

NormalFloat-4 (NF4). Pretrained weights are roughly N(0, σ²) per block, so the 16 code values are chosen as
quantiles of a standard normal, each holding an equal share of probability mass, rescaled to [−1, 1]. The
paper makes zero exactly representable by building the two halves separately: 8 positive values from the
quantiles at probabilities linspace(δ, ½, 9)[:-1], 7 negative ones from linspace(δ, ½, 8)[:-1], plus 0,
δ = 0.9677083 ≈ 1 − ½(1/30 + 1/32), then divides by the largest — `nf4_code_values()` rebuilds them and the
test checks them against the table the paper (appendix E) and bitsandbytes print, `NF4_CODE`.

Block-wise quantization (block size 64): each block of 64 weights stores c = absmax(block) in fp32 and per
weight the index of the code value nearest to w/c (4 bits, two per byte, first weight in the high nibble as
bitsandbytes packs them). Dequantization: w ≈ c · NF4_CODE[index]. The error of one weight is at most half
the widest gap between neighbouring codes (−1 to −0.6962) times c: |w − ŵ| ≤ 0.1519·c.

Double quantization (DQ): the fp32 constants c cost 32/64 = 0.5 bit per weight. Subtract their mean μ (as
bitsandbytes does: constants are all positive, so centring them spends the 8 bits on the spread), then
quantize c − μ block-wise again: blocks of 256, one fp32 scale s₂ = absmax per block, and each constant
stored as a signed int8 q = round(127·(c − μ)/s₂). (bitsandbytes stores an 8-bit index into its "dynamic"
float-like code instead of a linear int8 — the same budget; tinyllm keeps the linear one and states its
bound: |c − ĉ| ≤ s₂/254.) Bits per weight:

    NF4 alone   4 + 32/64                  = 4.5
    NF4 + DQ    4 + 8/64 + 32/(64·256)     ≈ 4.127   (plus one fp32 μ per tensor)

`NF4Linear` holds those buffers and dequantizes on the fly in forward; its autograd function recomputes the
weight in backward instead of saving it, so a frozen base costs its 4.127 bits between steps and during
backward alike (the gradient w.r.t. the input needs W, the gradient w.r.t. W is never formed). Compute runs
in the input's dtype (bf16 under autocast).
"""

from __future__ import annotations

import torch
from torch import nn

BLOCK_SIZE = 64
DQ_BLOCK_SIZE = 256
NF4_OFFSET = 0.9677083  # ≈ 1 − ½(1/30 + 1/32), rounded as bitsandbytes has it

# QLoRA paper appendix E / bitsandbytes `get_4bit_type("nf4")`, index order = the 4-bit code
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # decision boundaries between neighbouring codes


def nf4_code_values() -> torch.Tensor:
    """The 16 NF4 values built from normal quantiles (float64), as the paper constructs them."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.abs().max()


def bits_per_parameter(double_quant: bool = True, block_size: int = BLOCK_SIZE,
                       dq_block_size: int = DQ_BLOCK_SIZE) -> float:
    """4 + 32/64 = 4.5 without DQ; 4 + 8/64 + 32/(64·256) ≈ 4.127 with it."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * dq_block_size)
    return 4 + 32 / block_size


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.numel()) % multiple
    return torch.cat([x, x.new_zeros(extra)]) if extra else x


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """Block-wise NF4 (+ DQ) of any float tensor → {packed uint8, absmax (fp32) or absmax_q int8 + absmax_scale
    fp32 + absmax_offset fp32, shape}. Blocks are taken over the flattened tensor (zero-padded at the end)."""
    if block_size % 2 or block_size <= 0:
        raise ValueError(f"block_size={block_size} must be a positive even number")
    if not w.is_floating_point():
        raise ValueError(f"quantize_nf4 needs a float tensor, got {w.dtype}")
    flat = _pad_to(w.detach().reshape(-1).float(), block_size).view(-1, block_size)  # [nblocks, 64]
    absmax = flat.abs().amax(dim=1)  # [nblocks]
    scaled = flat / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    idx = torch.bucketize(scaled, _MIDPOINTS.to(flat.device), out_int32=True).to(torch.uint8).view(-1)  # nearest
    packed = (idx[0::2] << 4) | idx[1::2]
    out = {"packed": packed, "shape": torch.tensor(list(w.shape), dtype=torch.int64),
           "block_size": torch.tensor(block_size)}
    if double_quant:
        out.update(_quantize_absmax(absmax))
    else:
        out["absmax"] = absmax
    return out


def _quantize_absmax(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    offset = absmax.mean()
    centred = _pad_to(absmax - offset, DQ_BLOCK_SIZE).view(-1, DQ_BLOCK_SIZE)
    scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # [nblocks / 256]
    q = torch.round(centred / scale[:, None] * 127).to(torch.int8).view(-1)[: absmax.numel()]
    return {"absmax_q": q, "absmax_scale": scale, "absmax_offset": offset.reshape(1)}


def dequantize_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    if "absmax" in state:
        return state["absmax"]
    q = state["absmax_q"]
    scale = state["absmax_scale"].repeat_interleave(DQ_BLOCK_SIZE)[: q.numel()]
    return q.float() / 127 * scale + state["absmax_offset"]


_PAIR_LUT: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _pair_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the two code values a packed byte stands for (high nibble first)."""
    key = (device, dtype)
    if key not in _PAIR_LUT:
        b = torch.arange(256)
        _PAIR_LUT[key] = torch.stack([NF4_CODE[b >> 4], NF4_CODE[b & 0xF]], dim=1).to(device, dtype)
    return _PAIR_LUT[key]


def dequantize_nf4_reference(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = absmax_block · NF4_CODE[index], unpacking nibble by nibble: the oracle of dequantize_nf4."""
    packed = state["packed"]
    idx = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1).long()  # [n_padded]
    values = NF4_CODE.to(packed.device)[idx].view(-1, int(state["block_size"])) * dequantize_absmax(state)[:, None]
    return values.view(-1)[: _numel(state)].view(_shape(state)).to(dtype)


def _shape(state: dict[str, torch.Tensor]) -> list[int]:
    return [int(s) for s in state["shape"]]


def _numel(state: dict[str, torch.Tensor]) -> int:
    n = 1
    for s in _shape(state):
        n *= s
    return n


def dequantize_nf4(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = absmax_block · NF4_CODE[index] in `dtype`, reshaped to the original shape.

    Fast path: one lookup per byte in a [256, 2] table of code pairs (int32 indices), then one in-place scale
    per block — about 1.5× the output's bytes of temporaries instead of ~4× for nibble-wise unpacking."""
    packed = state["packed"]
    pairs = _pair_lut(packed.device, dtype).index_select(0, packed.int())  # [n_padded / 2, 2]
    block = int(state["block_size"])
    values = pairs.view(-1, block).mul_(dequantize_absmax(state).to(dtype)[:, None])
    n = _numel(state)
    out = values.view(-1)
    return (out if out.numel() == n else out[:n]).view(_shape(state))


def nf4_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the stored quantized weight (packed codes + constants)."""
    keys = ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_offset")
    return sum(state[k].numel() * state[k].element_size() for k in keys if k in state)


class _NF4Matmul(torch.autograd.Function):
    """y = x·Ŵᵀ with Ŵ dequantized in forward and again in backward (never saved): W is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        w = layer.dequantize(x.dtype)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.layer.dequantize(grad.dtype)
        return grad @ w, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored as NF4 (+ DQ) and dequantized on the fly."""

    def __init__(self, linear: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        for k, v in quantize_nf4(linear.weight, block_size, double_quant).items():
            self.register_buffer(k, v)
        self.quantized_numel = linear.weight.numel()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.state(), dtype or self.compute_dtype or torch.float32)

    def nbytes(self) -> int:
        return nf4_nbytes(self.state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else (self.compute_dtype or x.dtype)
        with torch.autocast(dev, enabled=False):
            y = _NF4Matmul.apply(x.to(dtype), self)
            if self.bias is not None:
                y = y + self.bias.to(dtype)
        return y

    def extra_repr(self) -> str:
        dq = "absmax_q" in self.state()
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, double_quant={dq}"
