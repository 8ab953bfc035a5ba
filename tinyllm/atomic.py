"""Atomic writes: a reader, or a run resuming after a crash, sees the old artefact or the new one, never half.

Every file the package writes (checkpoints, configs, tokenizers, token shards, RAG index files, recipe
outputs, reports, plots, word vectors, ...) goes through this module; DESIGN §6 asks that bad input or a
killed process leave no half-written file behind.

Files. The bytes go to a temp file in the target's own directory (the same file system, so the final rename
can never degrade into a copy), are flushed and `fsync`ed, then `os.replace` renames the temp over the target
(atomic on POSIX and Windows) and the directory is `fsync`ed so the rename itself survives a power loss. An
exception inside the write removes the temp and leaves the target untouched; a SIGKILL can leave only a temp.

Directories (a checkpoint, a tokenizer, an adapter). The new version is built in a sibling temp directory,
every file and directory in it is `fsync`ed, then it is swapped in. On Linux the swap is one
`renameat2(RENAME_EXCHANGE)` call, so the target path never goes missing; elsewhere the old directory is
renamed aside, the new one renamed in, and the old one deleted, and a crash between the two renames leaves
the old one aside, where the next write to the same target restores it. `keep_existing=True` carries over
the files of the old directory that the writer did not produce (hard links where the file system allows),
so `save_pretrained` into a directory that already holds a tokenizer keeps it, and the whole directory
still changes in one step.

Temp names are `.{name}.tmp-{pid}-{hex}` (and `.{name}.old-{pid}-{hex}` for a directory set aside): hidden,
and not ending in the target's suffix, so globs such as `step-*` or `*.safetensors` never pick them up;
`is_temp_name` recognises them. A directory write sweeps the litter that dead writers (by process id, on
this machine) left for its target.

Not covered: durability on file systems that ignore fsync; concurrent writers of one target (the last rename
wins, each writer's artefact still whole); writers of one directory in different PID namespaces or machines
(the sweep could take a live foreign writer's temp for litter: that writer then fails, nothing is torn).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def temp_path(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh sibling name for `target`'s temp (kind "tmp") or set-aside old version (kind "old")."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """True for the names `temp_path` makes: litter of an interrupted write, never an artefact."""
    return _TEMP_RE.match(name) is not None


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames and creations inside directory `path` durable (a no-op where directories cannot be
    opened, as on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on a directory; the rename happened all the same
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _makedirs(path: Path) -> None:
    """`mkdir -p` that fsyncs the parent of each directory it creates, so the new entries survive a crash."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ------------------------------------------------------------------ files
@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target` for a writer that takes a file name (`safetensors.torch.save_file`,
    `torch.save`, `faiss.write_index`, ...); on a clean exit the file it wrote is fsynced and renamed over
    `target`. On an exception the temp is removed and `target` is untouched."""
    target = Path(target)
    _makedirs(target.parent)
    tmp = temp_path(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic write of {target}: the writer produced no file at {tmp}")
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO[Any]]:
    """`open(target, mode)` for writing ("w" text, "wb" bytes), except that the file appears under `target`
    only when the block ends without an exception, and then complete and fsynced."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r} is not 'w' or 'wb'")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(target) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_open_or_stdout(target: str | os.PathLike | None) -> Iterator[IO[Any]]:
    """A command's text output: `atomic_open(target)`, or standard output when `target` is None or empty."""
    if not target:
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_open(target) as f:
        yield f


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `target` atomically; returns `target` as a Path."""
    with atomic_open(target, "wb") as f:
        f.write(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `target` atomically (no newline translation, so the bytes are the same on every OS)."""
    return atomic_write_bytes(target, text.encode(encoding))


def json_text(obj: Any, *, indent: int | None = 2, sort_keys: bool = False, ensure_ascii: bool = False,
              default: Callable[[Any], Any] | None = None) -> str:
    """`json.dumps` with a trailing newline: the text `atomic_write_json` writes."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=default)
    return text + "\n"


def atomic_write_json(target: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      ensure_ascii: bool = False, default: Callable[[Any], Any] | None = None) -> Path:
    """Write `obj` as JSON (UTF-8, trailing newline) to `target` atomically."""
    text = json_text(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=default)
    return atomic_write_text(target, text)


def trim_torn_tail(path: str | os.PathLike) -> None:
    """An append-only log of lines (metrics.jsonl) that a crash cut ends in a partial line: drop that line, so
    a resumed run appends whole records after whole records. A missing file is left missing."""
    try:
        f = open(path, "rb+")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    with f:
        size = pos = f.seek(0, os.SEEK_END)
        end = 0
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                end = pos + i + 1
                break
        if end != size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------ directories
@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28, or none to load
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two paths in one atomic step; False where the OS or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap probe: treat the writer as alive and leave its temp alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(target: str | os.PathLike) -> None:
    """Clear what writers that died left for `target`: restore an old directory set aside when `target` is
    missing, and delete temps and set-aside copies whose writing process is gone."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    prefix = f".{target.name}."
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        m = _TEMP_RE.match(entry.name) if entry.name.startswith(prefix) else None
        if m is None or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        if m["kind"] == "old" and not target.exists() and not target.is_symlink():
            os.replace(path, target)  # the swap died between its two renames: the old version comes back
        else:
            _remove(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(dirpath)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Entries of `old` that `new` lacks, hard-linked (or copied) into `new`; temps are not carried."""
    for entry in os.scandir(old):
        dst = new / entry.name
        if is_temp_name(entry.name) or dst.exists() or dst.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(dst))


def replace_dir(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Swap the finished directory `src` (a sibling of `target`) in as `target`; the old `target`, if any, is
    deleted. On failure the old `target` stays."""
    src, target = Path(src), Path(target)
    _fsync_tree(src)
    if not target.exists() and not target.is_symlink():
        os.replace(src, target)
    elif _exchange(src, target):
        _remove(src)  # src now holds the old version
    else:
        aside = temp_path(target, "old")
        os.replace(target, aside)
        try:
            os.replace(src, target)
        except BaseException:
            os.replace(aside, target)
            raise
        _remove(aside)
    fsync_dir(target.parent)
    return target


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory so that no half-deleted copy is ever seen under its name: it is renamed aside to a
    temp name first, then removed."""
    path = Path(path)
    if not path.exists():
        return
    aside = temp_path(path, "tmp")
    os.replace(path, aside)
    fsync_dir(path.parent)
    _remove(aside)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside `target`; fill it, and on a clean exit it replaces `target` as a
    whole (see the module docstring). `keep_existing`: files of the old `target` that the block did not write
    are kept. On an exception the temp directory is removed and `target` is untouched."""
    target = Path(target)
    _makedirs(target.parent)
    sweep(target)
    tmp = temp_path(target)
    tmp.mkdir()
    try:
        yield tmp
        if keep_existing and target.is_dir():
            _carry_over(target, tmp)
        replace_dir(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_files(directory: str | os.PathLike, files: Mapping[str, str | bytes],
                       keep_existing: bool = True) -> Path:
    """Write several files (name → text or bytes) into `directory` as one atomic change: all of them or
    none. Other files already in `directory` are kept unless `keep_existing` is False."""
    with atomic_dir(directory, keep_existing=keep_existing) as tmp:
        for name, payload in files.items():
            (tmp / name).write_bytes(payload.encode("utf-8") if isinstance(payload, str) else payload)
    return Path(directory)


def atomic_copy_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                      names: Iterable[str]) -> list[str]:
    """Copy those of `names` that exist in `src_dir` into `dst_dir` as one atomic change of `dst_dir` (its
    other files are kept); returns the names copied."""
    src_dir = Path(src_dir)
    found = [name for name in names if (src_dir / name).is_file()]
    if found:
        with atomic_dir(dst_dir, keep_existing=True) as tmp:
            for name in found:
                shutil.copy2(src_dir / name, tmp / name)
    return found
