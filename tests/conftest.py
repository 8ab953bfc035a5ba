"""Shared test fixtures: deterministic seeding and tiny random Hugging Face checkpoints.

`tiny_hf_checkpoint(family, **overrides)` builds a small randomly initialised transformers model of a
model_type (llama, qwen2, mistral, mixtral), saves it with `save_pretrained` into a fresh tmp directory and
returns that directory. Weights are re-drawn with O(1) scales (norm gains and biases included) so that a
wrong name mapping or a skipped bias changes the logits visibly; nothing is downloaded.

    def test_x(tiny_hf_checkpoint):
        path = tiny_hf_checkpoint("qwen2", num_key_value_heads=1)

Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import TINY_HF, hf_config, randomize_, save_tiny_hf  # noqa: F401 (re-exported)

# precision="auto" resolves to fp32 in tests on every CPU (the bf16 probe is forced off), so a test's numbers do not
# depend on whether the machine has native bf16; tests of bf16 ask for it, and test_capability clears this
os.environ.setdefault("TINYLLM_BF16", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA is available; elsewhere they are collected and skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_hf_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `tiny_hf_checkpoint(family="llama", seed=0, **config_overrides) -> checkpoint dir`."""
    counter = itertools.count()

    def make(family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
        return save_tiny_hf(tmp_path / f"{family}-{next(counter)}", family, seed, **overrides)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: they gain nothing from threads and lose a lot to
    contention on a shared 2-core machine. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
