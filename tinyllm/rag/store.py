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

Atomicity. The database is the source of truth and its `generation` says which index directory matches it.
An update (add or delete) first does all the work that can fail for reasons of its own — chunking, embedding,
tokenizing — without touching anything; then, inside one SQLite transaction, it writes the rows, bumps the
generation to g+1 and writes the updated indexes into a *new* directory `index-(g+1)`; only then it commits,
and after the commit it deletes `index-g`. A failure before the commit rolls the transaction back, deletes
the half-written directory and reloads the indexes of generation g; a crash at any point leaves the
committed generation's directory intact (SQLite's journal undoes an uncommitted transaction on the next
open, which also deletes stray index directories). The database and the index files therefore never
disagree. The price: each update rewrites the index files, so add documents in batches.

Upsert: adding an id that exists replaces the document and all its chunks; a document whose text, source and
metadata are unchanged is skipped (re-indexing a folder only embeds what changed). Search modes: "bm25",
"dense" (embed the query, nearest chunk vectors) and "hybrid" (reciprocal rank fusion of both lists).
One writer at a time; scaling beyond one machine means the same interface over a server database.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tinyllm.rag.bm25 import BM25Index
from tinyllm.rag.chunk import STRATEGIES, Chunk, chunk_document
from tinyllm.rag.dense import DenseIndex
from tinyllm.rag.index import reciprocal_rank_fusion

FORMAT = "tinyllm-rag-store/1"
DB = "store.sqlite"
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
        self._lock = threading.RLock()  # one update or search at a time (a server may call from threads)
        self._load_indexes()

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
        # transactions are explicit; the connection may be used from another thread (always under the store's lock)
        conn = sqlite3.connect(directory / DB, isolation_level=None, check_same_thread=False)
        try:
            conn.executescript(SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            given = {"chunking": chunking, "bm25": bm25, "dense": dense}
            if "format" not in meta:
                config = {"chunking": _check_chunking(chunking or {}), "bm25": {**DEFAULT_BM25, **(bm25 or {})},
                          "dense": {**DEFAULT_DENSE, **(dense or {})}}
                spec = embedder.spec() if embedder is not None else None
                rows = {"format": FORMAT, "generation": "0", "embedder": json.dumps(spec),
                        **{k: json.dumps(v) for k, v in config.items()}}
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
                conn.execute("COMMIT")
            else:
                if meta["format"] != FORMAT:
                    raise ValueError(f"{directory}: store format {meta['format']!r}, expected {FORMAT!r}")
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
    def _reopen_embedder(conn: sqlite3.Connection, directory: Path, embedder: Any, spec: Any) -> Any:
        if embedder is None:
            if spec is None:
                return None
            from tinyllm.rag.embed import load_embedder

            return load_embedder(spec)
        if embedder.spec() != spec:
            n = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
            if n:
                raise ValueError(f"{directory}: embedder {embedder.spec()} differs from the stored {spec}; "
                                 "its vectors would not be comparable (open a new store to re-embed)")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'embedder'", (json.dumps(embedder.spec()),))
            conn.execute("COMMIT")
        return embedder

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RagStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- generations

    @property
    def generation(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _index_dir(self, generation: int) -> Path:
        return self.directory / f"index-{generation:06d}"

    def _load_indexes(self) -> None:
        """Indexes of the committed generation; directories of other generations are leftovers: deleted."""
        gen = self.generation
        for stray in self.directory.glob("index-*"):
            if stray != self._index_dir(gen):
                shutil.rmtree(stray, ignore_errors=True)
        here = self._index_dir(gen)
        self._bm25 = BM25Index.load(here) if gen else BM25Index(**self.bm25_config)
        self._dense = None
        if self.embedder is not None:
            if gen and (here / "dense.npz").exists():
                self._dense = DenseIndex.load(here)
            else:
                self._dense = DenseIndex(int(self.embedder.dim), **self.dense_config)

    def _commit_update(self, write_rows: Any, apply: Any) -> None:
        """Rows + generation bump + new index directory, then COMMIT, then drop the old directory."""
        with self._lock:
            self._commit_update_locked(write_rows, apply)

    def _commit_update_locked(self, write_rows: Any, apply: Any) -> None:
        old = self.generation
        new_dir = self._index_dir(old + 1)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            write_rows()
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(old + 1),))
            apply()
            shutil.rmtree(new_dir, ignore_errors=True)
            self._bm25.save(new_dir)
            if self._dense is not None:
                self._dense.save(new_dir)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            shutil.rmtree(new_dir, ignore_errors=True)
            self._load_indexes()  # back to generation `old`, as on disk
            raise
        shutil.rmtree(self._index_dir(old), ignore_errors=True)

    # -------------------------------------------------------------------------------------------- updates

    def _unchanged(self, doc: dict[str, Any]) -> bool:
        row = self._db.execute("SELECT text, source, metadata FROM documents WHERE id = ?", (doc["id"],)).fetchone()
        return row is not None and row == (doc["text"], doc["source"], json.dumps(doc["metadata"], sort_keys=True))

    def add(self, documents: Iterable[Any], batch_size: int | None = None, progress: bool | None = None) -> int:
        """Insert or replace documents; returns how many were (re)indexed (unchanged ones are skipped)."""
        docs = [_document(d) for d in documents]
        ids = [d["id"] for d in docs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate document id {next(i for i in ids if ids.count(i) > 1)!r} in one add")
        docs = [d for d in docs if not self._unchanged(d)]
        if not docs:
            return 0
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
        for i in doc_ids:
            out += [r[0] for r in self._db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ?", (i,))]
        return out

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM documents").fetchone()[0]

    def __contains__(self, doc_id: str) -> bool:
        return self.get(doc_id) is not None

    @property
    def num_chunks(self) -> int:
        return self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM documents ORDER BY id")]

    def get(self, doc_id: str) -> dict[str, Any] | None:
        """The stored document {"id", "text", "source", "metadata"}, or None."""
        row = self._db.execute("SELECT id, text, source, metadata FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else {"id": row[0], "text": row[1], "source": row[2],
                                         "metadata": json.loads(row[3])}

    def chunks(self, doc_id: str) -> list[Chunk]:
        """The chunks of one document, in order."""
        rows = self._db.execute("SELECT c.doc_id, c.idx, c.start_char, c.end_char, c.text, c.metadata, d.source "
                                "FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.doc_id = ? "
                                "ORDER BY c.idx", (doc_id,))
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
        with self._lock:
            if mode == "bm25":
                return self._hits(self._bm25.search(query, k))
            if mode == "dense":
                return self._hits(self._dense.search(qv, k)[0])
            depth = max(k, candidates)
            fused = reciprocal_rank_fusion([self._bm25.search(query, depth), self._dense.search(qv, depth)[0]])
            return self._hits([(str(i), s) for i, s in fused[:k]])
