"""RagStore across processes: a writer and a reader process at once, the writer lock, snapshot reads, and a
failed update that must leave the committed store usable by every handle.

Pins the bug where opening a store deleted every index directory but the committed one, including the
directory a writer in another process was filling, and where a handle kept searching its stale in-memory
indexes against rows another process had already replaced.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_store import FakeEmbedder

from tinyllm.rag.bm25 import BM25Index
from tinyllm.rag.store import LOCK, OPTIMISTIC_READS, RagStore, _flock

fcntl = pytest.importorskip("fcntl")  # the writer lock is an flock (POSIX)

HERE = Path(__file__).resolve().parent
CHUNKING = {"size": 48, "overlap": 8}
BATCHES, PER_BATCH = 8, 3
BASE = [(f"base{j}", f"base{j} document number {j} about topic{j} with uniqb{j} and some filler words here")
        for j in range(4)]


def _batch_doc(i: int, j: int) -> tuple[str, str]:
    return f"b{i}-{j}", f"batch{i} item{j} uniq{i}x{j} " + " ".join(f"w{i}{j}{n}" for n in range(6))


def _live_doc(version: int) -> dict:
    """Rewritten by every commit of the writer: 4+ chunks at even versions, one at odd ones, so a search that
    ranked with one generation's indexes and read another generation's rows would miss or mismatch chunks."""
    words = 14 if version % 2 == 0 else 3
    text = f"live version{version} " + " ".join(f"v{version}word{n}" for n in range(words))
    return {"id": "live", "text": text, "metadata": {"version": version}}


def _history() -> list[tuple[set[str], int]]:
    """The store's state after each generation: history[g] = (document ids, live version); g = 1 is the
    initial add, then the writer's batch i (add, then every second batch a delete) for i = 1..BATCHES."""
    ids, live, out = {d for d, _ in BASE} | {"live"}, 0, [(set(), -1)]
    out.append((set(ids), live))
    for i in range(1, BATCHES + 1):
        ids |= {_batch_doc(i, j)[0] for j in range(PER_BATCH)}
        live = i
        out.append((set(ids), live))
        if i % 2 == 0:
            ids.discard(f"b{i - 1}-0")
            out.append((set(ids), live))
    return out


def _text_of(doc_id: str, live_version: int) -> str:
    if doc_id == "live":
        return _live_doc(live_version)["text"]
    if doc_id.startswith("base"):
        return dict(BASE)[doc_id]
    i, j = (int(x) for x in doc_id[1:].split("-"))
    return _batch_doc(i, j)[1]


def writer_main(directory: str, ready: str) -> None:
    """The writer: wait until the reader runs, then BATCHES adds (each rewriting "live") and deletes."""
    deadline = time.monotonic() + 60
    while not Path(ready).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the reader never became ready")
        time.sleep(0.01)
    with RagStore.open(directory, embedder=FakeEmbedder()) as store:
        for i in range(1, BATCHES + 1):
            assert store.add([_batch_doc(i, j) for j in range(PER_BATCH)] + [_live_doc(i)]) == PER_BATCH + 1
            if i % 2 == 0:
                assert store.delete(f"b{i - 1}-0") == 1
            time.sleep(0.01)  # leave the lock free for a moment: a reader's open may collect garbage then


def reader_main(directory: str, ready: str, done: str) -> None:
    """Child process: reopen the store and search in a loop until the writer is done; check each answer
    against the generation it came from; print a JSON line of statistics."""
    history, rng = _history(), random.Random(0)
    queries = ["live version word", "batch item", "document topic filler"] + [f"batch{i}" for i in range(1, 9)]
    searches, generations, deadline = 0, set(), time.monotonic() + 60
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the writer never finished")
        finished = Path(done).exists()  # read first: a round that starts after the writer must see its end
        with RagStore.open(directory, embedder=FakeEmbedder()) as store:
            for _ in range(8):
                hits = store.search(rng.choice(queries), k=8, mode=rng.choice(["bm25", "dense", "hybrid"]))
                gen = store.snapshot_generation
                ids, live = history[gen]
                for h in hits:
                    assert h.doc_id in ids, f"{h.doc_id} is not in generation {gen}"
                    if h.doc_id == "live":
                        assert h.metadata == {"version": live}, (gen, h.metadata)
                    assert h.text == _text_of(h.doc_id, live)[h.start:h.end], (gen, h)
                searches += 1
                generations.add(gen)
        Path(ready).touch()
        if finished:
            break
    print(json.dumps({"searches": searches, "generations": sorted(generations)}))


def _child(call: str) -> subprocess.Popen:
    """A Python child process running `test_store_concurrency.<call>`."""
    script = f"import sys; sys.path[:0] = [{str(HERE)!r}]; import test_store_concurrency as t; t.{call}"
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _index_ids_equal_rows(store: RagStore) -> None:
    rows = sorted(c.chunk_id for d in store.ids() for c in store.chunks(d))
    assert sorted(store._bm25.ids) == rows and sorted(store._dense.ids) == rows and len(rows) == store.num_chunks


def test_writer_and_reader_processes(tmp_path: Path) -> None:
    directory, ready, done = tmp_path / "kb", tmp_path / "ready", tmp_path / "done"
    with RagStore.open(directory, embedder=FakeEmbedder(), chunking=CHUNKING, bm25={"tokenizer": "en"}) as s:
        s.add([*BASE, _live_doc(0)])
        assert s.generation == 1
    reader = _child(f"reader_main({str(directory)!r}, {str(ready)!r}, {str(done)!r})")
    try:  # this process is the writer, the child the reader
        writer_main(str(directory), str(ready))
        done.touch()
        r_out, r_err = reader.communicate(timeout=90)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, r_err
    final = len(_history()) - 1
    stats = json.loads(r_out.strip().splitlines()[-1])
    # the reader ran before the writer's first commit and after its last one, every answer checked
    assert stats["generations"][0] == 1 and stats["generations"][-1] == final and stats["searches"] >= 16

    with RagStore.open(directory, embedder=FakeEmbedder()) as store:
        assert store.generation == final and set(store.ids()) == _history()[final][0]
        _index_ids_equal_rows(store)
        for doc_id in store.ids():  # every document findable through both indexes
            for c in store.chunks(doc_id):
                assert store.search(c.text, k=1, mode="dense")[0].chunk_id == c.chunk_id
            if "-" in doc_id:  # a writer batch document
                i, j = doc_id[1:].split("-")
                assert store.search(f"uniq{i}x{j}", k=1, mode="bm25")[0].doc_id == doc_id
        assert store.get("live")["metadata"] == {"version": BATCHES}
    # no orphaned generation, no temp file
    assert sorted(p.name for p in directory.iterdir()) == [f"index-{final:06d}", LOCK, "store.sqlite"]
    assert sorted(p.name for p in (directory / f"index-{final:06d}").iterdir()) == ["bm25.npz", "dense.npz"]


def _lock_is_free(directory: Path) -> bool:
    with _flock(directory / LOCK, exclusive=True, blocking=False) as free:
        return free


@pytest.fixture
def store(tmp_path: Path):
    with RagStore.open(tmp_path / "kb", embedder=FakeEmbedder(), chunking=CHUNKING, bm25={"tokenizer": "en"}) as s:
        s.add(BASE)
        yield s


def _answers(store: RagStore) -> list:
    return [[(h.chunk_id, round(h.score, 6)) for h in store.search(q, k=4, mode=m)]
            for q in ("document topic", "filler words uniqb2") for m in ("bm25", "dense", "hybrid")]


def test_open_leaves_a_live_writers_directory_alone(store: RagStore) -> None:
    """A writer holds the lock and is filling index-(g+1): a reader opening now must not delete it."""
    gen, before = store.generation, _answers(store)
    pending = store.directory / f"index-{gen + 1:06d}"
    with _flock(store.directory / LOCK, exclusive=True):
        pending.mkdir()
        (pending / "bm25.npz").write_bytes(b"half written")
        with RagStore.open(store.directory, embedder=FakeEmbedder()) as reader:
            assert _answers(reader) == before and reader.snapshot_generation == gen
        assert (pending / "bm25.npz").read_bytes() == b"half written"
    # the writer died without committing: the next opener that finds the lock free collects its directory
    with RagStore.open(store.directory, embedder=FakeEmbedder()) as again:
        assert _answers(again) == before
    assert not pending.exists() and (store.directory / f"index-{gen:06d}").is_dir()


def test_exception_inside_add_keeps_the_committed_store(store: RagStore, monkeypatch) -> None:
    """An exception in the middle of the update (rows written, indexes half-updated): every handle still
    answers from the committed generation, the writer lock is free, and the next updates work."""
    gen, before, n = store.generation, _answers(store), store.num_chunks

    def broken(self, ids, tokens):
        raise RuntimeError("crash inside the update")

    monkeypatch.setattr(BM25Index, "add_tokens", broken)
    with pytest.raises(RuntimeError, match="crash inside the update"):
        store.add([("x1", "a new document that never lands, uniqx1")])
    monkeypatch.undo()
    assert _lock_is_free(store.directory)
    assert store.generation == gen and store.num_chunks == n and store.get("x1") is None
    assert _answers(store) == before
    assert sorted(p.name for p in store.directory.glob("index-*")) == [f"index-{gen:06d}"]
    with RagStore.open(store.directory, embedder=FakeEmbedder()) as other:
        assert _answers(other) == before
        assert other.add([("x2", "a second handle writes uniqx2")]) == 1
    # the first handle sees the other's commit on its next search, and its own next update builds on it
    assert store.search("uniqx2", k=1, mode="bm25")[0].doc_id == "x2" and store.snapshot_generation == gen + 1
    assert store.add([("x3", "the first handle writes again uniqx3")]) == 1
    assert sorted(store.ids()) == sorted([d for d, _ in BASE] + ["x2", "x3"])
    _index_ids_equal_rows(store)
    assert sorted(p.name for p in store.directory.glob("index-*")) == [f"index-{gen + 2:06d}"]


def test_reader_that_keeps_losing_the_race_takes_the_shared_lock(store: RagStore, monkeypatch) -> None:
    with RagStore.open(store.directory, embedder=FakeEmbedder()) as other:
        other.add([("y", "moves the committed generation on uniqy")])
    lock_free_at_each_try = []
    real = RagStore._try_refresh

    def losing(self: RagStore) -> bool:
        lock_free_at_each_try.append(_lock_is_free(self.directory))
        return len(lock_free_at_each_try) > OPTIMISTIC_READS and real(self)

    monkeypatch.setattr(RagStore, "_try_refresh", losing)
    hits = store.search("uniqy", k=1, mode="bm25")
    assert hits[0].doc_id == "y" and store.snapshot_generation == store.generation
    # lock-free tries first, then one under the shared lock (an exclusive try fails meanwhile)
    assert lock_free_at_each_try[:OPTIMISTIC_READS + 1] == [True] * OPTIMISTIC_READS + [False]


def test_writer_waits_for_the_lock(store: RagStore) -> None:
    """Two handles: an update blocks while another holder has the writer lock."""
    import threading

    finished = threading.Event()
    with _flock(store.directory / LOCK, exclusive=True):
        worker = threading.Thread(target=lambda: (store.add([("z", "waits for the lock uniqz")]), finished.set()))
        worker.start()
        time.sleep(0.3)
        assert not finished.is_set() and store.get("z") is None
    worker.join(timeout=30)
    assert finished.is_set() and store.get("z") is not None


def test_store_on_a_read_only_medium_still_answers(store: RagStore, monkeypatch) -> None:
    """No lock file can be created there (nor any writer run): opening and searching work without it."""
    before = _answers(store)
    store.close()
    (store.directory / LOCK).unlink()
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with RagStore.open(store.directory, embedder=FakeEmbedder()) as again:
        assert _answers(again) == before
        with pytest.raises(PermissionError, match="Read-only"):
            again.add([("w", "cannot be written")])
