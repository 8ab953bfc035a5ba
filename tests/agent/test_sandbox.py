"""The Python sandbox: each hostile program is contained and reported as a result, never an exception."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest

from tinyllm.agent.sandbox import SandboxLimits, namespace_prefix, run_python

NS = bool(namespace_prefix())


def test_ok_output_stdin_and_files():
    r = run_python("import sys\nprint(open('d/in.txt').read() + sys.stdin.read())", stdin="!",
                   files={"d/in.txt": "hi"})
    assert r.ok and r.stdout == "hi!\n" and r.returncode == 0 and r.exception is None
    assert r.observation() == "hi!"


def test_exception_is_reported_with_user_frames_only():
    r = run_python("def f():\n    return 1 / 0\nf()")
    assert r.status == "error" and r.exception == "ZeroDivisionError"
    assert 'File "<sandbox>", line 2, in f' in r.stderr and "_sandbox_child" not in r.stderr
    assert "[error]" in r.observation() and "ZeroDivisionError" in r.observation()


def test_exit_code():
    assert run_python("import sys; sys.exit(0)").ok
    r = run_python("import sys; sys.exit(3)")
    assert r.status == "error" and r.returncode == 3


def test_infinite_loop_times_out():
    r = run_python("while True:\n    pass", timeout_s=1.5)
    assert r.status == "timeout" and 1.4 < r.duration_s < 5


def test_cpu_time_limit():
    r = run_python("while True:\n    pass", timeout_s=10, cpu_time_s=1)
    assert r.status == "cpu_limit" and r.duration_s < 8


@pytest.mark.parametrize("bomb", ["x = bytearray(4_000_000_000)",
                                  "a = []\nwhile True:\n    a.append(bytearray(50_000_000))"])
def test_memory_bomb(bomb):
    r = run_python(bomb, memory_mb=256, timeout_s=10)
    assert r.status == "memory_limit" and r.exception == "MemoryError"


def test_fork_bomb_is_refused():
    r = run_python("import os\nwhile True:\n    os.fork()", timeout_s=5)
    assert r.status == "blocked" and any("os.fork" in v for v in r.violations)
    r = run_python("import subprocess\nsubprocess.run(['true'])", timeout_s=5)
    assert r.status == "blocked"


def test_caught_violation_still_reported():
    r = run_python("try:\n    open('/etc/x', 'w')\nexcept PermissionError:\n    print('caught')")
    assert r.status == "blocked" and r.stdout == "caught\n"


@pytest.mark.skipif(not NS, reason="no pids cgroup / namespaces here: a permitted fork bomb would be unbounded")
def test_permitted_fork_bomb_is_capped_and_cleaned_up():
    if "pids-cgroup" not in run_python("pass").isolation:
        pytest.skip("no writable pids cgroup")
    code = "import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        n += 1\n"
    r = run_python(code, allow_subprocess=True, timeout_s=2, max_processes=16)
    assert r.status == "timeout"
    leftovers = [p for p in Path("/sys/fs/cgroup/pids").glob(f"tinyllm-sandbox-{os.getpid()}-*")]
    assert leftovers == []


def test_write_outside_workdir(tmp_path):
    target = tmp_path / "evil.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", f"import os\nos.remove({str(tmp_path)!r})",
                 f"import shutil\nshutil.copy('/etc/hostname', {str(target)!r})"):
        r = run_python(code)
        assert r.status == "blocked", code
    assert not target.exists()
    # inside the work directory writing is fine, and the directory is gone afterwards
    r = run_python("import os\nopen('a.txt', 'w').write('hi')\nprint(os.getcwd())")
    assert r.ok and not Path(r.stdout.strip()).exists()


@pytest.mark.skipif(not NS, reason="needs unshare (root or user namespaces)")
def test_read_only_mounts_hold_without_the_hook(tmp_path):
    # a permitted child process is outside the audit hook: the read-only remount still stops it
    target = tmp_path / "evil.txt"
    r = run_python(f"import subprocess\nprint(subprocess.run(['touch', {str(target)!r}]).returncode)",
                   allow_subprocess=True)
    assert r.stdout.strip() != "0" and not target.exists()


class _Hits(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_network_call_is_contained():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        r = run_python(f"import urllib.request\nurllib.request.urlopen({url!r}, timeout=2)")
        assert r.status == "blocked" and any("network" in v for v in r.violations)
        if NS:  # with the hook off, the network namespace alone still cannot reach the host
            r = run_python(f"import urllib.request\nurllib.request.urlopen({url!r}, timeout=2)", allow_network=True)
            assert r.status == "error"
        assert _Hits.hits == 0
    finally:
        server.shutdown()


def test_output_is_capped():
    r = run_python("print('x' * 100_000)\nimport sys\nprint('y' * 50, file=sys.stderr)", max_output_chars=1000)
    assert r.ok and r.stdout_truncated and len(r.stdout) < 1100 and not r.stderr_truncated
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('z' * 65536)", file_size_mb=1, timeout_s=10)
    assert r.status == "file_size_limit"


def test_kill_other_processes_refused():
    r = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert r.status == "blocked"


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=10)
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        run_python("pass", files={"../x": "no"})
    with pytest.raises(ValueError, match="code must be a str"):
        run_python(b"print(1)")  # type: ignore[arg-type]
