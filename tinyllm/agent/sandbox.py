"""A Python sandbox for agents and code evaluation (notes ch.08 tool use: a code interpreter tool; HumanEval-style
execution checks of ch.09).

`run_python(code, *, timeout_s=10, memory_mb=512, ...) -> SandboxResult` runs `code` as `__main__` in a fresh
`python -I` subprocess (isolated mode: no user site, no PYTHON* variables, no script directory on sys.path)
inside a temp work directory that is deleted afterwards, and never raises for anything the code does: every
ending is a `SandboxResult` whose `status` is one of

    ok               exited 0
    error            an exception or a non-zero exit (the traceback is in stderr, its type in `exception`)
    timeout          still running after `timeout_s` of wall time (the whole process tree is killed)
    cpu_limit        used more than `cpu_time_s` of CPU time (RLIMIT_CPU)
    memory_limit     MemoryError under the address-space limit (RLIMIT_AS = `memory_mb`)
    file_size_limit  a file or the output grew past `file_size_mb` (RLIMIT_FSIZE)
    blocked          tried something the sandbox refuses (see `violations`), even if the code caught the error
    killed           ended by a signal (e.g. a native crash)

`result.observation()` is the text an agent shows the model. stdout and stderr are captured through files
(no pipe can fill up and stall the child) and cut to `max_output_chars` each, marked `...[truncated]`.

The layers, each recorded in `result.isolation` when it was active:

- `rlimits`: CPU time, address space, file size, open files, core dumps, and processes (RLIMIT_NPROC; the
  kernel never applies it to root, hence the cgroup);
- `audit`: a `sys.addaudithook` hook installed before the code runs refuses process creation (unless
  `allow_subprocess`), sockets (unless `allow_network`), writes, renames and deletes outside the work
  directory, ctypes, signals to other processes and raising limits. It is a guard against mistakes and
  model-written code, not a security boundary on its own: CPython offers ways around it;
- `netns`, `mntns-ro`, `pidns` (root, or where unprivileged user namespaces are allowed; `unshare -n -m -p`):
  no network interface but a downed loopback, every mount but the work directory read-only, and a private
  PID space whose processes all die with the sandbox's first process;
- `pids-cgroup` (root with a writable cgroup v1 `pids` hierarchy, or v2 with the pids controller): at most
  `max_processes` tasks, so a fork bomb stalls instead of filling the machine.

Where the namespaces are missing (a non-root user without user namespaces, macOS), network and file-system
containment rest on the audit hook alone, and `result.isolation` says so; run untrusted code in a container
or VM there. Not covered: seccomp filtering, GPU access control, CPU-time fairness between sandboxes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["ok", "error", "timeout", "cpu_limit", "memory_limit", "file_size_limit", "blocked", "killed"]
_CHILD = Path(__file__).with_name("_sandbox_child.py")
_NS_FLAGS = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]
_CGROUP_V1 = Path("/sys/fs/cgroup/pids")
_CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run; `cpu_time_s=None` means the wall timeout rounded up."""

    timeout_s: float = 10.0
    memory_mb: int = 512
    cpu_time_s: int | None = None
    file_size_mb: int = 16
    max_processes: int = 32
    max_open_files: int = 256
    max_output_chars: int = 20_000

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s <= 3600):
            raise ValueError(f"timeout_s must be in (0, 3600] seconds, got {self.timeout_s!r}")
        if not (isinstance(self.memory_mb, int) and self.memory_mb >= 64):
            raise ValueError(f"memory_mb must be an integer >= 64 (the interpreter needs ~30 MB), got {self.memory_mb!r}")
        if self.cpu_time_s is not None and not (isinstance(self.cpu_time_s, int) and self.cpu_time_s >= 1):
            raise ValueError(f"cpu_time_s must be an integer >= 1 or None, got {self.cpu_time_s!r}")
        for name in ("file_size_mb", "max_processes", "max_open_files", "max_output_chars"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_open_files < 16:
            raise ValueError(f"max_open_files must be >= 16 (the interpreter needs a few), got {self.max_open_files}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_time_s if self.cpu_time_s is not None else max(1, math.ceil(self.timeout_s))


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    exception: str | None = None  # the type name of the exception that ended the code, if any
    message: str = ""
    violations: list[str] = field(default_factory=list)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    isolation: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def observation(self, max_chars: int = 4000) -> str:
        """What an agent shows the model: the output, and on failure the status and the error's last lines."""
        parts = []
        if self.stdout:
            parts.append(self.stdout)
        if not self.ok:
            detail = {"timeout": "killed after the wall-clock timeout",
                      "cpu_limit": "killed at the CPU-time limit",
                      "memory_limit": "ran out of memory (address-space limit)",
                      "file_size_limit": "a file or the output exceeded the size limit",
                      "blocked": "; ".join(self.violations) or self.message,
                      "killed": f"killed by signal {-(self.returncode or 0)}"}.get(self.status, "")
            tail = "\n".join(self.stderr.strip().splitlines()[-8:])
            parts.append(f"[{self.status}] {detail}".rstrip() + (f"\n{tail}" if tail else ""))
        text = "\n".join(parts).strip() or "(no output)"
        return text if len(text) <= max_chars else text[: max_chars - 15] + "\n...[truncated]"


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The `unshare` argv prefix that works on this machine: as root, else with a user namespace, else none."""
    exe = shutil.which("unshare")
    if exe is None or sys.platform != "linux":
        return ()
    candidates = [[exe, *_NS_FLAGS]] if os.geteuid() == 0 else []
    candidates.append([exe, "--map-root-user", *_NS_FLAGS])
    for argv in candidates:
        try:
            ok = subprocess.run([*argv, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return tuple(argv)
    return ()


def _make_cgroup(max_processes: int) -> Path | None:
    """A fresh pids cgroup capped at `max_processes`, or None where cgroups cannot be written."""
    name = f"tinyllm-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
    roots = []
    if _CGROUP_V1.is_dir():
        roots.append(_CGROUP_V1)
    elif "pids" in _read(_CGROUP_V2 / "cgroup.subtree_control").split():
        roots.append(_CGROUP_V2)
    for root in roots:
        path = root / name
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / "pids.max").write_text(str(max_processes))
            return path
        except OSError:
            _remove_cgroup(path)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _remove_cgroup(path: Path) -> None:
    # kill whatever the run left behind (a fork bomb's survivors), then remove the empty group
    for _ in range(50):
        pids = [int(p) for p in _read(path / "cgroup.procs").split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        path.rmdir()


def _read_capped(path: Path, max_chars: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(max_chars * 4 + 4)
        more = bool(f.read(1))
    text = data.decode("utf-8", errors="replace")
    if len(text) > max_chars or more:
        return text[:max_chars] + "\n...[truncated]", True
    return text, False


def _classify(rc: int | None, timed_out: bool, status: dict, limits: SandboxLimits, cpu_used: float) -> Status:
    exc = status.get("exception")
    if timed_out:
        return "timeout"
    if status.get("violations"):
        return "blocked"
    if rc is not None and rc < 0:
        if -rc in (signal.SIGXCPU, signal.SIGKILL) and cpu_used >= limits.cpu_seconds - 0.5:
            return "cpu_limit"
        if -rc == signal.SIGXFSZ:
            return "file_size_limit"
        return "killed"
    if exc == "MemoryError":
        return "memory_limit"
    if status.get("errno") == 27:  # EFBIG
        return "file_size_limit"
    return "ok" if rc == 0 else "error"


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, cpu_time_s: int | None = None,
               file_size_mb: int = 16, max_processes: int = 32, max_open_files: int = 256,
               max_output_chars: int = 20_000, stdin: str | None = None,
               files: Mapping[str, str | bytes] | None = None, allow_subprocess: bool = False,
               allow_network: bool = False, isolate: bool = True, python: str | None = None) -> SandboxResult:
    """Run `code` in a sandboxed subprocess and report how it ended (never raises for what the code does).

    `files` are written into the work directory first (relative names only); `stdin` is fed to the code;
    `isolate=False` skips the namespaces and the cgroup (faster start, weaker containment); `python` picks
    another interpreter (default: this one). Raises ValueError only for bad arguments."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, cpu_time_s=cpu_time_s,
                           file_size_mb=file_size_mb, max_processes=max_processes,
                           max_open_files=max_open_files, max_output_chars=max_output_chars)
    for name in files or {}:
        if os.path.isabs(name) or ".." in Path(name).parts or not name:
            raise ValueError(f"files: {name!r} must be a relative path inside the work directory")
    with tempfile.TemporaryDirectory(prefix="tinyllm-sandbox-") as tmp:
        return _run(code, limits, Path(tmp), stdin, files or {}, allow_subprocess, allow_network, isolate,
                    python or sys.executable)


def _run(code: str, limits: SandboxLimits, tmp: Path, stdin: str | None, files: Mapping[str, str | bytes],
         allow_subprocess: bool, allow_network: bool, isolate: bool, python: str) -> SandboxResult:
    work = tmp / "work"
    work.mkdir()
    for name, content in files.items():
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    code_path = tmp / "main.py"
    code_path.write_text(code, encoding="utf-8")
    prefix = namespace_prefix() if isolate else ()
    cgroup = _make_cgroup(limits.max_processes) if isolate else None
    isolation = ["rlimits", "audit"] + (["netns", "mntns-ro", "pidns"] if prefix else [])
    isolation += ["pids-cgroup"] if cgroup else []
    status_r, status_w = os.pipe()
    cfg = {"workdir": str(work), "code_path": str(code_path), "status_fd": status_w,
           "cpu_time_s": limits.cpu_seconds, "memory_mb": limits.memory_mb, "file_size_mb": limits.file_size_mb,
           "max_open_files": limits.max_open_files, "max_processes": limits.max_processes,
           "allow_subprocess": allow_subprocess, "allow_network": allow_network,
           "remount": bool(prefix), "cgroup": str(cgroup) if cgroup else None}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    argv = [*prefix, python, "-I", str(_CHILD), json.dumps(cfg)]
    out_path, err_path = tmp / "stdout", tmp / "stderr"
    start = time.monotonic()
    timed_out = False
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=out, stderr=err, cwd=work, env=env, pass_fds=(status_w,),
                                    start_new_session=True)
            os.close(status_w)
            status_w = -1
            if stdin is not None:
                _feed(proc, stdin)
            rc, timed_out, cpu_used = _wait(proc, limits.timeout_s)
        duration = time.monotonic() - start
    finally:
        if status_w >= 0:
            os.close(status_w)
        if cgroup is not None:
            _remove_cgroup(cgroup)
    status = _read_status(status_r)
    stdout, out_cut = _read_capped(out_path, limits.max_output_chars)
    stderr, err_cut = _read_capped(err_path, limits.max_output_chars)
    if status.get("signal"):
        rc = -int(status["signal"])  # the namespace's PID 1 saw the code's interpreter die of this signal
    kind = _classify(rc, timed_out, status, limits, cpu_used)
    return SandboxResult(status=kind, returncode=rc, stdout=stdout, stderr=stderr, duration_s=duration,
                         exception=status.get("exception"), message=status.get("message", ""),
                         violations=list(status.get("violations", [])), stdout_truncated=out_cut,
                         stderr_truncated=err_cut, isolation=tuple(isolation))


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[int, bool, float]:
    """(exit code as Popen reports it, timed out?, CPU seconds of the tree) -- wait4 gives the child's rusage,
    which includes every descendant it reaped (`unshare --fork` reaps the code's interpreter)."""
    deadline = time.monotonic() + timeout_s
    pause, timed_out = 0.001, False
    while True:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            _kill_group(proc)
            pid, st, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    _kill_group(proc)  # stragglers that left the interpreter's tree but not its process group
    proc.returncode = os.waitstatus_to_exitcode(st)
    return proc.returncode, timed_out, ru.ru_utime + ru.ru_stime


def _feed(proc: subprocess.Popen, stdin: str) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the code did not read its input: not our failure


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _read_status(fd: int) -> dict:
    chunks = []
    try:
        os.set_blocking(fd, False)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    status: dict = {}
    for line in b"".join(chunks).splitlines():  # the code's own report, then PID 1's word on a fatal signal
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            status.update(item)
    return status
