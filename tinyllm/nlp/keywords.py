"""Keyword extraction: TF-IDF and TextRank (notes ch.01 jieba分词 01.4.j, 01.4.k).

TF-IDF: a word is a keyword when it is frequent in this document and rare in the collection,

    weight(w) = tf(w) · idf(w),   tf(w) = count(w) / Σ_v count(v),   idf(w) = log(N / df(w)).

Words shorter than two characters (after stripping whitespace) and stop words never count, so `total` is the
number of remaining tokens. An unseen word gets the *median* idf of the table (neither common nor rare).
`idf_from_corpus` builds a table from your own documents; `jieba_idf()` reads the table jieba ships.

TextRank (Mihalcea & Tarau 2004): words that pass a POS filter (default n, ns, vn, v) and the same length /
stop-word filter are nodes; two such words co-occurring within a window of `span` = 5 *tokens* (the filter
is applied to both ends, the window counts every token) add 1 to the weight of their undirected edge. Scores
follow weighted PageRank,

    WS(v) = (1 − d) + d · Σ_{u ∈ N(v)} w(u, v) / Σ_{x ∈ N(u)} w(u, x) · WS(u),   d = 0.85,

run, like jieba, as 10 in-place (Gauss-Seidel) sweeps over the nodes in sorted order from WS = 1/|V|, then
rescaled by (WS − min/10) / (max − min/10) so the best word scores 1. `pagerank_exact` solves the same
fixed point as a linear system, the naive twin the sweeps converge to.

Ties: both methods sort by score only, stably, so equal scores keep the order in which the words first
appear (TF-IDF: first occurrence in the text; TextRank: first appearance as an edge end, scanning the text).
That is jieba's order too, so results are deterministic and comparable item by item.

Inputs are pluggable: `cut(text) -> list[str]` for TF-IDF and `tagger(text) -> list[(word, tag)]` for
TextRank (and for TF-IDF with `allow_pos`). The defaults are ours and read only jieba's data files:
`Segmenter.from_jieba()` for `cut` and `PossegTagger.from_jieba()` (jieba.posseg's dictionary tags + joint
HMM for unknown words) for `tagger`, so the keywords equal `jieba.analyse.extract_tags` / `textrank`.
Alternatives: `dictionary_tagger` (dict.txt tags only, 'x' for unknown words) and `hmm_tagger` (our People's
Daily HMM tagger over the segmenter's words).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

Cut = Callable[[str], Sequence[str]]
Tagger = Callable[[str], Sequence[tuple[str, str]]]

# jieba.analyse's built-in stop words: a few English function words ("that" twice in jieba's source)
STOP_WORDS = frozenset((
    "the", "of", "is", "and", "to", "in", "that", "we", "for", "an", "are", "by", "be", "as", "on", "with",
    "can", "if", "from", "which", "you", "it", "this", "then", "at", "have", "all", "not", "one", "has", "or",
))
TEXTRANK_POS = ("ns", "n", "vn", "v")


def load_stop_words(path: str | Path) -> set[str]:
    """One stop word per line, added to `STOP_WORDS` (what `jieba.analyse.set_stop_words` does)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"stop-word file {str(path)!r} does not exist")
    return set(STOP_WORDS) | set(path.read_text(encoding="utf-8").splitlines())


# ------------------------------------------------------------------ IDF tables
class IDF:
    """An idf table with its median, the value of words the table has never seen."""

    def __init__(self, table: dict[str, float]) -> None:
        if not table:
            raise ValueError("empty idf table")
        self.table = table
        self.median = sorted(table.values())[len(table) // 2]

    def __getitem__(self, word: str) -> float:
        return self.table.get(word, self.median)

    @classmethod
    def load(cls, path: str | Path) -> IDF:
        """`word idf` per line (jieba's idf.txt format)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"idf file {str(path)!r} does not exist")
        table = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.strip().split(" ")
            if parts == [""]:
                continue
            try:
                word, value = parts
                table[word] = float(value)
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'word idf', got {line.strip()!r}") from None
        return cls(table)

    @classmethod
    def from_corpus(cls, docs: Iterable[Sequence[str]]) -> IDF:
        """idf(w) = log(N / df(w)) over segmented documents (lists of words)."""
        df: dict[str, int] = defaultdict(int)
        n = 0
        for doc in docs:
            n += 1
            for w in set(doc):
                df[w] += 1
        if n == 0:
            raise ValueError("idf_from_corpus got no documents")
        return cls({w: math.log(n / c) for w, c in df.items()})


def idf_from_corpus(docs: Iterable[Sequence[str]]) -> IDF:
    return IDF.from_corpus(docs)


def _jieba_dir() -> Path:
    spec = importlib.util.find_spec("jieba")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("jieba's resources need the jieba package (pip install jieba)")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def jieba_idf() -> IDF:
    """The idf table jieba ships (`jieba/analyse/idf.txt`, 270,131 words), read from the installed package."""
    return IDF.load(_jieba_dir() / "analyse" / "idf.txt")


# ------------------------------------------------------------------ default cut and tagger (ours)
_RE_NUM = re.compile(r"^[.0-9]+$")
_RE_ENG = re.compile(r"^[a-zA-Z0-9]+$")


@lru_cache(maxsize=1)
def _default_segmenter() -> Any:
    from tinyllm.nlp.segment import Segmenter

    return Segmenter.from_jieba()


def default_cut(text: str) -> list[str]:
    """Our jieba-compatible segmenter (jieba's dict.txt and HMM), precise mode."""
    return _default_segmenter().cut(text)


@lru_cache(maxsize=1)
def _default_posseg() -> Any:
    from tinyllm.nlp.posseg import PossegTagger

    return PossegTagger.from_jieba(_default_segmenter())


def default_tagger(text: str) -> list[tuple[str, str]]:
    """Our jieba.posseg twin over our segmenter (see `tinyllm.nlp.posseg`)."""
    return _default_posseg().cut(text)


def dictionary_tagger(segmenter: Any = None) -> Tagger:
    """Segment with `segmenter` (default: ours over jieba's dict), tag each word from its dictionary tag.

    Unknown words: digits → 'm', Latin/digit runs → 'eng', other words → 'x'. jieba.posseg (and our
    `default_tagger`) instead runs a joint (BMES, tag) HMM over runs of unknown Chinese characters, which
    segments and tags those runs differently (虞子期 nr rather than 'x'); on dictionary words they agree.
    """
    def tag(text: str) -> list[tuple[str, str]]:
        seg = segmenter if segmenter is not None else _default_segmenter()
        out = []
        for w in seg.cut(text):
            t = seg.tags.get(w)
            if t is None:
                t = "m" if _RE_NUM.match(w) else "eng" if _RE_ENG.match(w) else "x"
            out.append((w, t))
        return out

    return tag


def hmm_tagger(tagger: Any, cut: Cut | None = None) -> Tagger:
    """Our HMM POS tagger (People's Daily tags) over a segmenter's words. PD tags n/ns/v/vn mean what jieba's
    do, so TextRank's default filter works, but the tags are learned from 1998 news, not jieba's dictionary."""
    def tag(text: str) -> list[tuple[str, str]]:
        words = [w for w in (cut or default_cut)(text)]
        keep = [w for w in words if w.strip()]
        tags = iter(tagger.tag(keep)) if keep else iter(())
        return [(w, next(tags) if w.strip() else "x") for w in words]

    return tag


def _passes(word: str, stop_words: frozenset[str] | set[str]) -> bool:
    return len(word.strip()) >= 2 and word.lower() not in stop_words


def _top(scores: dict[str, float], topk: int | None, with_weight: bool) -> list[Any]:
    # sorted() is stable: equal scores keep the dict's insertion (first-appearance) order, like jieba
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    if topk:
        ranked = ranked[:topk]
    return ranked if with_weight else [w for w, _ in ranked]


def _check_topk(topk: int | None) -> None:
    if topk is not None and (not isinstance(topk, int) or topk < 0):
        raise ValueError(f"topk={topk!r} must be a non-negative int or None (0/None: all words)")


# ------------------------------------------------------------------ TF-IDF
def tfidf_scores(words: Iterable[str], idf: IDF, stop_words: frozenset[str] | set[str] = STOP_WORDS
                 ) -> dict[str, float]:
    """weight(w) = count(w) · (idf(w) / total) for every word that passes the filter, in first-seen order."""
    freq: dict[str, float] = {}
    for w in words:
        if _passes(w, stop_words):
            freq[w] = freq.get(w, 0.0) + 1.0
    total = sum(freq.values())
    # count · (idf / total), in this order, so the floats equal jieba's bit for bit
    return {w: c * (idf[w] / total) for w, c in freq.items()}


def extract_tfidf(text: str, topk: int | None = 20, with_weight: bool = False, allow_pos: Sequence[str] = (),
                  idf: IDF | None = None, cut: Cut | None = None, tagger: Tagger | None = None,
                  stop_words: frozenset[str] | set[str] = STOP_WORDS) -> list[Any]:
    """Top-k TF-IDF keywords of `text` (`jieba.analyse.extract_tags`); with `allow_pos` only words whose tag
    (from `tagger`) is allowed count."""
    _check_topk(topk)
    idf = idf if idf is not None else jieba_idf()
    if allow_pos:
        allowed = frozenset(allow_pos)
        words: Iterable[str] = [w for w, t in (tagger or default_tagger)(text) if t in allowed]
    else:
        words = (cut or default_cut)(text)
    return _top(tfidf_scores(words, idf, stop_words), topk, with_weight)


# ------------------------------------------------------------------ TextRank
def cooccurrence_graph(pairs: Sequence[tuple[str, str]], allow_pos: Iterable[str] = TEXTRANK_POS, span: int = 5,
                       stop_words: frozenset[str] | set[str] = STOP_WORDS) -> dict[str, list[tuple[str, float]]]:
    """Adjacency lists {node: [(neighbour, weight), ...]} of the undirected co-occurrence graph.

    Each ordered pair (a, b) with b within `span - 1` tokens after a is counted once; the edge is stored on
    both ends, so a pair seen both ways appears twice, and a self-pair twice on the same node — the summation
    order (and so the floats) of jieba's graph.
    """
    if span < 2:
        raise ValueError(f"span={span!r} must be >= 2 (a window of at least two words)")
    allowed = frozenset(allow_pos)
    ok = [t in allowed and _passes(w, stop_words) for w, t in pairs]
    counts: dict[tuple[str, str], int] = {}
    for i, (w, _) in enumerate(pairs):
        if not ok[i]:
            continue
        for j in range(i + 1, min(i + span, len(pairs))):
            if ok[j]:
                key = (w, pairs[j][0])
                counts[key] = counts.get(key, 0) + 1
    graph: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (a, b), c in counts.items():
        graph[a].append((b, float(c)))
        graph[b].append((a, float(c)))
    return dict(graph)


def pagerank(graph: dict[str, list[tuple[str, float]]], damping: float = 0.85, iterations: int = 10,
             tol: float | None = None) -> dict[str, float]:
    """Weighted PageRank by in-place sweeps over sorted nodes (jieba's iteration), unnormalised.

    `iterations` sweeps, or until no score moves more than `tol` when `tol` is given (then `iterations` is
    a cap). Insertion order of the result = the graph's node order.
    """
    if not 0 < damping < 1:
        raise ValueError(f"damping={damping!r} must be in (0, 1)")
    ws = dict.fromkeys(graph, 1.0 / (len(graph) or 1.0))
    out_sum = {n: sum((w for _, w in edges), 0.0) for n, edges in graph.items()}
    order = sorted(graph)
    for _ in range(iterations):
        moved = 0.0
        for n in order:
            s = 0.0
            for m, w in graph[n]:
                s += w / out_sum[m] * ws[m]
            new = (1 - damping) + damping * s
            moved = max(moved, abs(new - ws[n]))
            ws[n] = new
        if tol is not None and moved < tol:
            break
    return ws


def pagerank_exact(graph: dict[str, list[tuple[str, float]]], damping: float = 0.85) -> dict[str, float]:
    """The fixed point of `pagerank` by one linear solve: (I − d·M) x = (1 − d)·1, M[v,u] = w(u,v)/out(u)."""
    nodes = list(graph)
    idx = {n: i for i, n in enumerate(nodes)}
    m = np.zeros((len(nodes), len(nodes)))
    for u, edges in graph.items():
        total = sum(w for _, w in edges)
        for v, w in edges:
            m[idx[v], idx[u]] += w / total
    x = np.linalg.solve(np.eye(len(nodes)) - damping * m, np.full(len(nodes), 1 - damping))
    return {n: float(x[i]) for i, n in enumerate(nodes)}


def normalise(ws: dict[str, float]) -> dict[str, float]:
    """jieba's rescaling (w − min/10) / (max − min/10): the top word gets 1, the last a little above 0."""
    if not ws:
        return {}
    lo, hi = min(ws.values()), max(ws.values())
    return {n: (w - lo / 10.0) / (hi - lo / 10.0) for n, w in ws.items()}


def extract_textrank(text: str, topk: int | None = 20, with_weight: bool = False,
                     allow_pos: Sequence[str] = TEXTRANK_POS, tagger: Tagger | None = None, span: int = 5,
                     damping: float = 0.85, iterations: int = 10,
                     stop_words: frozenset[str] | set[str] = STOP_WORDS) -> list[Any]:
    """Top-k TextRank keywords of `text` (`jieba.analyse.textrank`)."""
    _check_topk(topk)
    pairs = [(w, t) for w, t in (tagger or default_tagger)(text)]
    graph = cooccurrence_graph(pairs, allow_pos, span, stop_words)
    return _top(normalise(pagerank(graph, damping, iterations)), topk, with_weight)
