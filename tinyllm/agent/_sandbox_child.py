"""The first code a sandboxed interpreter runs (`python -I _sandbox_child.py CONFIG_JSON`); see `sandbox.py`.

It runs as a plain script, imports only the standard library (never `tinyllm`), and does, in order, while it is
still trusted: resource limits, joining the pids cgroup, the read-only remount of every mount but the work
directory (only inside a fresh mount namespace), an audit hook that refuses process creation, sockets, ctypes,
signals to other processes and writes outside the work directory; then it runs the user's code as `__main__`
and reports how it ended as one JSON object on an inherited file descriptor.
"""

import builtins
import contextlib
import json
import os
import resource
import sys
import traceback

CFG = json.loads(sys.argv[1])
WORKDIR = os.path.realpath(CFG["workdir"])
VIOLATIONS: list[str] = []


class SandboxViolation(PermissionError):
    """Raised by the audit hook; the run is reported as `blocked` even if user code catches it."""


def _set_limits() -> None:
    mb = 1024 * 1024
    pairs = [
        (resource.RLIMIT_CPU, CFG["cpu_time_s"]),
        (resource.RLIMIT_AS, CFG["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, CFG["file_size_mb"] * mb),
        (resource.RLIMIT_NOFILE, CFG["max_open_files"]),
        (resource.RLIMIT_NPROC, CFG["max_processes"]),  # the kernel does not apply it to root: see the cgroup
        (resource.RLIMIT_CORE, 0),
    ]
    for what, value in pairs:
        # the hard limit too, so user code cannot raise it back; CPU hard = soft + 1 turns SIGXCPU into SIGKILL
        hard = value + 1 if what == resource.RLIMIT_CPU else value
        resource.setrlimit(what, (value, hard))


def _join_cgroup() -> None:
    path = CFG.get("cgroup")
    if path:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")  # 0 = the writing process; children inherit the group


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))  # mountinfo escapes spaces as \040
    return points


def _remount_readonly() -> None:
    """Bind the work directory onto itself (its own mount, left writable), then make every other mount read-only.

    Runs only inside the private mount namespace `unshare -m` made, so the host's mounts are untouched."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ms_rdonly, ms_remount, ms_bind, ms_rec = 1, 32, 4096, 16384
    if libc.mount(WORKDIR.encode(), WORKDIR.encode(), None, ms_bind | ms_rec, None) != 0:
        raise OSError(ctypes.get_errno(), "bind mount of the work directory failed")
    for point in _mount_points():
        if point == WORKDIR or point.startswith(("/proc", "/sys")):
            continue
        libc.mount(None, point.encode(), None, ms_remount | ms_bind | ms_rdonly, None)  # best effort per mount


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.mkdir", "os.rmdir", "os.remove", "os.chmod", "os.chown", "os.truncate", "os.utime",
                "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr"}
_TWO_PATH_EVENTS = {"os.rename", "os.link", "os.symlink"}
_PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                   "subprocess.Popen", "os.startfile", "pty.spawn"}
_NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyaddr", "socket.__new__"}
_OTHER_EVENTS = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg", "signal.pthread_kill",
                 "os.chroot", "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit"}


def _inside(path: object) -> bool:
    if isinstance(path, int):
        return True  # an already-open descriptor
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    real = os.path.realpath(os.fspath(path))  # type: ignore[arg-type]
    return real == WORKDIR or real.startswith(WORKDIR + os.sep) or real == os.devnull


def _deny(what: str) -> None:
    if len(VIOLATIONS) < 20:
        VIOLATIONS.append(what)
    raise SandboxViolation(f"sandbox: {what} is not allowed")


def _hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        if writing and not _inside(path):
            _deny(f"writing {path!r} (outside the work directory)")
    elif event in _PATH_EVENTS:
        if args and not _inside(args[0]):
            _deny(f"{event} on {args[0]!r} (outside the work directory)")
    elif event in _TWO_PATH_EVENTS:
        if not (_inside(args[0]) and _inside(args[1])):
            _deny(f"{event} {args[0]!r} -> {args[1]!r} (outside the work directory)")
    elif event in _PROCESS_EVENTS and not CFG["allow_subprocess"]:
        _deny(f"starting a process ({event})")
    elif event in _NET_EVENTS and not CFG["allow_network"]:
        _deny(f"network access ({event})")
    elif event in _OTHER_EVENTS:
        if event in ("os.kill", "os.killpg") and args and args[0] in (0, os.getpid()):
            return
        _deny(event)


def _block_raw_fork() -> None:
    # _posixsubprocess.fork_exec raises no audit event of its own; subprocess.Popen does, but a direct call would not
    if CFG["allow_subprocess"]:
        return
    import _posixsubprocess

    def refused(*_a: object, **_k: object) -> None:
        _deny("starting a process (_posixsubprocess.fork_exec)")

    _posixsubprocess.fork_exec = refused


def _report(status: dict) -> None:
    status["violations"] = VIOLATIONS
    data = json.dumps(status).encode()
    with contextlib.suppress(OSError):
        os.write(CFG["status_fd"], data)


def _reap_as_init() -> None:
    """As PID 1 of the sandbox's PID namespace: run the code in a child, reap every orphan, and report a child
    killed by a signal (the kernel shields PID 1 from most signals, so the code must not run as PID 1)."""
    pid = os.fork()
    if pid == 0:
        _run_user_code()
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if done == pid:
            break
    if os.WIFSIGNALED(status):
        os.write(CFG["status_fd"], b"\n" + json.dumps({"signal": os.WTERMSIG(status)}).encode())
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))  # leaving kills whatever the code left running in the namespace


def main() -> None:
    _set_limits()
    _join_cgroup()
    if CFG["remount"]:
        _remount_readonly()
    os.chdir(WORKDIR)
    if os.getpid() == 1:
        _reap_as_init()
    _run_user_code()


def _run_user_code() -> None:
    with open(CFG["code_path"], encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "<sandbox>", "exec")
    _block_raw_fork()
    sys.addaudithook(_hook)
    glb = {"__name__": "__main__", "__builtins__": builtins, "__file__": "<sandbox>"}
    try:
        exec(code, glb)
    except SystemExit as e:
        code_ = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        _flush()
        _report({"exception": None if code_ == 0 else "SystemExit", "message": str(e.code), "exit_code": code_})
        os._exit(code_)
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # hide this bootstrap's frame
        try:
            report = traceback.TracebackException(type(e), e, tb)
            # the audit hook's frames are ours, not the code's
            report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != __file__])
            print("".join(report.format()), end="", file=sys.stderr)
        except BaseException:
            pass
        _flush()
        _report({"exception": type(e).__name__, "message": str(e)[:1000], "errno": getattr(e, "errno", None),
                 "exit_code": 1})
        os._exit(1)
    _flush()
    _report({"exception": None, "message": "", "exit_code": 0})
    os._exit(0)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


main()
