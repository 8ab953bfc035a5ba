"""Small shared helpers: seeding, device and dtype choice."""

from __future__ import annotations

import random

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def require_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError naming `name` unless `value` is an int (not a bool) ≥ `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a valid torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available")
    return dev


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`name` if given; else bf16 on CUDA and fp32 on CPU. fp16 on CPU is refused (it is ~100× slower there)."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.float16 and device.type == "cpu":
        raise ValueError("dtype=float16 on CPU is not supported (use float32 or bfloat16)")
    return dtype
