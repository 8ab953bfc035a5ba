"""Atomic writes (tinyllm.atomic, DESIGN §6 "no half-written file"): the helper's contract, and writers of the
package SIGKILLed at random points always leave the previous artefact loadable and whole."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tinyllm import atomic
from tinyllm.atomic import (
    atomic_copy_files,
    atomic_dir,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_files,
    atomic_write_json,
    atomic_write_text,
    is_temp_name,
    remove_dir,
    sweep,
    temp_path,
    trim_torn_tail,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of every file or directory handed to os.fsync."""
    seen: list[tuple[int, int]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


@pytest.fixture
def renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path]]:
    seen: list[tuple[Path, Path]] = []
    real = os.replace

    def spy(src: os.PathLike, dst: os.PathLike) -> None:
        seen.append((Path(src), Path(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return seen


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("how", ["json", "text", "bytes", "open", "path"])
def test_file_write_fsyncs_file_and_directory_and_renames_a_sibling_temp(
        tmp_path: Path, synced: list, renames: list, how: str) -> None:
    target = tmp_path / "sub" / "out.json"
    if how == "json":
        atomic_write_json(target, {"a": "é"})
    elif how == "text":
        atomic_write_text(target, '{"a": "é"}\n')
    elif how == "bytes":
        atomic_write_bytes(target, '{"a": "é"}\n'.encode())
    elif how == "open":
        with atomic_open(target) as f:
            f.write('{"a": "é"}\n')
    else:
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": "é"}\n', encoding="utf-8")
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": "é"}
    assert _key(target) in synced  # the data (the inode survives the rename)
    assert _key(target.parent) in synced  # the rename
    assert _key(tmp_path) in synced  # the directory `sub` it created
    [(src, dst)] = renames
    assert dst == target and src.parent == target.parent and is_temp_name(src.name)
    assert os.listdir(target.parent) == ["out.json"]


@pytest.mark.parametrize("how", ["open", "path", "dir"])
def test_failure_inside_the_block_keeps_the_target_and_removes_the_temp(tmp_path: Path, how: str) -> None:
    target = tmp_path / ("d" if how == "dir" else "f.txt")
    if how == "dir":
        target.mkdir()
        (target / "a").write_text("old")
    else:
        target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        if how == "open":
            with atomic_open(target) as f:
                f.write("new, half")
                raise RuntimeError("boom")
        elif how == "path":
            with atomic_path(target) as tmp:
                tmp.write_text("new, half")
                raise RuntimeError("boom")
        else:
            with atomic_dir(target) as tmp:
                (tmp / "a").write_text("new, half")
                raise RuntimeError("boom")
    assert (target / "a" if how == "dir" else target).read_text() == "old"
    assert os.listdir(tmp_path) == [target.name]


def test_writer_that_writes_nothing_is_an_error_and_the_target_stays(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="produced no file"), atomic_path(target):
        pass
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


def test_atomic_open_rejects_non_write_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a'"), atomic_open(tmp_path / "x", "a"):
        pass


def test_temp_names_are_hidden_and_never_match_the_artefact_glob(tmp_path: Path) -> None:
    t = temp_path(tmp_path / "model.safetensors")
    assert t.parent == tmp_path and t.name.startswith(".model.safetensors.tmp-") and is_temp_name(t.name)
    assert not t.name.endswith(".safetensors") and not is_temp_name("model.safetensors")
    assert is_temp_name(temp_path(tmp_path / "step-000010", "old").name)
    assert not is_temp_name(".hidden") and not is_temp_name("step-000010")


def test_trim_torn_tail_drops_only_a_partial_last_line(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    trim_torn_tail(log)  # missing: nothing to do, nothing created
    assert not log.exists()
    log.write_bytes(b'{"step": 1}\n{"step": 2}\n{"st')
    trim_torn_tail(log)
    assert log.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    trim_torn_tail(log)  # whole lines stay
    assert log.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    log.write_bytes(b'{"st')
    trim_torn_tail(log)
    assert log.read_bytes() == b""


# ------------------------------------------------------------------ directories
@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "rename-aside"])
def test_directory_replace_keeps_foreign_files_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("v1")
        (tmp / "tokenizer.json").write_text("tok")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "model.safetensors").write_text("v2")
    assert {p.name: p.read_text() for p in target.iterdir() if p.is_file()} == {
        "model.safetensors": "v2", "tokenizer.json": "tok"}
    assert (target / "sub" / "x").read_text() == "x"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("v3")
    assert os.listdir(target) == ["model.safetensors"] and os.listdir(tmp_path) == ["ckpt"]


def test_directory_swap_fsyncs_every_new_file_and_directory(tmp_path: Path, synced: list) -> None:
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a").write_text("a")
        (tmp / "b").write_text("b")
    for p in (target, target / "sub", target / "sub" / "a", target / "b", tmp_path):
        assert _key(p) in synced, p


def test_rename_aside_failure_between_the_renames_puts_the_old_directory_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("old")
    real, calls = os.replace, []

    def second_fails(src: os.PathLike, dst: os.PathLike) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="disk gone"), atomic_dir(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "old" and os.listdir(tmp_path) == ["d"]


def test_sweep_restores_a_directory_set_aside_by_a_dead_writer_and_deletes_its_litter(tmp_path: Path) -> None:
    dead, target = _dead_pid(), tmp_path / "model"
    aside = tmp_path / f".model.old-{dead}-0123abcd"  # killed between "rename old aside" and "rename new in"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    half = tmp_path / f".model.tmp-{dead}-89abcdef"
    half.mkdir()
    (half / "model.safetensors").write_text("half")
    live = temp_path(target)  # this process's own temp: a live writer's, never touched
    live.mkdir()
    sweep(target)
    assert (target / "config.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == sorted(["model", live.name])
    # with the target present, a dead writer's set-aside copy is litter too
    aside.mkdir()
    sweep(target)
    assert not aside.exists() and (target / "config.json").exists()


def test_atomic_dir_sweeps_dead_writers_litter_of_its_target_first(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".out.tmp-{dead}-00000000").mkdir()
    (tmp_path / f".other.tmp-{dead}-00000000").mkdir()  # another target's: left alone
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", f".other.tmp-{dead}-00000000"])


def test_write_files_is_all_or_nothing(tmp_path: Path) -> None:
    d = tmp_path / "tok"
    atomic_write_files(d, {"tokenizer.json": "1", "tokenizer_config.json": "1"})
    with pytest.raises(TypeError):
        atomic_write_files(d, {"tokenizer.json": "2", "tokenizer_config.json": 2})  # type: ignore[dict-item]
    assert {p.name: p.read_text() for p in d.iterdir()} == {"tokenizer.json": "1", "tokenizer_config.json": "1"}
    assert atomic_copy_files(d, tmp_path / "model", ["tokenizer.json", "vocab.txt"]) == ["tokenizer.json"]
    assert os.listdir(tmp_path / "model") == ["tokenizer.json"]


def test_remove_dir_never_leaves_a_half_deleted_directory_under_its_name(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "step-000001"
    d.mkdir()
    (d / "trainer_state.pt").write_text("x")
    seen = []
    monkeypatch.setattr(atomic, "_remove", lambda p: seen.append((p, d.exists())))
    remove_dir(d)
    [(removed, name_still_there)] = seen
    assert not name_still_there and is_temp_name(removed.name) and removed.parent == tmp_path


# ------------------------------------------------------------------ writers of the package
def test_save_pretrained_over_a_checkpoint_swaps_the_directory_whole_and_keeps_the_tokenizer(
        tmp_path: Path, renames: list) -> None:
    from atomic_kill_writer import tiny_model

    from tinyllm.model.hf import load_model, save_pretrained

    model, target = tiny_model(), tmp_path / "ckpt"
    save_pretrained(model, target)
    (target / "tokenizer.json").write_text("{}")
    renames.clear()
    with torch.no_grad():
        model.model.norm.weight.fill_(2.0)
    save_pretrained(model, target)
    # one rename of the whole directory (or none, when RENAME_EXCHANGE swapped it), no per-file renames into it
    assert all(dst.parent == tmp_path for _, dst in renames)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert torch.equal(load_model(target).model.norm.weight, torch.full((64,), 2.0))
    assert os.listdir(tmp_path) == ["ckpt"]


def test_tiny_zh_end_of_turn_rewrite_is_atomic_and_idempotent(tmp_path: Path, renames: list) -> None:
    from atomic_kill_writer import tiny_model

    from tinyllm.model.hf import save_pretrained
    from tinyllm.recipes.tiny_zh import SPECIALS, _stop_at_end_of_turn
    from tinyllm.tokenizer.bpe import train_bpe

    d = tmp_path / "model"
    save_pretrained(tiny_model(), d)
    train_bpe(["你好，世界 " * 20], 280, special_tokens=SPECIALS, show_progress=False,
              eos_token="<|endoftext|>").save(d)
    renames.clear()
    _stop_at_end_of_turn(d)
    first = {n: (d / n).read_bytes() for n in ("config.json", "generation_config.json")}
    assert {dst.name for _, dst in renames} == set(first) and all(is_temp_name(s.name) for s, _ in renames)
    _stop_at_end_of_turn(d)
    assert {n: (d / n).read_bytes() for n in first} == first
    eos = json.loads(first["config.json"])["eos_token_id"]
    assert isinstance(eos, list) and len(eos) == 2


# ------------------------------------------------------------------ SIGKILL at random points
WRITER = Path(__file__).with_name("atomic_kill_writer.py")
ROOT_NAMES = {"model", "state.json", "run"}


def _versions(root: Path) -> dict[str, int]:
    """The version of each artefact under root, checking that each loads completely and is one version."""
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer
    from tinyllm.train.checkpoint import STATE, latest_checkpoint, list_checkpoints, load_checkpoint

    found: dict[str, int] = {}
    model = load_model(root / "model")
    values = torch.cat([p.detach().flatten() for p in model.parameters()]).unique()
    assert values.numel() == 1, f"model weights mix versions {values.tolist()}"
    found["model"] = int(values.item())
    template = load_tokenizer(root / "model").chat_template
    assert template is not None and template.startswith("v")
    found["tokenizer"] = int(template[1:])
    state = json.loads((root / "state.json").read_text(encoding="utf-8"))
    assert set(state["payload"]) == {state["v"]}
    found["json"] = state["v"]
    ckpts = list_checkpoints(root / "run")
    assert ckpts and all(not is_temp_name(c.name) for c in ckpts)
    for c in ckpts:  # every checkpoint that looks complete is: weights, state and config agree
        step = int(c.name.split("-")[1])
        assert load_checkpoint(c, model)["step"] == step
        assert {p.detach().flatten()[0].item() for p in model.parameters()} == {float(step)}
        assert json.loads((c / "train_config.json").read_text())["v"] == step
        assert (c / STATE).exists()
    latest = latest_checkpoint(root / "run")
    assert latest is not None
    found["checkpoint"] = int(latest.name.split("-")[1])
    return found


def _litter(root: Path) -> list[str]:
    """Names that are not artefacts must be temps (hidden, recognisable): returns them."""
    out = []
    for d, names in ((root, ROOT_NAMES), (root / "model", None), (root / "run" / "checkpoints", None)):
        if not d.exists():  # a swap killed between its two renames: the old version waits aside for sweep()
            assert any(n.startswith(f".{d.name}.old-") for n in os.listdir(d.parent)), f"{d} is gone"
            continue
        for name in os.listdir(d):
            if names is not None and name in names:
                continue
            if names is None and not name.startswith("."):
                continue  # files inside the artefacts themselves
            assert is_temp_name(name), f"{d / name} is neither an artefact nor a recognisable temp"
            out.append(name)
    return out


@pytest.fixture(scope="module")
def writer() -> Iterator[subprocess.Popen]:
    """One writer process for the kill tests (torch is imported once)."""
    if not hasattr(os, "fork"):
        pytest.skip("the writer forks; SIGKILL is POSIX")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(atomic.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(WRITER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _ask(proc: subprocess.Popen, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("mode", ["rename-exchange", "rename-aside"])
def test_sigkilled_writer_leaves_the_previous_artefact_whole(tmp_path: Path, writer: subprocess.Popen,
                                                             mode: str) -> None:
    assert _ask(writer, f"init {tmp_path}") == "ok"
    before = _versions(tmp_path)
    assert before == dict.fromkeys(("model", "tokenizer", "json", "checkpoint"), 0)
    rng = random.Random(f"atomic-{mode}")
    changed = 0
    for it in range(1, 7):
        base = 100 * it
        pid = int(_ask(writer, f"spawn {tmp_path} {base} {mode}"))
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        sig, rounds = map(int, _ask(writer, "reap").split())
        assert sig == signal.SIGKILL, "the writer ended before it was killed"
        _litter(tmp_path)
        if mode == "rename-aside":  # a kill between the two renames leaves the old directory aside
            for target in (tmp_path / "model", *(tmp_path / "run" / "checkpoints").glob("step-*")):
                sweep(target)
        now = _versions(tmp_path)
        # the kill hit round `rounds` (version base + rounds): each artefact holds that version or the one
        # completed before it, never anything torn or older
        for name, v in now.items():
            allowed = {base + rounds, base + rounds - 1 if rounds else before[name]}
            assert v in allowed, f"iteration {it}: {name} is version {v}, expected one of {allowed}"
        changed += now != before
        before = now
    assert changed, "no kill landed after a write: the artefacts never changed"
    # the dead writers' litter is swept by the next write of the same target
    for target in (tmp_path / "model", tmp_path / "state.json", tmp_path / "run" / "checkpoints" / "latest"):
        sweep(target)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    assert [n for n in os.listdir(tmp_path / "model") if n.startswith(".")] == []
