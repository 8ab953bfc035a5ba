"""Compute arithmetic: forward/training FLOPs, Chinchilla budgets, GPU utilisation (notes ch.02.5, 04.1.b).

Forward FLOPs per token (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1):

    C_forward ≈ 2·N + 2·n_layer·n_ctx·d_attn

N is the non-embedding parameter count (each weight is one multiply and one add per token); the second term
is attention over the context: for a causal sequence of n_ctx tokens, token t scores t keys (QKᵀ) and mixes
t values (AV), 4·t·d_attn FLOPs per layer, whose average over the sequence is 2·n_ctx·d_attn. An encoder
(BERT) attends to all n_ctx keys, so its term is 4·n_layer·n_ctx·d_attn; so is the count of a kernel that
computes the full square and masks it afterwards. Here N also includes the output head's matmul (2·h·V per
token, tied or not, as Kaplan's "de-embed" row) and, for MoE, only the k experts a token is routed to.

Training FLOPs: the backward pass costs twice the forward (gradients w.r.t. activations and weights), so

    C_train ≈ 3·C_forward·D = 6·N·D + 6·n_layer·n_ctx·d_attn·D

for D training tokens; `six_nd` is the plain 6·N·D of the Chinchilla table (N = all parameters).

Chinchilla (Hoffmann et al. 2022): the compute-optimal model sees D ≈ 20·N tokens, so for a budget C = 6·N·D,
N = sqrt(C / 120) and D = 20·N. `CHINCHILLA_TABLE` is the notes' table (02.5.a); C = 6·N·D reproduces it
within 0.2% except 175B (0.9%) and 67B (4.7%, the table's FLOPs equal Gopher's 5.76e23).

GPU utilisation (04.1.b): achieved / peak FLOP/s (100 of A100's 312 TFLOP/s = 32.05%), or throughput
against a reference (3 samples/s · 2048 tokens / 4 GPUs = 1536 tokens/s/GPU vs LLaMA's 3300 = 46.54%);
model-FLOPs utilisation (MFU, PaLM) = 6·N·tokens/s / peak.

Not covered: recomputation FLOPs (activation checkpointing adds about one forward), sparse/sliding-window
attention savings, and measured hardware peaks.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from tinyllm.calc.params import count_parameters, resolve_config
from tinyllm.model.config import ModelConfig

GOPHER_FLOPS = 5.76e23  # training compute of Gopher 280B, the unit of the Chinchilla table
A100_BF16_PEAK = 312e12  # dense bf16/fp16 tensor-core FLOP/s of an A100


class ChinchillaRow(NamedTuple):
    params: float
    flops: float
    tokens: float


# Hoffmann et al. 2022, Table 3 as quoted in the notes: parameters, FLOPs, compute-optimal tokens
CHINCHILLA_TABLE: tuple[ChinchillaRow, ...] = (
    ChinchillaRow(400e6, 1.92e19, 8.0e9),
    ChinchillaRow(1e9, 1.21e20, 20.2e9),
    ChinchillaRow(10e9, 1.23e22, 205.1e9),
    ChinchillaRow(67e9, 5.76e23, 1.5e12),
    ChinchillaRow(175e9, 3.85e24, 3.7e12),
    ChinchillaRow(280e9, 9.90e24, 5.9e12),
    ChinchillaRow(520e9, 3.43e25, 11.0e12),
    ChinchillaRow(1e12, 1.27e26, 21.2e12),
    ChinchillaRow(10e12, 1.30e28, 216.2e12),
)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")


def attention_flops_per_token(cfg: ModelConfig | str | os.PathLike, context: int,
                              causal: bool | None = None) -> int:
    """2·n_layer·n_ctx·d_attn (causal average, Kaplan), or twice that for full attention.

    `causal=None` means causal for decoders and full for encoders. d_attn counts query heads (H·d_head):
    GQA shares K/V heads but every query head still scores every key."""
    cfg = resolve_config(cfg)
    if context < 0:
        raise ValueError(f"context={context} must be >= 0")
    causal = not cfg.is_encoder if causal is None else causal
    d_attn = cfg.num_attention_heads * cfg.head_dim
    return (2 if causal else 4) * cfg.num_hidden_layers * context * d_attn


def forward_flops_per_token(cfg: ModelConfig | str | os.PathLike, context: int = 0, *,
                            include_head: bool = True, causal: bool | None = None) -> int:
    """C_forward = 2·N_active_non_embedding + 2·h·V (output head) + attention term."""
    cfg = resolve_config(cfg)
    n = count_parameters(cfg).active_non_embedding
    head = 2 * cfg.hidden_size * cfg.vocab_size if include_head and not cfg.is_encoder else 0
    return 2 * n + head + attention_flops_per_token(cfg, context, causal)


def training_flops(cfg: ModelConfig | str | os.PathLike, tokens: float, context: int = 0, *,
                   include_head: bool = True) -> float:
    """C_train ≈ 3·C_forward·D = 6·N·D + 6·n_layer·n_ctx·d_attn·D (backward = 2× forward)."""
    _positive("tokens", tokens)
    return 3.0 * forward_flops_per_token(cfg, context, include_head=include_head) * tokens


def six_nd(num_params: float, tokens: float) -> float:
    """The rule of thumb C = 6·N·D (N parameters trained on D tokens)."""
    _positive("num_params", num_params)
    _positive("tokens", tokens)
    return 6.0 * num_params * tokens


def chinchilla_tokens(num_params: float, tokens_per_param: float = 20.0) -> float:
    """Compute-optimal training tokens D ≈ 20·N."""
    _positive("num_params", num_params)
    _positive("tokens_per_param", tokens_per_param)
    return tokens_per_param * num_params


def compute_optimal(flops: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """(N, D) that spend `flops` = 6·N·D with D = tokens_per_param·N: N = sqrt(C / (6·r))."""
    _positive("flops", flops)
    _positive("tokens_per_param", tokens_per_param)
    n = math.sqrt(flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


def gopher_units(flops: float) -> float:
    """Compute in units of Gopher's training budget (the Chinchilla table's third column)."""
    return flops / GOPHER_FLOPS


def utilization(achieved: float, peak: float) -> float:
    """achieved / peak as a fraction: FLOP/s against the hardware peak, or tokens/s against a reference."""
    _positive("peak", peak)
    if achieved < 0:
        raise ValueError(f"achieved={achieved!r} must be >= 0")
    return achieved / peak


def tokens_per_second_per_gpu(samples_per_second: float, seq_len: int, num_gpus: int = 1) -> float:
    """Throughput per GPU from a trainer's samples/s over all GPUs (3 · 2048 / 4 = 1536)."""
    _positive("num_gpus", num_gpus)
    return samples_per_second * seq_len / num_gpus


def model_flops_utilization(num_params: float, tokens_per_second: float, peak_flops: float = A100_BF16_PEAK,
                            flops_per_token: float | None = None) -> float:
    """MFU = (FLOPs the model needs per token · tokens/s) / peak FLOP/s; default 6·N FLOPs per token."""
    _positive("num_params", num_params)
    per_token = 6.0 * num_params if flops_per_token is None else flops_per_token
    return utilization(per_token * tokens_per_second, peak_flops)
