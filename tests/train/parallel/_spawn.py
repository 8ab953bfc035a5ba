"""Run a function on N local ranks (gloo, loopback) and collect each rank's result — the multi-process test helper.

    from _spawn import run_ranks, RanksFailed

    def _work(rank: int, world: int, scale: float) -> float:      # module level: spawn pickles it by name
        t = torch.tensor([rank + 1.0]) * scale
        torch.distributed.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_ranks(_work, 2, args=(2.0,)) == [6.0, 6.0]

`run_ranks(fn, world_size=2, *, args=(), timeout_s=90, group_timeout_s=30, init_group=True, env=None)`:
- starts `world_size` fresh processes (torch.multiprocessing "spawn" context, never fork: forked children
  would inherit the parent's OpenMP/gloo state), each with MASTER_ADDR=127.0.0.1, GLOO_SOCKET_IFNAME=lo, a
  free MASTER_PORT, RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE as torchrun sets them, OMP_NUM_THREADS=1
  (and torch.set_num_threads(1)), plus `env`;
- in each, joins the process group through `tinyllm.train.parallel.dist.init_from_env(timeout_s=group_timeout_s)`
  (skip with `init_group=False`), calls `fn(rank, world_size, *args)` and leaves the group;
- returns the results as a list indexed by rank (results travel pickled: keep them CPU tensors/plain data).

Failure is fast and loud: if a rank raises, dies (a signal, os._exit) or the whole run passes `timeout_s`,
every remaining rank is killed and `RanksFailed` is raised; its message carries each failed rank's traceback
(or exit code), and `.errors` maps rank → that text, so a test can assert what each rank saw. After the first
failure the helper waits up to `grace_s` (2 s) for the other ranks' own errors, so a surviving rank's
PeerFailure is reported beside the dead rank's exit code.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp


class RanksFailed(RuntimeError):
    def __init__(self, errors: dict[int, str]):
        self.errors = dict(sorted(errors.items()))
        body = "\n".join(f"--- rank {r} ---\n{text.rstrip()}" for r, text in self.errors.items())
        super().__init__(f"{len(self.errors)} rank(s) failed: {sorted(self.errors)}\n{body}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun would set for one local rank, plus the loopback/thread settings of the tests."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, env: dict[str, str],
            init_group: bool, group_timeout_s: float, out: Any) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    from tinyllm.train.parallel import dist as tdist

    try:
        if init_group:
            tdist.init_from_env("cpu", timeout_s=group_timeout_s)
        result = fn(rank, world_size, *args)
        payload = ("ok", pickle.dumps(result))
    except BaseException:  # every failure goes back to the parent as text
        payload = ("err", traceback.format_exc())
    out.put((rank, *payload))
    if init_group and payload[0] == "ok":
        tdist.destroy()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *, args: Sequence = (), timeout_s: float = 90.0,
              group_timeout_s: float = 30.0, init_group: bool = True, env: dict[str, str] | None = None,
              grace_s: float = 2.0) -> list[Any]:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, fn, tuple(args), dict(env or {}), init_group,
                               group_timeout_s, out)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    try:
        while len(results) < world_size:
            now = time.monotonic()
            if failed_at is not None and now > failed_at + grace_s:
                break
            if now > deadline:
                for r in range(world_size):
                    if r not in results and r not in errors:
                        errors[r] = f"still running after timeout_s={timeout_s} s (killed)"
                break
            try:
                r, status, payload = out.get(timeout=0.1)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if (p.exitcode is not None and p.exitcode != 0 and r not in results and r not in errors):
                        # the queue may still hold its last words; a dead rank without them was killed
                        errors[r] = (f"process exited with code {p.exitcode}"
                                     + (f" (killed by signal {-p.exitcode})" if p.exitcode < 0 else ""))
                        failed_at = failed_at or time.monotonic()
                continue
            if status == "ok":
                results[r] = pickle.loads(payload)
            else:
                errors[r] = payload
                failed_at = failed_at or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        out.close()
    if errors:
        raise RanksFailed(errors)
    return [results[r] for r in range(world_size)]
