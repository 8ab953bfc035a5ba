"""Shared by the native-kernel tests: each kernel build the CPU runs, loaded as the active path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tinyllm.infer import cpu_kernels


@pytest.fixture(scope="module", params=cpu_kernels.isas_to_test())
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each build the CPU runs, made the active path for the tests that take it (built once, cached on disk)."""
    saved = dict(cpu_kernels._state)
    if not cpu_kernels.load(request.param):
        pytest.skip(f"native kernels unavailable: {cpu_kernels.kernel_status()}")
    yield request.param
    cpu_kernels._state.update(saved)
