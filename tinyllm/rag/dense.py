"""Dense vector indexes: exact search and faiss Flat / IVF / HNSW (notes ch.08.1.d, ch.08.1.e).

An embedder turns each chunk into a vector; retrieval is the k nearest vectors to the query's vector. With
L2-normalised vectors cosine similarity is the inner product (`metric="ip"`); `metric="l2"` ranks by squared
Euclidean distance, the score Pinecone and faiss report (smaller is nearer).

Backends, same interface (`add(ids, vectors)`, `remove(ids)`, `search(queries, k)`, `save`/`load`):
- "exact": one matrix product S = Q·Vᵀ (torch, honouring the thread setting) and `torch.topk` — O(n·d) per
  query, exact. The notes: for up to ~100k vectors brute force is as fast as an ANN index.
- "faiss-flat": `faiss.IndexFlatIP/L2` behind `IndexIDMap` — also exact; the tests check it returns the
  same ids and scores as "exact".
- "faiss-ivf": inverted file (Jégou et al. 2011): k-means splits the space into `nlist` cells, a vector is
  stored in its nearest cell's list, a query scans only the `nprobe` nearest cells — ≈ nprobe/nlist of the
  work, recall < 1 when a neighbour sits in an unscanned cell. It needs training (k-means on the vectors
  present at the first search); later additions go to the trained cells. faiss's own ids are used: wrapping
  an IVF index in `IndexIDMap` gives wrong ids after `remove_ids` (IDMap assumes removal shifts the
  sub-index's positions, which IVF does not do).
- "faiss-hnsw": hierarchical navigable small-world graph (Malkov & Yashunin 2018): greedy search through
  layers of a proximity graph, `M` links per node, `ef_search` candidates kept; log-like query time, the
  best recall/speed trade-off in memory, but no deletion — removing rebuilds the graph at the next search.

The index keeps the float32 matrix itself (for "exact", for rebuilding faiss indexes and for saving), and
maps string ids to faiss's int64 labels through a counter that only grows, so labels never need renumbering.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinyllm.atomic import atomic_open, atomic_path

BACKENDS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
METRICS = ("ip", "l2")
FILE = "dense.npz"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is in the rag extra
        raise ImportError("faiss backends need faiss-cpu: pip install 'tinyllm[rag]'") from e
    return faiss


class DenseIndex:
    """k-nearest-neighbour search over string-keyed vectors."""

    def __init__(self, dim: int, backend: str = "exact", metric: str = "ip", nlist: int | None = None,
                 nprobe: int = 8, hnsw_m: int = 32, ef_construction: int = 40, ef_search: int = 64) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} must be an integer >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} must be one of {METRICS}")
        for name, v in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                        ("ef_search", ef_search)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if nlist is not None and (not isinstance(nlist, int) or nlist < 1):
            raise ValueError(f"nlist={nlist!r} must be an integer >= 1")
        self.dim, self.backend, self.metric = dim, backend, metric
        self.params = {"nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m, "ef_construction": ef_construction,
                       "ef_search": ef_search}
        self._vectors = np.zeros((0, dim), np.float32)
        self._labels = np.zeros(0, np.int64)  # ascending: appended from a growing counter, removal keeps order
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._next_label = 0
        self._faiss: Any = None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors

    # -------------------------------------------------------------------------------------------- updates

    def _check_vectors(self, vectors: Any, what: str) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} have shape {tuple(np.shape(vectors))}, expected (n, {self.dim})")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or inf")
        return x

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors under string ids; an id already present is replaced (upsert)."""
        x = self._check_vectors(vectors, "vectors")
        ids = [str(i) for i in ids]
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids but {len(x)} vectors")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        self.remove([i for i in ids if i in self._row])
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        self._next_label += len(ids)
        for r, i in enumerate(ids, len(self._ids)):
            self._row[i] = r
        self._ids.extend(ids)
        self._vectors = np.concatenate([self._vectors, x])
        self._labels = np.concatenate([self._labels, labels])
        if self._faiss is not None and len(x):
            self._faiss.add_with_ids(x, labels)

    def remove(self, ids: Iterable[str]) -> None:
        """Drop vectors by id (unknown ids are ignored)."""
        rows = sorted({self._row[i] for i in map(str, ids) if i in self._row})
        if not rows:
            return
        keep = np.ones(len(self._ids), dtype=bool)
        keep[rows] = False
        gone = self._labels[~keep]
        self._vectors, self._labels = self._vectors[keep], self._labels[keep]
        self._ids = [i for i, k in zip(self._ids, keep) if k]
        self._row = {i: r for r, i in enumerate(self._ids)}
        if self._faiss is not None:
            if self.backend == "faiss-hnsw":
                self._faiss = None  # HNSW graphs do not support deletion: rebuild lazily
            else:
                self._faiss.remove_ids(gone)

    # ------------------------------------------------------------------------------------------- faiss

    def _nlist(self, n: int) -> int:
        want = self.params["nlist"] or max(1, int(4 * np.sqrt(n)))
        return max(1, min(want, n // 39 if n >= 39 else 1))  # faiss wants >= 39 training points per cell

    def _build(self) -> Any:
        faiss = _faiss()
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        d = self.dim
        if self.backend == "faiss-flat":
            index = faiss.IndexIDMap(faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d))
        elif self.backend == "faiss-ivf":
            quantizer = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, self._nlist(len(self._ids)), metric)
            index.nprobe = self.params["nprobe"]
            index.train(self._vectors)
        else:
            hnsw = faiss.IndexHNSWFlat(d, self.params["hnsw_m"], metric)
            hnsw.hnsw.efConstruction = self.params["ef_construction"]
            hnsw.hnsw.efSearch = self.params["ef_search"]
            index = faiss.IndexIDMap(hnsw)
        if len(self._ids):
            index.add_with_ids(self._vectors, self._labels)
        return index

    def _ensure_faiss(self) -> Any:
        if (self._faiss is not None and self.backend == "faiss-ivf"
                and self._nlist(len(self._ids)) >= 2 * self._faiss.nlist):
            self._faiss = None  # trained on far fewer vectors than it holds now: retrain the cells
        if self._faiss is None:
            self._faiss = self._build()
        return self._faiss

    # -------------------------------------------------------------------------------------------- queries

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch  # lazily: a BM25-only store never pays torch's import time

        v = torch.from_numpy(self._vectors)
        block = max(1, (1 << 24) // max(len(self._ids), 1))
        scores, rows = [], []
        for s in range(0, len(q), block):
            qb = torch.from_numpy(q[s:s + block])
            sim = qb @ v.T
            if self.metric == "ip":
                top = torch.topk(sim, k, dim=1)
                scores.append(top.values)
            else:  # ‖q − v‖² = ‖q‖² − 2 q·v + ‖v‖²
                dist = (qb * qb).sum(1, keepdim=True) - 2 * sim + (v * v).sum(1)[None]
                top = torch.topk(dist, k, dim=1, largest=False)
                scores.append(top.values.clamp_min(0))
            rows.append(top.indices)
        return torch.cat(scores).numpy(), torch.cat(rows).numpy()

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """For each query row, its k best (id, score): descending inner product, or ascending squared L2."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1")
        q = self._check_vectors(queries, "queries")
        k_eff = min(k, len(self._ids))
        if k_eff == 0:
            return [[] for _ in range(len(q))]
        if self.backend == "exact":
            scores, rows = self._search_exact(q, k_eff)
        else:
            scores, labels = self._ensure_faiss().search(q, k_eff)
            rows = np.where(labels >= 0, np.searchsorted(self._labels, labels), -1)
        return [[(self._ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]

    # ------------------------------------------------------------------------------------------ persistence

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "backend": self.backend, "metric": self.metric, **self.params}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `dense.npz` (vectors, labels, ids, config) and, for IVF/HNSW, the faiss index beside it.

        The faiss file gets a fresh name that `dense.npz` records, and stale ones are deleted only after the
        new `dense.npz` is in place, so a crash at any point leaves a matching pair.
        """
        directory = Path(directory)
        faiss_name = None
        if self.backend in ("faiss-ivf", "faiss-hnsw") and len(self._ids):
            faiss_name = f"faiss-{uuid.uuid4().hex[:12]}.index"
            index = self._ensure_faiss()
            with atomic_path(directory / faiss_name) as tmp:
                _faiss().write_index(index, str(tmp))
        meta = json.dumps({"config": self.config(), "ids": self._ids, "next_label": self._next_label,
                           "faiss_file": faiss_name}, ensure_ascii=False)

        path = directory / FILE
        with atomic_open(path, "wb") as f:
            np.savez(f, vectors=self._vectors, labels=self._labels, meta=np.array(meta))
        for old in directory.glob("faiss-*.index"):
            if old.name != faiss_name:
                old.unlink()
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DenseIndex:
        path = Path(directory) / FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no dense index here")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                vectors, labels = z["vectors"], z["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a damaged or foreign file
            raise ValueError(f"{path}: not a readable dense index ({type(e).__name__}); rebuild it") from None
        index = cls(**meta["config"])
        if vectors.shape != (len(meta["ids"]), index.dim) or len(labels) != len(vectors):
            raise ValueError(f"{path}: vectors {vectors.shape}, labels {labels.shape} and "
                             f"{len(meta['ids'])} ids disagree")
        index._vectors, index._labels = np.ascontiguousarray(vectors), labels
        index._ids = list(meta["ids"])
        index._row = {i: r for r, i in enumerate(index._ids)}
        index._next_label = int(meta["next_label"])
        if meta["faiss_file"]:
            fi = _faiss().read_index(str(Path(directory) / meta["faiss_file"]))
            if fi.ntotal == len(vectors):
                index._faiss = fi
        return index
