"""The process-group foundation: backend choice, torchrun env, rank helpers, fail-fast on a dead peer."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from _spawn import RanksFailed, run_ranks

from tinyllm.train.parallel import dist as tdist


def test_backend_by_device():
    assert tdist.backend_for("cpu") == "gloo"
    assert tdist.backend_for(torch.device("cuda", 0)) == "nccl"


def test_single_process_joins_nothing(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert tdist.init_from_env("cpu") == torch.device("cpu")
    assert not tdist.is_dist() and tdist.rank() == 0 and tdist.world_size() == 1 and tdist.is_main()


def test_env_errors_are_clear(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR.*torchrun"):
        tdist.init_from_env("cpu")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        tdist.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        tdist.init_from_env("cpu")
    with pytest.raises(ValueError, match="timeout_s"):
        tdist.init_from_env("cpu", timeout_s=0)


def _sum_ranks(rank: int, world: int, scale: float) -> tuple:
    t = torch.tensor([rank + 1.0]) * scale
    dist.all_reduce(t)
    tdist.rank_print("hello")
    return (tdist.rank(), tdist.world_size(), dist.get_backend(), t.item())


def test_run_ranks_all_reduce():
    out = run_ranks(_sum_ranks, 2, args=(2.0,))
    assert out == [(0, 2, "gloo", 6.0), (1, 2, "gloo", 6.0)]


def _raise_on_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("bad shard on rank one")
    return rank


def test_rank_exception_comes_back_with_traceback():
    with pytest.raises(RanksFailed) as ei:
        run_ranks(_raise_on_one, 2, init_group=False)
    assert list(ei.value.errors) == [1]
    assert "ValueError: bad shard on rank one" in ei.value.errors[1]


def _die_mid_collective(rank: int, world: int) -> str:
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    with tdist.collective_guard("all_reduce of step 3 grads"):
        for _ in range(50):  # the survivor keeps talking to the dead rank
            dist.all_reduce(torch.ones(4))
    return "unreachable"


def test_killed_rank_fails_fast_with_clear_message():
    t0 = time.monotonic()
    with pytest.raises(RanksFailed) as ei:
        run_ranks(_die_mid_collective, 2, timeout_s=60, group_timeout_s=20)
    elapsed = time.monotonic() - t0
    errs = ei.value.errors
    assert "killed by signal 9" in errs[1]
    # the survivor does not hang for the group timeout: gloo sees the closed socket and we name the cause
    assert "PeerFailure" in errs[0] and "another rank died" in errs[0] and "all_reduce of step 3" in errs[0]
    assert elapsed < 20, elapsed


def _sleep_forever(rank: int, world: int) -> None:
    time.sleep(600)


def test_hung_run_is_killed_at_timeout():
    t0 = time.monotonic()
    with pytest.raises(RanksFailed, match="still running after timeout_s=3"):
        run_ranks(_sleep_forever, 2, timeout_s=3, init_group=False)
    assert time.monotonic() - t0 < 15


def test_parallel_config_degrees_and_errors():
    from tinyllm.train.parallel.config import ParallelConfig

    assert ParallelConfig("zero2").degrees(2) == {"dp": 2, "tp": 1, "pp": 1, "cp": 1, "ep": 1}
    assert ParallelConfig("dp", tp=2, sp=True).degrees(4)["dp"] == 2
    assert ParallelConfig("none").degrees(1)["dp"] == 1
    with pytest.raises(ValueError, match=r"tp=3 .* WORLD_SIZE=4"):
        ParallelConfig("dp", tp=3).degrees(4)
    with pytest.raises(ValueError, match=r"dp=4 .* = 8, but WORLD_SIZE=4"):
        ParallelConfig("dp", dp=4, tp=2).degrees(4)
    with pytest.raises(ValueError, match="parallel='ring'"):
        ParallelConfig("ring")
    with pytest.raises(ValueError, match="sp=True needs tp > 1"):
        ParallelConfig("dp", sp=True)
    with pytest.raises(ValueError, match="tp=0"):
        ParallelConfig("dp", tp=0)
    with pytest.raises(ValueError, match="parallel='none'"):
        ParallelConfig("none").degrees(2)
