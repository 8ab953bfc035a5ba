"""The process group every parallel strategy stands on (notes ch.04: data/model parallel basics).

A distributed run is N processes, one per device, started by `torchrun` (or `deepspeed`), each reading who it
is from the environment torchrun sets: RANK (0..N-1 over all nodes), WORLD_SIZE (N), LOCAL_RANK (index on this
node, picks the GPU), MASTER_ADDR/MASTER_PORT (where rank 0 listens for the rendezvous). The collective backend
follows the device and nothing else changes: gloo on CPU, NCCL on CUDA.

    backend_for(device)          "nccl" for a CUDA device, else "gloo"
    init_from_env(device, timeout_s)  join the group torchrun describes; world size 1 (no env) joins nothing
    rank() world_size() local_rank() is_main()   valid with or without a process group
    rank_print(*args, all_ranks=False)           print on rank 0 only (or every rank) with a "[rank r/N]" tag
    collective_guard(what)       turns a peer's death/timeout inside a collective into PeerFailure naming it
    destroy()                    leave the group (idempotent)

Fail fast: every collective gets the group's timeout (default 120 s, not torch's 10-30 minutes), and a
collective that fails because a peer died (gloo: "Connection closed by peer"/"Connection reset", NCCL: a
watchdog timeout) is re-raised as `PeerFailure` with this rank, the operation and the likely cause, instead
of a bare socket error. torchrun then tears the other workers down (its elastic agent stops the job when any
worker exits non-zero), so a killed rank ends the job within the timeout rather than hanging it.

Not covered: elastic membership changes (re-rendezvous) and multi-group topologies; strategies that need
sub-groups build them with `torch.distributed.new_group` themselves.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0

# fragments of the errors gloo and NCCL raise when the other side of a collective is gone
_PEER_GONE = ("connection closed", "connection reset", "connection refused", "broken pipe", "closed by peer",
              "timed out", "timeout", "watchdog", "socket closed", "read error", "write error")


class PeerFailure(RuntimeError):
    """A collective failed because another rank died, hung or was unreachable."""


def backend_for(device: torch.device | str) -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors (NCCL has no CPU path, gloo is slow and partial on CUDA)."""
    dev = torch.device(device)
    return "nccl" if dev.type == "cuda" else "gloo"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def init_from_env(device: torch.device | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group torchrun describes and return this rank's device.

    Without WORLD_SIZE (or with WORLD_SIZE=1 and no MASTER_ADDR) nothing is initialised: a single-process
    run stays free of torch.distributed. On CUDA each rank takes `cuda:LOCAL_RANK`. Calling it again once
    the group exists returns the device and changes nothing.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
    dev = torch.device(device) if device not in (None, "", "auto") else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    world = env_world_size()
    rank_ = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"RANK={rank_} is not in [0, WORLD_SIZE={world})")
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return dev
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return dev
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                           "(torchrun --nproc_per_node N -m tinyllm ...)")
    kwargs = {}
    if dev.type == "cuda":
        kwargs["device_id"] = dev  # binds NCCL eagerly: a wrong GPU mapping fails here, not in the first all-reduce
    dist.init_process_group(backend=backend_for(dev), rank=rank_, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return dev


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def rank_print(*args: object, all_ranks: bool = False, file=None, **kwargs) -> None:
    """print() on rank 0 only (or every rank with `all_ranks`), tagged "[rank r/N]" in a multi-rank run."""
    if not all_ranks and not is_main():
        return
    if world_size() > 1:
        args = (f"[rank {rank()}/{world_size()}]", *args)
    print(*args, file=file if file is not None else sys.stdout, flush=True, **kwargs)


@contextlib.contextmanager
def collective_guard(what: str) -> Iterator[None]:
    """Re-raise a failed collective inside the block as PeerFailure that says which rank, which op and why."""
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as e:  # DistBackendError and gloo's socket errors are RuntimeErrors
        msg = str(e)
        if not is_dist() or not any(s in msg.lower() for s in _PEER_GONE):
            raise
        raise PeerFailure(
            f"rank {rank()}/{world_size()}: {what} failed — another rank died, hung past the "
            f"{_group_timeout_s():.0f} s timeout or became unreachable (check the other ranks' logs for the "
            f"first error). Backend said: {msg.splitlines()[0][:300]}") from e


def _group_timeout_s() -> float:
    try:
        from torch.distributed.distributed_c10d import _get_default_group
        t = getattr(_get_default_group(), "options", None)
        return float(t._timeout.total_seconds()) if t is not None else DEFAULT_TIMEOUT_S
    except Exception:  # private API: the number is only for the message
        return DEFAULT_TIMEOUT_S


def barrier(what: str = "barrier") -> None:
    if is_dist():
        with collective_guard(what):
            dist.barrier()


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()
