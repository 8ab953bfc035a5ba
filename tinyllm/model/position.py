"""Position encodings (notes ch.02.3).

Every variant is a module with three hooks the model calls once per forward; a variant that does not use a
hook returns None, so the forward never asks which variant it has:

- `embed(positions)   -> [B, T, d]`  added to the token embeddings (absolute encodings);
- `rotary(positions)  -> (cos, sin)` each [B, T, rotary_dim], applied to q and k in every layer (RoPE);
- `bias(q_pos, k_pos) -> [B, H, Tq, Tk]` added to the attention logits (ALiBi).

Variants (registry `POSITIONS`):

- learned absolute: a trainable [max_positions, d] table (BERT, GPT-2); no extrapolation past the table.
- sinusoidal (Vaswani et al. 2017), interleaved layout as in the notes:
  p[k, 2i] = sin(k / 10000^(2i/d)),  p[k, 2i+1] = cos(k / 10000^(2i/d)).
- RoPE (Su et al. 2021), "rotate-half" layout of HF LLaMA: with θ_i = base^(−2i/d) and m the position,
  q' = q·cos(mθ) + rotate_half(q)·sin(mθ), rotate_half([x1, x2]) = [−x2, x1]. Scaling of θ for long context
  (`rope_scaling.rope_type`):
  - linear (position interpolation): θ_i / factor.
  - dynamic NTK: when the sequence length L exceeds the trained length L0, the base becomes
    base·((factor·L/L0) − (factor − 1))^(d/(d−2)).
  - YaRN (Peng et al. 2023): per-dimension blend of interpolated (θ/factor) and original θ with a linear ramp
    between the dims that rotate beta_fast and beta_slow times over L0; cos/sin scaled by
    attention_factor = 0.1·ln(factor) + 1.
  - llama3: wavelengths λ = 2π/θ above L0/low_freq_factor are divided by factor, below L0/high_freq_factor
    kept, and smoothly interpolated between.
- ALiBi (Press et al. 2022): logit bias −m_h·|i − j| with head slopes m_h = 2^(−8h/n) for h = 1..n when n is a
  power of two; otherwise the slopes of the closest lower power of two 2^⌊log2 n⌋ followed by every other slope
  of 2·2^⌊log2 n⌋ (the paper's recipe).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinyllm.model.config import ModelConfig


class NoPosition(nn.Module):
    def embed(self, positions: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None


class LearnedPosition(NoPosition):
    """A trainable table of absolute position embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_positions = cfg.max_position_embeddings
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.max_positions:
            raise ValueError(f"position {int(positions.max())} is beyond the learned table "
                             f"(max_position_embeddings={self.max_positions})")
        return self.embed_positions(positions)


def sinusoidal_table(num_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """[num_positions, dim] with sin at even and cos at odd indices."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.float()


class SinusoidalPosition(NoPosition):
    """Fixed sin/cos absolute encodings, computed for any position on the fly."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim = cfg.hidden_size
        inv = 10000.0 ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        ang = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        out = torch.stack((torch.sin(ang), torch.cos(ang)), dim=-1)  # [B, T, d/2, 2]
        return out.flatten(-2)[..., : self.dim]  # [B, T, d]


# ------------------------------------------------------------------ RoPE
def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(dim: int, base: float, sc: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = sc.get("factor")
    orig = sc.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / orig

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = sc.get("attention_factor")
    if attn is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attn = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 → keep original θ (high-frequency dims)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn)


def _llama3(dim: int, base: float, sc: dict, max_pos: int) -> torch.Tensor:
    inv = rope_inv_freq(dim, base)
    factor = sc["factor"]
    low_ff, high_ff = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    orig = sc.get("original_max_position_embeddings") or max_pos
    low_wl, high_wl = orig / low_ff, orig / high_ff
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, scaled)


class RotaryPosition(NoPosition):
    """RoPE with optional linear / dynamic-NTK / YaRN / llama3 frequency scaling."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.base = cfg.rope_theta
        self.max_pos = cfg.max_position_embeddings
        sc = dict(cfg.rope_scaling or {"rope_type": "default"})
        self.rope_type = sc["rope_type"]
        self.factor = float(sc.get("factor") or 1.0)
        self.attention_scaling = 1.0
        if self.rope_type in ("default", "dynamic"):
            inv = rope_inv_freq(self.dim, self.base)
        elif self.rope_type == "linear":
            inv = rope_inv_freq(self.dim, self.base) / self.factor
        elif self.rope_type == "yarn":
            inv, self.attention_scaling = _yarn(self.dim, self.base, sc, self.max_pos)
        else:  # llama3
            inv = _llama3(self.dim, self.base, sc, self.max_pos)
        self.register_buffer("inv_freq", inv, persistent=False)

    def frequencies(self, seq_len: int) -> torch.Tensor:
        """θ for a forward whose largest position is seq_len − 1 (only dynamic NTK depends on it)."""
        if self.rope_type != "dynamic" or seq_len <= self.max_pos:
            return self.inv_freq
        base = self.base * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (
            self.dim / (self.dim - 2))
        return rope_inv_freq(self.dim, base).to(self.inv_freq.device)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # only dynamic NTK needs the largest position; reading it syncs and breaks torch.compile graphs
        inv = self.frequencies(int(positions.max()) + 1) if self.rope_type == "dynamic" else self.inv_freq
        ang = positions[..., None].float() * inv  # [B, T, dim/2]
        emb = torch.cat((ang, ang), dim=-1)  # [B, T, dim]
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _RotateHalf(torch.autograd.Function):
    """x·cos + rotate_half(x)·sin written half by half, with the transposed rotation as its backward.

    Forward  [y1, y2] = [x1·c1 − x2·s1, x2·c2 + x1·s2];  backward  [g1·c1 + g2·s2, g2·c2 − g1·s1]
    (c, s split like x). Two passes over x each way instead of the neg/cat/mul/mul/add of the formula and
    the matching autograd graph; equal to it to rounding (tested against HF LLaMA)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate_halves(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate_halves(grad, cos, sin, inverse=True), None, None


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    h = x.shape[-1] // 2
    x1, x2, c1, c2, s1, s2 = x[..., :h], x[..., h:], cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
    out = torch.empty_like(x)  # x's strides: q/k arrive as transposed views and the result keeps that layout
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, c1, out=o1)
    torch.mul(x2, c2, out=o2)
    if inverse:  # Rᵀ: the rotation by −θ
        o1.addcmul_(x2, s2)
        o2.addcmul_(x1, s1, value=-1.0)
    else:
        o1.addcmul_(x2, s1, value=-1.0)
        o2.addcmul_(x1, s2)
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [B, T, dim]; dims past `dim` (partial rotary) pass through."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [B, 1, T, dim]
    d = cos.shape[-1]
    if d == x.shape[-1]:
        # the half-by-half kernels pay off in eager fp32 (bf16 halves of a short head dim vectorise poorly on
        # CPUs); torch.compile fuses the formula by itself
        if (d % 2 == 0 and x.dtype == torch.float32 and not (cos.requires_grad or sin.requires_grad)
                and not torch.compiler.is_compiling()):
            return _RotateHalf.apply(x, cos, sin)
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


# ------------------------------------------------------------------ ALiBi
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes m_h from the ALiBi paper, for any head count."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))  # 2^(−8/n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


class AlibiPosition(NoPosition):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(cfg.num_attention_heads), persistent=False)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()  # [B, Tq, Tk]
        return -self.slopes[None, :, None, None] * dist[:, None]  # [B, H, Tq, Tk]


POSITIONS: dict[str, type[nn.Module]] = {
    "rope": RotaryPosition,
    "alibi": AlibiPosition,
    "sinusoidal": SinusoidalPosition,
    "learned": LearnedPosition,
    "none": NoPosition,
}


def build_position(cfg: ModelConfig) -> nn.Module:
    if cfg.position_type == "none":
        return NoPosition()
    return POSITIONS[cfg.position_type](cfg)
