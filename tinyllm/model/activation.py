"""Activation functions (notes ch.01.12 and ch.02.6).

Registry `ACTIVATIONS`: name → callable, chosen when the model is built.

- silu / Swish₁:  x·σ(x)
- gelu (exact):   x·Φ(x) = x·(1 + erf(x/√2))/2
- gelu_tanh:      0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))   (GPT-2 / BERT-original approximation)
- relu:           max(0, x)
- relu2:          max(0, x)²   (Primer; transformers' "relu2")
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """The tanh formula written out, the oracle for `gelu_tanh`."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def relu2(x: torch.Tensor) -> torch.Tensor:
    """ReLU² (So et al. 2021, Primer): relu(x)², the speedrun's MLP activation; transformers' "relu2"."""
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": relu,
    "relu2": relu2,
}
