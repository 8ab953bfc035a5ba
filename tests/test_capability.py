"""Measured machine capabilities and precision="auto" (tinyllm/capability.py)."""

from __future__ import annotations

import pytest
import torch

from tinyllm import capability


def test_cpu_facts_are_consistent() -> None:
    isa = capability.cpu_isa()
    assert isa in ("avx512", "avx2", "portable")
    flags = capability.cpu_flags()
    if isa == "avx512":
        assert "avx512f" in flags
    if isa == "avx2":
        assert "avx2" in flags
    assert capability.cpu_model()


def test_bf16_probe_is_measured_and_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINYLLM_BF16", raising=False)
    capability.bf16_matmul_speedup.cache_clear()
    try:
        ratio = capability.bf16_matmul_speedup()
        assert ratio > 0
        assert capability.resolve_precision("auto", "cpu") == ("bf16" if ratio >= capability.BF16_MIN_SPEEDUP
                                                               else "fp32")
        for forced, expect in (("1", "bf16"), ("0", "fp32")):
            monkeypatch.setenv("TINYLLM_BF16", forced)
            capability.bf16_matmul_speedup.cache_clear()
            assert capability.resolve_precision("auto", torch.device("cpu")) == expect
    finally:
        capability.bf16_matmul_speedup.cache_clear()


def test_explicit_precision_passes_through_and_bad_value_is_named() -> None:
    assert capability.resolve_precision("fp32", "cpu") == "fp32"
    assert capability.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision='fp16'"):
        capability.resolve_precision("fp16", "cpu")
    assert "CPU" in capability.describe("cpu")
