"""A persistent RAG store: documents, chunks, a BM25 index and a vector index in one directory (notes ch.08.1.e
"vector database semantics": CRUD, raw text + metadata next to the vectors, persistence; ch.08.1.j upsert/
query/delete of the ChatGPT retrieval plugin).

    with RagStore.open("kb", embedder=HashingEmbedder(256)) as store:
        store.add([{"id": "a", "text": "...", "source": "a.md", "metadata": {"year": 2023}}, ("b", "...")])
        hits = store.search("问题", k=5, mode="hybrid")      # list[Hit], best first
        store.delete("a")

On disk:

    kb/store.sqlite          SQLite (stdlib): documents(id, text, source, metadata), chunks(chunk_id, doc_id,
                             idx, start_char, end_char, text, metadata), meta(format, generation, chunking,
                             embedder spec, bm25 and dense configs)
    kb/index-000007/         the indexes of generation 7: bm25.npz, dense.npz (+ faiss-*.index for IVF/HNSW)
    kb/store.lock            the writer lock (an empty file; `flock` on it)

Atomicity. The database is the source of truth and its `generation` says which index directory matches it.
An update (add or delete) first does all the work that can fail for reasons of its own — chunking, embedding,
tokenizing — without touching anything; then, inside one SQLite transaction, it writes the rows, bumps the
generation to g+1 and writes the updated indexes into a *new* directory `index-(g+1)`; only then it commits,
and after the commit it deletes `index-g`. A failure before the commit rolls the transaction back, deletes
the half-written directory and reloads the indexes of generation g; a crash at any point leaves the
committed generation's directory intact (SQLite's journal undoes an uncommitted transaction on the next
open, and the next process to hold the writer lock deletes the stray directory). The database and the
index files therefore never disagree. The price: each update rewrites the index files, so add documents in
batches.

Concurrency. Any number of processes (and threads) may open one store; the rule is:
- a writer (add, delete, creating the store, recording a new embedder) holds an exclusive `flock` on
  `store.lock` for the whole update, from reading what is stored to the commit and the clean-up after it, so
  updates are serial, and each first reloads the indexes if another process committed since it last looked;
- only a holder of that lock deletes index directories, and it deletes every directory except the committed
  generation's: an uncommitted one can only be a dead writer's, since no other writer is live. Opening a
  store collects such leftovers only when the lock is free at that moment (a non-blocking try); it never
  waits for a writer and never touches what a live writer is writing;
- a reader works on a snapshot: it reads the committed generation g, loads `index-g`, and keeps the result
  only if g is still the committed generation afterwards (a directory is deleted only once it is no longer
  committed, so then nothing can have gone missing mid-read); a reader that keeps losing that race to fast
  writers takes the lock in shared mode, under which no writer runs. Each search runs in one SQLite read
  transaction that checks the generation of the loaded indexes is still the committed one (reloading and
  retrying when not), so the ranked chunk ids and the rows they are read from belong to one generation: a
  search sees every update committed before it started, never a half-done one.
Searches wait for a writer's chunking and embedding only in that fallback, otherwise at most briefly for its
commit (SQLite's own locking, with a 30 s busy timeout). The lock is
advisory and POSIX-only (`fcntl`): on Windows, or on a network file system without `flock`, keep to one
writing process. Scaling beyond one machine means the same interface over a server database.

Upsert: adding an id that exists replaces the document and all its chunks; a document whose text, source and
metadata are unchanged is skipped (re-indexing a folder only embeds what changed). Search modes: "bm25",
"dense" (embed the query, nearest chunk vectors) and "hybrid" (reciprocal rank fusion of both lists).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tinyllm.rag.bm25 import BM25Index
from tinyllm.rag.chunk import STRATEGIES, Chunk, chunk_document
from tinyllm.rag.dense import DenseIndex
from tinyllm.rag.index import reciprocal_rank_fusion

try:
    import fcntl
except ImportError:  # Windows: no flock (see the module doc)
    fcntl = None  # type: ignore[assignment]

FORMAT = "tinyllm-rag-store/1"
DB = "store.sqlite"
LOCK = "store.lock"
OPTIMISTIC_READS = 3  # lock-free snapshot attempts before a reader takes the shared lock
MODES = ("bm25", "dense", "hybrid")
DEFAULT_CHUNKING = {"strategy": "recursive", "size": 500, "overlap": 50}
DEFAULT_BM25 = {"variant": "okapi", "k1": 1.5, "b": 0.75, "tokenizer": "zh"}
DEFAULT_DENSE = {"backend": "exact", "metric": "ip"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(id TEXT PRIMARY KEY, text TEXT NOT NULL, source TEXT NOT NULL,
                                     metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(chunk_id TEXT PRIMARY KEY, doc_id TEXT NOT NULL, idx INTEGER NOT NULL,
                                  start_char INTEGER NOT NULL, end_char INTEGER NOT NULL, text TEXT NOT NULL,
                                  metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id);
"""


@dataclass
class Hit:
    """One retrieved chunk: `text == document[start:end]`; metadata = document's, updated by the chunk's."""

    doc_id: str
    chunk_id: str
    text: str
    start: int
    end: int
    score: float
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def _document(doc: Any) -> dict[str, Any]:
    """A document dict {"id", "text", "source", "metadata"} from a dict or an (id, text) pair."""
    if isinstance(doc, tuple) and len(doc) == 2:
        doc = {"id": doc[0], "text": doc[1]}
    if not isinstance(doc, dict):
        raise ValueError(f"a document is a dict or an (id, text) tuple, got {type(doc).__name__}")
    unknown = set(doc) - {"id", "text", "source", "metadata"}
    if unknown:
        raise ValueError(f"unknown document fields {sorted(unknown)}")
    doc_id, text = doc.get("id"), doc.get("text")
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError(f"document id={doc_id!r} must be a non-empty str")
    if not isinstance(text, str):
        raise ValueError(f"document {doc_id!r}: text must be a str, got {type(text).__name__}")
    source, metadata = doc.get("source") or "", doc.get("metadata") or {}
    if not isinstance(source, str) or not isinstance(metadata, dict):
        raise ValueError(f"document {doc_id!r}: source must be a str and metadata a dict")
    json.dumps(metadata)  # must be JSON-able: raises TypeError naming the bad value otherwise
    return {"id": doc_id, "text": text, "source": source, "metadata": metadata}


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """Hold an flock on `path`; yields False instead when `blocking=False` and another holder has it.

    Each call opens its own file description, so two handles in one process (or two threads) exclude each
    other exactly as two processes do; closing the descriptor releases the lock, also when a process dies.
    Where the lock file cannot be created (a store on a read-only medium) no writer can be live either:
    readers go on without the lock, nobody collects garbage, and a writer gets the error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        if exclusive and blocking:
            raise
        yield not exclusive
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        os.close(fd)


def _check_chunking(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {**DEFAULT_CHUNKING, **cfg}
    unknown = set(cfg) - {"strategy", "size", "overlap", "separators"}
    if unknown:
        raise ValueError(f"unknown chunking options {sorted(unknown)}")
    if cfg["strategy"] not in STRATEGIES:
        raise ValueError(f"chunking strategy={cfg['strategy']!r} must be one of {STRATEGIES}")
    chunk_document("check", "x", **cfg)  # validates size and overlap
    return cfg


class RagStore:
    """Documents + chunks in SQLite, BM25 and dense indexes in generation directories; see the module doc."""

    def __init__(self, directory: Path, conn: sqlite3.Connection, embedder: Any, config: dict[str, Any]) -> None:
        self.directory, self._db, self.embedder = directory, conn, embedder
        self.chunking, self.bm25_config, self.dense_config = config["chunking"], config["bm25"], config["dense"]
        self.batch_size, self.progress = 32, False
        # the connection's transactions and the in-memory indexes are shared by this handle's threads (a server)
        self._lock = threading.RLock()
        self._write_mutex = threading.Lock()  # this handle's updates, also where flock is unavailable
        self._lock_path = directory / LOCK
        self._gen = -1  # generation of the in-memory indexes; -1: none loaded yet
        self._bm25: BM25Index = BM25Index(**self.bm25_config)
        self._dense: DenseIndex | None = None
        with _flock(self._lock_path, exclusive=True, blocking=False) as free:
            if free:  # no live writer: directories of other generations are superseded or a dead writer's
                self._collect_garbage()
        self._refresh()

    # ----------------------------------------------------------------------------------------- open/close

    @classmethod
    def open(cls, directory: str | os.PathLike, embedder: Any = None, chunking: dict[str, Any] | None = None,
             bm25: dict[str, Any] | None = None, dense: dict[str, Any] | None = None) -> RagStore:
        """Open the store in `directory`, creating it when missing.

        On creation `chunking` (strategy/size/overlap), `bm25` (variant/k1/b/tokenizer) and `dense`
        (backend/metric/...) are stored; on reopen they may be omitted or must equal the stored ones. The
        embedder's `spec()` is stored too; reopened without `embedder`, the store rebuilds it with
        `tinyllm.rag.embed.load_embedder(spec)`. With no embedder the store is BM25-only.
        """
        directory = Path(directory)
        if not (directory / DB).exists():  # validate before anything is written
            _check_chunking(chunking or {})
            BM25Index(**{**DEFAULT_BM25, **(bm25 or {})})
            DenseIndex(int(embedder.dim) if embedder is not None else 1, **{**DEFAULT_DENSE, **(dense or {})})
        directory.mkdir(parents=True, exist_ok=True)
        # transactions are explicit; the connection may be used from another thread (always under the store's
        # lock); the busy timeout covers another process's commit
        conn = sqlite3.connect(directory / DB, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            meta = cls._meta(conn)
            if "format" not in meta:  # a new store, created by whichever opener takes the writer lock first
                with _flock(directory / LOCK, exclusive=True):
                    conn.executescript(SCHEMA)
                    meta = cls._meta(conn)
                    if "format" not in meta:
                        config = {"chunking": _check_chunking(chunking or {}),
                                  "bm25": {**DEFAULT_BM25, **(bm25 or {})}, "dense": {**DEFAULT_DENSE, **(dense or {})}}
                        spec = embedder.spec() if embedder is not None else None
                        meta = {"format": FORMAT, "generation": "0", "embedder": json.dumps(spec),
                                **{k: json.dumps(v) for k, v in config.items()}}
                        conn.execute("BEGIN IMMEDIATE")
                        conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                        conn.execute("COMMIT")
            if meta["format"] != FORMAT:
                raise ValueError(f"{directory}: store format {meta['format']!r}, expected {FORMAT!r}")
            given = {"chunking": chunking, "bm25": bm25, "dense": dense}
            config = {k: json.loads(meta[k]) for k in given}
            for key, value in given.items():
                defaults = {"chunking": DEFAULT_CHUNKING, "bm25": DEFAULT_BM25, "dense": DEFAULT_DENSE}[key]
                if value is not None and {**defaults, **value} != config[key]:
                    raise ValueError(f"{directory}: {key}={value!r} differs from the stored {config[key]!r}")
            embedder = cls._reopen_embedder(conn, directory, embedder, json.loads(meta["embedder"]))
            return cls(directory, conn, embedder, config)
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _meta(conn: sqlite3.Connection) -> dict[str, str]:
        """The meta rows; empty for a database that holds no store yet (read without writing anything)."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
            return {}
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    @staticmethod
    def _reopen_embedder(conn: sqlite3.Connection, directory: Path, embedder: Any, spec: Any) -> Any:
        if embedder is None:
            if spec is None:
                return None
            from tinyllm.rag.embed import load_embedder

            return load_embedder(spec)
        if embedder.spec() != spec:
            with _flock(directory / LOCK, exclusive=True):  # a write: counted and recorded under the writer lock
                n = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
                if n:
                    raise ValueError(f"{directory}: embedder {embedder.spec()} differs from the stored {spec}; "
                                     "its vectors would not be comparable (open a new store to re-embed)")
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE meta SET value = ? WHERE key = 'embedder'", (json.dumps(embedder.spec()),))
                conn.execute("COMMIT")
        return embedder

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RagStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- generations

    @property
    def generation(self) -> int:
        """The committed generation: what the next search sees."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    @property
    def snapshot_generation(self) -> int:
        """The generation of the indexes this handle holds in memory: the one its last search used."""
        return self._gen

    def _index_dir(self, generation: int) -> Path:
        return self.directory / f"index-{generation:06d}"

    def _read_generation(self, gen: int) -> tuple[BM25Index, DenseIndex | None]:
        """The index files of generation `gen` (empty indexes for generation 0, which has no directory)."""
        here = self._index_dir(gen)
        bm25 = BM25Index.load(here) if gen else BM25Index(**self.bm25_config)
        dense = None
        if self.embedder is not None:  # no dense.npz: the generation was written while the store had no embedder
            dense = (DenseIndex.load(here) if gen and (here / "dense.npz").exists()
                     else DenseIndex(int(self.embedder.dim), **self.dense_config))
        return bm25, dense

    def _try_refresh(self) -> bool:
        """One snapshot read; True when the in-memory indexes are the committed generation's afterwards."""
        gen = self.generation
        if gen == self._gen:
            return True
        try:
            loaded = self._read_generation(gen)
        except Exception:
            if self.generation == gen:
                raise  # the committed generation itself is unreadable: a damaged store, not a race
            return False
        if self.generation != gen:  # superseded and maybe collected while read (a file may have looked absent)
            return False
        with self._lock:
            if gen > self._gen:  # another thread of this handle may have moved further meanwhile
                self._gen, (self._bm25, self._dense) = gen, loaded
        return True

    def _refresh(self, locked: bool = False) -> None:
        """Bring the in-memory indexes to the committed generation. `locked`: the caller holds the store lock
        (either mode), so no generation is collected meanwhile; otherwise a few lock-free tries, then the
        shared lock. Never called while holding `self._lock` (lock order: file lock, then `self._lock`)."""
        attempts = 0
        while not self._try_refresh():
            attempts += 1
            if not locked and attempts >= OPTIMISTIC_READS:
                with _flock(self._lock_path, exclusive=False):
                    self._refresh(locked=True)
                return

    def _collect_garbage(self) -> None:
        """Delete every index directory except the committed generation's. Only a holder of the writer lock may
        call this: then no other writer is live, so the rest are superseded generations or a dead writer's."""
        keep = self._index_dir(self.generation)
        for stray in self.directory.glob("index-*"):
            if stray != keep:
                shutil.rmtree(stray, ignore_errors=True)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The writer lock, against this handle's threads and every other handle and process, with the
        indexes brought up to date (another process may have committed since this handle last looked)."""
        with self._write_mutex, _flock(self._lock_path, exclusive=True):
            self._refresh(locked=True)
            yield

    def _commit_update(self, write_rows: Any, apply: Any) -> None:
        """Rows + generation bump + new index directory, then COMMIT, then drop the old directory.
        The caller holds the writer lock (`_writing`)."""
        old = self._gen
        new_dir = self._index_dir(old + 1)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                write_rows()
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(old + 1),))
                apply()
                shutil.rmtree(new_dir, ignore_errors=True)  # a dead writer's leftover of the same number
                self._bm25.save(new_dir)
                if self._dense is not None:
                    self._dense.save(new_dir)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                shutil.rmtree(new_dir, ignore_errors=True)
                self._bm25, self._dense = self._read_generation(old)  # back to generation `old`, as on disk
                raise
            self._gen = old + 1
        self._collect_garbage()

    # -------------------------------------------------------------------------------------------- updates

    def _unchanged(self, doc: dict[str, Any]) -> bool:
        with self._lock:
            row = self._db.execute("SELECT text, source, metadata FROM documents WHERE id = ?",
                                   (doc["id"],)).fetchone()
        return row is not None and row == (doc["text"], doc["source"], json.dumps(doc["metadata"], sort_keys=True))

    def add(self, documents: Iterable[Any], batch_size: int | None = None, progress: bool | None = None) -> int:
        """Insert or replace documents; returns how many were (re)indexed (unchanged ones are skipped)."""
        docs = [_document(d) for d in documents]
        ids = [d["id"] for d in docs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate document id {next(i for i in ids if ids.count(i) > 1)!r} in one add")
        with self._writing():  # what is stored is read, and the update made, under the writer lock
            docs = [d for d in docs if not self._unchanged(d)]
            if not docs:
                return 0  # the lock is released on the way out
            chunks: list[Chunk] = []
            for d in docs:
                chunks += chunk_document(d["id"], d["text"], source=d["source"], **self.chunking)
            # everything that can fail on its own happens before the store is touched
            progress = self.progress if progress is None else progress
            tokens = [self._bm25.tokenizer(c.text) for c in tqdm(chunks, desc="bm25 tokens", disable=not progress)]
            vectors = None
            if self._dense is not None:
                vectors = np.asarray(self.embedder.encode([c.text for c in chunks], batch_size or self.batch_size,
                                                          progress))
                if vectors.shape != (len(chunks), self._dense.dim):
                    raise ValueError(f"embedder returned shape {vectors.shape}, expected ({len(chunks)}, "
                                     f"{self._dense.dim})")
            old_ids: list[str] = []  # read inside the update's lock and transaction

            def write_rows() -> None:
                old_ids.extend(self._chunk_ids([d["id"] for d in docs]))
                self._db.executemany("DELETE FROM chunks WHERE doc_id = ?", [(d["id"],) for d in docs])
                self._db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?)",
                                     [(d["id"], d["text"], d["source"], json.dumps(d["metadata"], sort_keys=True))
                                      for d in docs])
                self._db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     [(c.chunk_id, c.doc_id, c.index, c.start, c.end, c.text, json.dumps(c.metadata))
                                      for c in chunks])

            def apply() -> None:
                new_ids = [c.chunk_id for c in chunks]
                self._bm25.remove(old_ids)
                self._bm25.add_tokens(new_ids, tokens)
                if self._dense is not None:
                    self._dense.remove(old_ids)
                    if new_ids:
                        self._dense.add(new_ids, vectors)

            self._commit_update(write_rows, apply)
        return len(docs)

    def delete(self, doc_ids: str | Sequence[str]) -> int:
        """Remove documents and their chunks; returns how many existed."""
        doc_ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
        with self._writing():
            present = [i for i in doc_ids if self.get(i) is not None]
            if not present:
                return 0
            old_ids: list[str] = []

            def write_rows() -> None:
                old_ids.extend(self._chunk_ids(present))
                self._db.executemany("DELETE FROM chunks WHERE doc_id = ?", [(i,) for i in present])
                self._db.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in present])

            def apply() -> None:
                self._bm25.remove(old_ids)
                if self._dense is not None:
                    self._dense.remove(old_ids)

            self._commit_update(write_rows, apply)
        return len(present)

    # -------------------------------------------------------------------------------------------- reading

    def _chunk_ids(self, doc_ids: Sequence[str]) -> list[str]:
        out: list[str] = []
        with self._lock:
            for i in doc_ids:
                out += [r[0] for r in self._db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ?", (i,))]
        return out

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM documents").fetchone()[0]

    def __contains__(self, doc_id: str) -> bool:
        return self.get(doc_id) is not None

    @property
    def num_chunks(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM documents ORDER BY id")]

    def get(self, doc_id: str) -> dict[str, Any] | None:
        """The stored document {"id", "text", "source", "metadata"}, or None."""
        with self._lock:
            row = self._db.execute("SELECT id, text, source, metadata FROM documents WHERE id = ?",
                                   (doc_id,)).fetchone()
        return None if row is None else {"id": row[0], "text": row[1], "source": row[2],
                                         "metadata": json.loads(row[3])}

    def chunks(self, doc_id: str) -> list[Chunk]:
        """The chunks of one document, in order."""
        with self._lock:
            rows = self._db.execute("SELECT c.doc_id, c.idx, c.start_char, c.end_char, c.text, c.metadata, "
                                    "d.source FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.doc_id = ? "
                                    "ORDER BY c.idx", (doc_id,)).fetchall()
        return [Chunk(text, s, e, doc_id=d, source=src, index=i, metadata=json.loads(m))
                for d, i, s, e, text, m, src in rows]

    def _hits(self, ranked: list[tuple[str, float]]) -> list[Hit]:
        if not ranked:
            return []
        marks = ",".join("?" * len(ranked))
        rows = self._db.execute(
            "SELECT c.chunk_id, c.doc_id, c.text, c.start_char, c.end_char, c.metadata, d.source, d.metadata "
            f"FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.chunk_id IN ({marks})",
            [cid for cid, _ in ranked]).fetchall()
        by_id = {r[0]: r for r in rows}
        hits = []
        for cid, score in ranked:
            cid_, doc_id, text, start, end, cmeta, source, dmeta = by_id[cid]
            hits.append(Hit(doc_id, cid_, text, start, end, float(score), source,
                            {**json.loads(dmeta), **json.loads(cmeta)}))
        return hits

    def search(self, query: str, k: int = 10, mode: str | None = None, candidates: int = 50) -> list[Hit]:
        """Top-k chunks for `query`. `mode`: "bm25", "dense" or "hybrid" (RRF of both top-`candidates`
        lists, scores Σ 1/(60 + rank)); the default is "hybrid" with an embedder and "bm25" without."""
        if not isinstance(query, str):
            raise ValueError(f"query must be a str, got {type(query).__name__}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1")
        mode = mode or ("hybrid" if self._dense is not None else "bm25")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        if mode != "bm25" and self._dense is None:
            raise ValueError(f"mode={mode!r} needs an embedder; this store has none (BM25 only)")
        qv = None
        if mode != "bm25":
            encode = getattr(self.embedder, "encode_queries", self.embedder.encode)
            qv = np.asarray(encode([query]), dtype=np.float32)
        attempts = 0
        while True:  # reload and retry when a writer commits between the refresh and the read transaction
            shared = attempts >= OPTIMISTIC_READS  # then under the shared lock, where no writer commits
            with _flock(self._lock_path, exclusive=False) if shared else contextlib.nullcontext():
                self._refresh(locked=shared)
                hits = self._search_snapshot(query, k, mode, candidates, qv)
            if hits is not None:
                return hits
            attempts += 1

    def _search_snapshot(self, query: str, k: int, mode: str, candidates: int,
                         qv: np.ndarray | None) -> list[Hit] | None:
        """Rank with the in-memory indexes and read the hits' rows in one read transaction; None when those
        indexes are no longer the committed generation (a writer committed since the refresh)."""
        with self._lock:
            self._db.execute("BEGIN")  # a read transaction: the rows below stay those of one generation
            try:
                if self.generation != self._gen:
                    return None
                if mode == "bm25":
                    return self._hits(self._bm25.search(query, k))
                if mode == "dense":
                    return self._hits(self._dense.search(qv, k)[0])
                depth = max(k, candidates)
                fused = reciprocal_rank_fusion([self._bm25.search(query, depth), self._dense.search(qv, depth)[0]])
                return self._hits([(str(i), s) for i, s in fused[:k]])
            finally:
                self._db.execute("COMMIT")
