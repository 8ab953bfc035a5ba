"""BM25 keyword retrieval over sparse postings (Tsinghua course ch.98.6.c; notes ch.08.1.g extension).

Okapi BM25 (Robertson & Zaragoza 2009) scores a document d for a query q = (q_1 … q_n):

    score(q, d) = Σ_i IDF(q_i) · f(q_i, d) · (k1 + 1) / (f(q_i, d) + k1 · (1 − b + b · |d| / avgdl))

f(q_i, d) is the term frequency (TF) of q_i in d, |d| the document length in tokens, avgdl the mean length;
k1 (default 1.5) saturates TF — the 10th occurrence adds little — and b (0.75) sets how much a long document
is penalised. IDF rewards rare terms. A repeated query term counts once per repetition. Variants
(`variant=`), each with the parameters of the reference libraries:

- "okapi": IDF = ln((N − n + 0.5) / (n + 0.5)) with n the number of documents holding the term; a term in more
  than half the documents would get a negative IDF, so it is floored at ε · mean IDF (ε = `epsilon`, 0.25)
  — `rank_bm25.BM25Okapi` exactly. With ε = 0 the floor is 0 and the scores are (k1 + 1) × bm25s's
  "robertson" method, so both rank alike.
- "lucene": IDF = ln(1 + (N − n + 0.5) / (n + 0.5)) (never negative) and TF part f / (f + k1 · norm) without
  the constant (k1 + 1) — Lucene's BM25Similarity and bm25s's default "lucene" method exactly.
- "bm25l" (Lv & Zhai 2011): c = f / norm, TF part (k1 + 1)(c + δ) / (k1 + c + δ), IDF = ln((N + 1) / (n + 0.5)),
  δ = 0.5. Like bm25s (and rank_bm25 after its PR #20; release 0.2.2 still multiplies by an extra f) the TF
  part is applied to every document, so a document without the term gets the constant (k1 + 1)δ / (k1 + δ).
- "bm25+" (Lv & Zhai 2011): TF part δ + f(k1 + 1) / (k1 · norm + f), IDF = ln((N + 1) / n), δ = 1 —
  `rank_bm25.BM25Plus` and bm25s "bm25+" exactly. Both add δ · IDF to *every* document (the paper adds it
  to documents that contain the term), which shifts all scores equally and so does not change the ranking.

Data layout — an inverted index: the vocabulary maps a term to an id; the postings of term t are the rows of
the documents that contain it with the term's weight there, stored column-major (CSC: `indptr[t]:indptr[t+1]`
slices `post_rows`/`post_w`). Weights (IDF × TF part) are precomputed once after each change of the corpus,
because IDF and avgdl depend on every document; a query then only gathers its terms' postings and sums them
per document with one `np.bincount`: O(postings of the query terms), not O(N · |q|) like rank_bm25.
`bm25_naive_scores` computes the same scores straight from the formulas, as the oracle of the tests.

Tokenization decides what a "term" is. "en" lower-cases and takes `\\w+` runs; "zh" (default) segments
Chinese into words with `tinyllm.nlp.segment.Segmenter.from_jieba()` (jieba when that module is missing) and
keeps the tokens that contain a word character, so mixed Chinese/English text works. "zh-bigram" needs no
dictionary: overlapping character bigrams of Chinese runs, lower-cased words elsewhere.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinyllm.atomic import atomic_open

VARIANTS = ("okapi", "lucene", "bm25l", "bm25+")
DEFAULT_DELTA = {"bm25l": 0.5, "bm25+": 1.0}
FILE = "bm25.npz"

_WORD = re.compile(r"\w+")


def tokenize_en(text: str) -> list[str]:
    """Lower-cased runs of word characters."""
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1)
def _cut() -> Callable[[str], list[str]]:
    """tinyllm's jieba-compatible segmenter, else jieba itself; both need jieba's dictionary installed."""
    try:
        from tinyllm.nlp.segment import Segmenter
    except ImportError:
        Segmenter = None
    if Segmenter is not None:
        try:
            seg = Segmenter.from_jieba()
        except FileNotFoundError as e:
            raise ImportError(f"tokenizer='zh' needs jieba's dictionary ({e}); or use tokenizer='zh-bigram'") from e
        return lambda text: list(seg.cut(text))
    try:
        import jieba
    except ImportError as e:
        raise ImportError("tokenizer='zh' needs jieba: pip install 'tinyllm[nlp]' (or use tokenizer='zh-bigram')") from e
    jieba.setLogLevel(logging.WARNING)
    return jieba.lcut


def tokenize_zh(text: str) -> list[str]:
    """Word segmentation of lower-cased text; whitespace and punctuation tokens are dropped."""
    return [w for w in _cut()(text.lower()) if _WORD.search(w)]


_HAN_OR_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def tokenize_zh_bigram(text: str) -> list[str]:
    """Overlapping Chinese character bigrams (a lone character stays a unigram) and lower-cased other words.

    No dictionary: nothing to load and no segmentation mismatch between query and document (a query word
    "烤鸭" still matches a document where the segmenter kept "北京烤鸭" whole), at the price of more
    postings and some spurious bigrams across word boundaries."""
    out: list[str] = []
    for run in _HAN_OR_WORD.findall(text.lower()):
        if "\u3400" <= run[0] <= "\ufaff":
            out += [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]
        else:
            out.append(run)
    return out


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"zh": tokenize_zh, "zh-bigram": tokenize_zh_bigram,
                                                     "en": tokenize_en}


def _check_params(variant: str, k1: float, b: float, delta: float | None, epsilon: float) -> float:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
    if not k1 >= 0:
        raise ValueError(f"k1={k1!r} must be >= 0")
    if not 0 <= b <= 1:
        raise ValueError(f"b={b!r} must be in [0, 1]")
    if not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0")
    delta = DEFAULT_DELTA.get(variant, 0.0) if delta is None else float(delta)
    if not delta >= 0:
        raise ValueError(f"delta={delta!r} must be >= 0")
    return delta


def idf_values(df: np.ndarray, n_docs: int, variant: str, epsilon: float = 0.25) -> np.ndarray:
    """IDF of each term from its document frequency `df` (> 0) in a corpus of `n_docs` documents."""
    df = np.asarray(df, dtype=np.float64)
    if variant == "okapi":
        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
        if idf.size:
            idf = np.where(idf < 0, epsilon * idf.mean(), idf)
        return idf
    if variant == "lucene":
        return np.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    if variant == "bm25l":
        return np.log(n_docs + 1) - np.log(df + 0.5)
    if variant == "bm25+":
        return np.log((n_docs + 1) / df)
    raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")


def tf_part(tf: np.ndarray, norm: np.ndarray, variant: str, k1: float, delta: float) -> np.ndarray:
    """The saturating TF factor; `norm` = 1 − b + b·|d|/avgdl. Equals the per-document constant at tf = 0."""
    if variant == "okapi":
        return tf * (k1 + 1) / (tf + k1 * norm)
    if variant == "lucene":
        return tf / (tf + k1 * norm)
    if variant == "bm25l":
        c = tf / norm
        return (k1 + 1) * (c + delta) / (k1 + c + delta)
    return delta + tf * (k1 + 1) / (k1 * norm + tf)


def bm25_naive_scores(corpus: Sequence[Sequence[str]], query: Sequence[str], variant: str = "okapi",
                      k1: float = 1.5, b: float = 0.75, delta: float | None = None,
                      epsilon: float = 0.25) -> np.ndarray:
    """Scores of every tokenized document for a tokenized query, term by term from the definitions."""
    delta = _check_params(variant, k1, b, delta, epsilon)
    n = len(corpus)
    counts = [Counter(doc) for doc in corpus]
    avgdl = sum(len(doc) for doc in corpus) / n
    df = Counter(t for c in counts for t in c)
    terms = list(df)
    idf = dict(zip(terms, idf_values(np.array([df[t] for t in terms]), n, variant, epsilon).tolist()))
    out = np.zeros(n)
    for j, doc in enumerate(corpus):
        norm = 1 - b + b * len(doc) / avgdl
        for q in query:
            if q in idf:
                out[j] += idf[q] * float(tf_part(np.float64(counts[j][q]), np.float64(norm), variant, k1, delta))
    return out


class BM25Index:
    """An updatable BM25 index: `add(ids, texts)`, `remove(ids)`, `scores(query)`, `search(query, k)`."""

    def __init__(self, variant: str = "okapi", k1: float = 1.5, b: float = 0.75, delta: float | None = None,
                 epsilon: float = 0.25, tokenizer: str | Callable[[str], list[str]] = "zh") -> None:
        self.delta = _check_params(variant, k1, b, delta, epsilon)
        self.variant, self.k1, self.b, self.epsilon = variant, float(k1), float(b), float(epsilon)
        if isinstance(tokenizer, str):
            if tokenizer not in TOKENIZERS:
                raise ValueError(f"tokenizer={tokenizer!r} must be one of {sorted(TOKENIZERS)} or a callable")
            self.tokenizer_name: str | None = tokenizer
            self.tokenizer = TOKENIZERS[tokenizer]
        elif callable(tokenizer):
            self.tokenizer_name, self.tokenizer = None, tokenizer
        else:
            raise ValueError(f"tokenizer={tokenizer!r} must be a name or a callable")
        self.vocab: dict[str, int] = {}
        self._ids: list[str | None] = []  # by row; None marks a removed row until the next compaction
        self._row: dict[str, int] = {}
        self._segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, terms, tfs), row-sorted
        self._lengths: list[np.ndarray] = []
        self._compiled: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------------- updates

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    @property
    def ids(self) -> list[str]:
        """Document ids in row order."""
        return [i for i in self._ids if i is not None]

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        """Index documents; an id already present is replaced (upsert)."""
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        self.add_tokens(ids, [self.tokenizer(t) for t in texts])

    def add_tokens(self, ids: Sequence[str], tokens: Sequence[Sequence[str]]) -> None:
        """Index pre-tokenized documents (upsert)."""
        ids = [str(i) for i in ids]
        if len(ids) != len(tokens):
            raise ValueError(f"{len(ids)} ids but {len(tokens)} token lists")
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise ValueError(f"duplicate id {dup!r} in one add")
        self.remove([i for i in ids if i in self._row])
        vocab, first = self.vocab, len(self._ids)
        flat = np.fromiter((vocab.setdefault(t, len(vocab)) for doc in tokens for t in doc), dtype=np.int64)
        lengths = np.fromiter((len(doc) for doc in tokens), dtype=np.int64, count=len(tokens))
        rows = np.repeat(np.arange(first, first + len(ids), dtype=np.int64), lengths)
        key, tf = np.unique(rows * max(len(vocab), 1) + flat, return_counts=True)  # sorted by (row, term)
        self._segments.append(((key // max(len(vocab), 1)).astype(np.int64),
                               (key % max(len(vocab), 1)).astype(np.int64), tf.astype(np.float64)))
        self._lengths.append(lengths.astype(np.float64))
        for r, i in enumerate(ids, first):
            self._row[i] = r
        self._ids.extend(ids)
        self._compiled = None

    def remove(self, ids: Iterable[str]) -> None:
        """Drop documents by id (unknown ids are ignored)."""
        for i in ids:
            r = self._row.pop(str(i), None)
            if r is not None:
                self._ids[r] = None
                self._compiled = None

    # ---------------------------------------------------------------------------------------- compilation

    def _compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Drop removed rows and renumber the rest: one (rows, terms, tfs) segment and the lengths."""
        if self._segments:
            rows, terms, tfs = (np.concatenate(a) for a in zip(*self._segments))
            lengths = np.concatenate(self._lengths)
        else:
            rows = terms = np.zeros(0, np.int64)
            tfs = lengths = np.zeros(0)
        alive = np.array([i is not None for i in self._ids], dtype=bool)
        if not alive.all():
            new_row = np.cumsum(alive) - 1
            keep = alive[rows]
            rows, terms, tfs = new_row[rows[keep]], terms[keep], tfs[keep]
            lengths = lengths[alive]
            self._ids = [i for i in self._ids if i is not None]
            self._row = {i: r for r, i in enumerate(self._ids)}
        self._segments, self._lengths = [(rows, terms, tfs)], [lengths]
        return rows, terms, tfs, lengths

    def _compile(self) -> dict[str, Any]:
        if self._compiled is not None:
            return self._compiled
        rows, terms, tfs, lengths = self._compact()
        n, v = len(self._ids), len(self.vocab)
        df = np.bincount(terms, minlength=v)
        idf = np.zeros(v)
        present = df > 0
        if n:
            idf[present] = idf_values(df[present], n, self.variant, self.epsilon)
        avgdl = lengths.mean() if n else 1.0
        norm = 1 - self.b + self.b * lengths / (avgdl if avgdl > 0 else 1.0)
        zero = tf_part(np.float64(0.0), np.float64(1.0), self.variant, self.k1, self.delta)  # tf=0, any norm
        weight = idf[terms] * (tf_part(tfs, norm[rows], self.variant, self.k1, self.delta) - zero)
        order = np.argsort(terms, kind="stable")  # rows stay ascending inside each term
        self._compiled = {"n": n, "indptr": np.concatenate([[0], np.cumsum(df)]), "post_rows": rows[order],
                          "post_w": weight[order], "const": idf * zero, "idf": idf, "avgdl": avgdl}
        return self._compiled

    # -------------------------------------------------------------------------------------------- queries

    def _query_terms(self, query: str | Sequence[str]) -> list[int]:
        tokens = self.tokenizer(query) if isinstance(query, str) else query
        return [self.vocab[t] for t in tokens if t in self.vocab]

    def _gather(self, tids: list[int]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        c = self._compile()
        t = np.asarray(tids, dtype=np.int64)
        starts, counts = c["indptr"][t], c["indptr"][t + 1] - c["indptr"][t]
        # positions starts[j] .. starts[j] + counts[j] - 1 for every query term j, without a Python loop
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts)
        idx = np.arange(int(counts.sum()), dtype=np.int64) + offsets
        return c["post_rows"][idx], c["post_w"][idx], c

    def scores(self, query: str | Sequence[str]) -> np.ndarray:
        """BM25 score of every document (row order, see `ids`) for a query string or token list."""
        tids = self._query_terms(query)
        rows, w, c = self._gather(tids)
        out = np.bincount(rows, weights=w, minlength=c["n"]).astype(np.float64)
        if tids and self.variant in DEFAULT_DELTA:
            out += c["const"][tids].sum()
        return out

    def search(self, query: str | Sequence[str], k: int = 10) -> list[tuple[str, float]]:
        """Top-k (id, score) among documents containing at least one query term; ties keep insertion order."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1")
        tids = self._query_terms(query)
        rows, w, c = self._gather(tids)
        scores = np.bincount(rows, weights=w, minlength=c["n"])
        if tids and self.variant in DEFAULT_DELTA:
            scores = scores + c["const"][tids].sum()
        matched = np.zeros(c["n"], dtype=bool)
        matched[rows] = True  # documents sharing a term with the query (no sort, unlike np.unique)
        cand = np.flatnonzero(matched)
        if len(cand) > k:
            cand = cand[np.argpartition(-scores[cand], k - 1)[:k]]
        cand = cand[np.lexsort((cand, -scores[cand]))]
        return [(self._ids[r], float(scores[r])) for r in cand]

    # ------------------------------------------------------------------------------------------ persistence

    def config(self) -> dict[str, Any]:
        return {"variant": self.variant, "k1": self.k1, "b": self.b, "delta": self.delta,
                "epsilon": self.epsilon, "tokenizer": self.tokenizer_name}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `bm25.npz` (one file, replaced atomically) under `directory`."""
        rows, terms, tfs, lengths = self._compact()
        meta = json.dumps({"config": self.config(), "ids": self._ids, "vocab": list(self.vocab)},
                          ensure_ascii=False)

        path = Path(directory) / FILE
        with atomic_open(path, "wb") as f:
            np.savez(f, rows=rows, terms=terms, tfs=tfs, lengths=lengths, meta=np.array(meta))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike,
             tokenizer: Callable[[str], list[str]] | None = None) -> BM25Index:
        """Read an index written by `save`; a custom tokenizer must be passed again."""
        path = Path(directory) / FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no BM25 index here")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = [z[k] for k in ("rows", "terms", "tfs", "lengths")]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a damaged or foreign file
            raise ValueError(f"{path}: not a readable BM25 index ({type(e).__name__}); rebuild it") from None
        cfg = meta["config"]
        name = cfg.pop("tokenizer")
        if tokenizer is None and name is None:
            raise ValueError(f"{path} was built with a custom tokenizer: pass tokenizer= to load it")
        index = cls(**cfg, tokenizer=tokenizer if tokenizer is not None else name)
        index.vocab = {t: i for i, t in enumerate(meta["vocab"])}
        index._ids = list(meta["ids"])
        index._row = {i: r for r, i in enumerate(index._ids)}
        index._segments, index._lengths = [tuple(arrays[:3])], [arrays[3]]
        return index

