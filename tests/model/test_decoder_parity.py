"""Decoder parity with transformers, both directions (notes ch.02.12–02.13; DESIGN §6).

HF → tinyllm: a tiny random transformers model is saved, loaded with `tinyllm.model.hf.load_model` and must give
the same fp32 logits. tinyllm → HF: a tinyllm model saved with `save_pretrained` must give the same logits in
`AutoModelForCausalLM.from_pretrained`. Covered: MHA/GQA/MQA, tied/untied head, every RoPE scaling type (dynamic
NTK past max_position_embeddings), llama biases, qwen2 (with and without its sliding window), mistral's sliding
window, and a left-padded batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import hf_config, randomize_
from transformers import AutoModelForCausalLM

from tinyllm.model.attention import build_attn_meta
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model, load_model, save_pretrained

ATOL = 1e-4
VOCAB = 128

# name → (family, HF config overrides, sequence length)
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "llama-mha": ("llama", dict(num_key_value_heads=4), 20),
    "llama-gqa": ("llama", {}, 20),
    "llama-mqa": ("llama", dict(num_key_value_heads=1), 20),
    "llama-tied": ("llama", dict(tie_word_embeddings=True), 20),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True), 20),
    "rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), 40),
    # 80 > max_position_embeddings=64, so the dynamic NTK base actually changes
    "rope-dynamic": ("llama", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), 80),
    "rope-yarn": ("llama", dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1e4}), 48),
    # wavelengths of head_dim 16 fall in all three llama3 bands (kept, smoothed, divided)
    "rope-llama3": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 1e4}), 40),
    "qwen2": ("qwen2", {}, 20),
    "mistral-window": ("mistral", dict(sliding_window=8), 24),
    # regression: export wrote max_window_layers=num_hidden_layers, so HF slid the window in no layer
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), 24),
}


def _ids(batch: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def _hf_load(path: Path, impl: str = "eager") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_tinyllm(case: str, tiny_hf_checkpoint) -> None:
    family, overrides, t = CASES[case]
    path = tiny_hf_checkpoint(family, **overrides)
    ids = _ids(2, t)
    ref = _hf_load(path)(ids).logits
    ours = load_model(path)(ids)
    assert ref.abs().max() > 1.0  # the weights are O(1), so a mapping bug cannot hide in tiny logits
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(CASES))
def test_tinyllm_to_hf(case: str, tmp_path: Path) -> None:
    family, overrides, t = CASES[case]
    cfg = ModelConfig.from_hf(hf_config(family, **overrides).to_dict())
    model = randomize_(build_model(cfg), seed=3).eval()
    save_pretrained(model, tmp_path / "ckpt")
    ids = _ids(2, t)
    ref = _hf_load(tmp_path / "ckpt")(ids).logits
    torch.testing.assert_close(model(ids), ref, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "sdpa", "tiled"])
@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window", "rope-yarn"])
def test_attention_backends_match_hf(case: str, impl: str, tiny_hf_checkpoint) -> None:
    family, overrides, t = CASES[case]
    path = tiny_hf_checkpoint(family, **overrides)
    ids = _ids(1, t)
    ref = _hf_load(path, "sdpa")(ids).logits
    ours = load_model(path, attn_implementation=impl)(ids)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_mistral_window_is_applied(tiny_hf_checkpoint) -> None:
    """Guard that the sliding-window case tests something: HF's logits differ from a full-attention run."""
    ids = _ids(1, 24)
    windowed = tiny_hf_checkpoint("mistral", sliding_window=8)
    full = tiny_hf_checkpoint("mistral", sliding_window=None)
    with torch.no_grad():
        a, b = _hf_load(windowed)(ids).logits, _hf_load(full)(ids).logits
        ours_full = load_model(full)(ids)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=ATOL, rtol=0)  # within the window: identical
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2  # past it: keys dropped
    torch.testing.assert_close(ours_full, b, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "sdpa", "tiled"])
@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window", "rope-dynamic"])
def test_left_padded_batch(case: str, impl: str, tiny_hf_checkpoint) -> None:
    """Left padding via key_padding_mask + positions = cumsum − 1 equals HF with attention_mask."""
    family, overrides, t = CASES[case]
    path = tiny_hf_checkpoint(family, **overrides)
    ids = _ids(3, t)
    mask = torch.ones(3, t, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _hf_load(path)(ids, attention_mask=mask, position_ids=positions).logits
    model = load_model(path, attn_implementation=impl)
    meta = build_attn_meta(t, 0, 3, key_padding_mask=mask, sliding_window=model.config.sliding_window)
    ours = model(ids, positions=positions, attn_meta=meta)
    real = mask.bool()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    if case == "rope-dynamic":
        return  # dynamic NTK's base depends on the batch's largest position, so a row alone differs (as in HF)
    # a padded row equals the same tokens run alone, unpadded
    alone = model(ids[:1, 5:])
    torch.testing.assert_close(ours[0, 5:], alone[0], atol=ATOL, rtol=0)
