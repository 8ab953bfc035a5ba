"""Memory arithmetic: KV cache, model states, ZeRO, activations, pipeline bubbles (notes ch.02.13.c, 04.1,
04.4, 04.6, 04.11, 04.12).

Units are explicit: GiB = 2**30 bytes, GB = 10**9 bytes (the ZeRO paper and the notes' tables use GB).

- KV cache (02.13.c): 2 (K and V) · n_layer · H_kv · d_head · bytes · tokens · batch. LLaMA-2-7B in fp16:
  16 KiB per token per layer, 512 KiB per token, 2 GiB for 4096 tokens; GQA divides it by H / H_kv.
- Model states (ZeRO paper, Rajbhandari et al. 2020; 04.11.b): fp32 Adam keeps weight 4 + gradient 4 +
  momentum 4 + variance 4 = 16 bytes per parameter; mixed-precision Adam keeps fp16 weight 2 + fp16 gradient
  2 + K = 12 bytes of fp32 master weight, momentum and variance = 16Ψ (GPT-2 1.5B: 3 GB of fp16 weights,
  24 GB of states).
- ZeRO per-GPU model states over N data-parallel GPUs: stage 0 (2+2+K)Ψ; stage 1 (P_os) 4Ψ + KΨ/N;
  stage 2 (P_os+g) 2Ψ + (2+K)Ψ/N; stage 3 (P_os+g+p) (2+2+K)Ψ/N. Ψ = 7.5B, K = 12, N = 64:
  120 / 31.4 / 16.6 / 1.9 GB. Communication per step and GPU: 2Ψ elements for stages 0–2, 3Ψ for stage 3.
- Activations per Transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models"; 04.6.b), 16-bit activations, s = sequence, b = batch, h = hidden, a = heads,
  t = tensor-parallel size: no parallelism s·b·h·(34 + 5·a·s/h); tensor parallel s·b·h·(10 + 24/t + 5·a·s/(h·t));
  tensor + sequence parallel s·b·h·(34 + 5·a·s/h)/t. Selective recomputation drops the 5·a·s/h term (the
  attention scores, softmax and its dropout); full recomputation keeps only the layer input, 2·s·b·h.
- Pipeline bubbles (04.4), K = stages, M = micro-batches: naive (K−1)/K and GPipe/1F1B (K−1)/(K+M−1) are
  fractions of the step time; Megatron's interleaved schedule with v chunks per device is stated as bubble
  time over ideal time, (1/v)·(p−1)/m; `as_fraction_of_step` converts (b ↦ b/(1+b)).

Not covered: framework overheads (CUDA context, allocator fragmentation up to ~30%, communication buffers),
optimizers other than Adam/SGD, and the memory of MoE routing buffers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tinyllm.calc.params import resolve_config
from tinyllm.model.config import ModelConfig

GiB = 2**30
GB = 10**9

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "float32": 4, "tf32": 4, "fp16": 2, "float16": 2, "bf16": 2,
                                 "bfloat16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
PRECISIONS = ("fp32", "mixed")
OPTIMIZERS = {"adam": 8, "adamw": 8, "sgd_momentum": 4, "sgd": 0}  # fp32 optimizer-state bytes per parameter


def dtype_bytes(dtype: str | float) -> float:
    """Bytes per element of a dtype name ('fp16', 'bf16', 'int8', ...) or a number given as such."""
    if isinstance(dtype, (int, float)):
        value = float(dtype)
    elif str(dtype).lower() in DTYPE_BYTES:
        return DTYPE_BYTES[str(dtype).lower()]
    else:
        try:
            value = float(dtype)
        except ValueError:
            raise ValueError(f"dtype={dtype!r} is neither a byte count nor one of {sorted(DTYPE_BYTES)}") from None
    if not value > 0:
        raise ValueError(f"dtype={dtype!r} must be a positive number of bytes")
    return value


def _nonneg_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")


# ------------------------------------------------------------------ KV cache
def kv_cache_bytes_per_token(cfg: ModelConfig | str | os.PathLike, bytes_per_elem: float = 2) -> float:
    """2 · n_layer · H_kv · d_head · bytes: what one more token of context costs (512 KiB for LLaMA-7B fp16)."""
    cfg = resolve_config(cfg)
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes(bytes_per_elem)


def kv_cache_bytes(cfg: ModelConfig | str | os.PathLike, batch: int, seq_len: int,
                   bytes_per_elem: float = 2) -> int:
    """2 · n_layer · H_kv · d_head · bytes · seq_len · batch."""
    _nonneg_int("batch", batch)
    _nonneg_int("seq_len", seq_len)
    return round(kv_cache_bytes_per_token(cfg, bytes_per_elem) * seq_len * batch)


# ------------------------------------------------------------------ model states and ZeRO
@dataclass(frozen=True)
class ModelStates:
    """Bytes of weights, gradients and optimizer states (incl. an fp32 master copy in mixed precision)."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def weight_bytes(num_params: float, bytes_per_param: float = 2) -> float:
    """Bytes to store the weights (≈ checkpoint size, ≈ inference memory): 13B in fp16 → 26 GB."""
    return num_params * dtype_bytes(bytes_per_param)


def optimizer_bytes_per_param(precision: str = "mixed", optimizer: str = "adam") -> int:
    """K: optimizer-side bytes per parameter (mixed-precision Adam: 4 master + 4 momentum + 4 variance = 12)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[optimizer] + (4 if precision == "mixed" else 0)


def model_state_bytes(num_params: float, precision: str = "mixed", optimizer: str = "adam") -> ModelStates:
    """fp32: 4Ψ weights + 4Ψ gradients + optimizer states; mixed: 2Ψ + 2Ψ + KΨ (Adam: 16Ψ either way)."""
    if not num_params >= 0:
        raise ValueError(f"num_params={num_params!r} must be >= 0")
    k = optimizer_bytes_per_param(precision, optimizer)
    w = 4 if precision == "fp32" else 2
    return ModelStates(weights=w * num_params, gradients=w * num_params, optimizer=k * num_params)


def zero_model_state_bytes(num_params: float, num_gpus: int, stage: int, k: float = 12,
                           weight_bytes_per_param: float = 2, grad_bytes_per_param: float = 2) -> ModelStates:
    """Per-GPU model states under ZeRO stage 0–3 with N data-parallel GPUs (mixed precision, K = 12)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r} must be 0, 1, 2 or 3")
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus!r} must be a positive integer")
    n = num_gpus
    w = weight_bytes_per_param * num_params / (n if stage >= 3 else 1)
    g = grad_bytes_per_param * num_params / (n if stage >= 2 else 1)
    o = k * num_params / (n if stage >= 1 else 1)
    return ModelStates(weights=w, gradients=g, optimizer=o)


def zero_communication_elements(num_params: float, stage: int) -> float:
    """Elements each GPU sends per step: 2Ψ (reduce-scatter + all-gather of gradients) for stages 0–2,
    3Ψ for stage 3 (parameters are all-gathered again for the backward pass)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r} must be 0, 1, 2 or 3")
    return (3 if stage == 3 else 2) * num_params


def zero_communication_bytes(num_params: float, stage: int, bytes_per_elem: float = 2) -> float:
    """Bytes each GPU sends per step: the elements above times their width (fp16/bf16 gradients and
    parameters: 2 bytes). ZeRO-3 for a 65B model: 3Ψ = 195e9 elements = 390 GB, not the "195 GB per card" the
    notes give (they count one byte per element); 390 GB is 3120 Gb, 312 s on 10 Gb/s Ethernet, not 156 s."""
    return zero_communication_elements(num_params, stage) * dtype_bytes(bytes_per_elem)


def transfer_seconds(num_bytes: float, gbit_per_second: float) -> float:
    """Time to move `num_bytes` over a link of `gbit_per_second` (10 Gb/s Ethernet: 1.25 GB/s)."""
    if not gbit_per_second > 0:
        raise ValueError(f"gbit_per_second={gbit_per_second!r} must be > 0")
    return num_bytes * 8 / (gbit_per_second * 1e9)


# ------------------------------------------------------------------ activations
RECOMPUTE = ("none", "selective", "full")


def activation_bytes_per_layer(seq_len: int, batch: int, hidden: int, heads: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Stored activations of one Transformer layer in bytes (Korthikanti et al. 2022, 16-bit activations).

    none:      s·b·h·(34 + 5·a·s/h)                       (t = 1)
               s·b·h·(10 + 24/t + 5·a·s/(h·t))            (tensor parallel)
               s·b·h·(34 + 5·a·s/h)/t                     (tensor + sequence parallel)
    selective: the same without the 5·a·s/h term           (attention scores recomputed)
    full:      2·s·b·h (the layer input only; / t with sequence parallelism)
    """
    for name, v in (("seq_len", seq_len), ("batch", batch), ("hidden", hidden), ("heads", heads), ("tp", tp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {list(RECOMPUTE)}")
    sbh = seq_len * batch * hidden
    if recompute == "full":
        return 2 * sbh / (tp if sequence_parallel else 1)
    scores = 0.0 if recompute == "selective" else 5 * heads * seq_len / hidden
    if sequence_parallel:
        return sbh * (34 + scores) / tp
    return sbh * (10 + 24 / tp + scores / tp)


# ------------------------------------------------------------------ pipeline bubbles
def naive_pipeline_bubble(stages: int) -> float:
    """(K−1)/K: one micro-batch, only one of K stages busy at a time."""
    _check_pos("stages", stages)
    return (stages - 1) / stages


def gpipe_bubble(stages: int, micro_batches: int) -> float:
    """(K−1)/(K+M−1) of the step is idle (GPipe and non-interleaved 1F1B alike)."""
    _check_pos("stages", stages)
    _check_pos("micro_batches", micro_batches)
    return (stages - 1) / (stages + micro_batches - 1)


def interleaved_bubble(stages: int, micro_batches: int, chunks: int = 1) -> float:
    """(1/v)·(p−1)/m: bubble time over ideal compute time with v model chunks per device (Megatron).

    Megatron's schedule needs m to be a multiple of p when v > 1."""
    _check_pos("stages", stages)
    _check_pos("micro_batches", micro_batches)
    _check_pos("chunks", chunks)
    if chunks > 1 and micro_batches % stages:
        raise ValueError(f"micro_batches={micro_batches} must be a multiple of stages={stages} "
                         f"for the interleaved schedule")
    return (stages - 1) / (chunks * micro_batches)


def as_fraction_of_step(bubble_over_ideal: float) -> float:
    """Convert bubble/ideal time to bubble/total step time: b / (1 + b)."""
    return bubble_over_ideal / (1 + bubble_over_ideal)


def _check_pos(name: str, v: int) -> None:
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive integer")


def format_bytes(num_bytes: float) -> str:
    """'2.00 GiB = 2.15 GB (2,147,483,648 bytes)': binary and decimal units side by side."""
    return f"{num_bytes / GiB:,.2f} GiB = {num_bytes / GB:,.2f} GB ({round(num_bytes):,} bytes)"
