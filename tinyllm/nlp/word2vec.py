"""Word2Vec: skip-gram and CBOW with negative sampling or hierarchical softmax (notes ch.01 Word2Vec, 词向量).

Two tables of N-dim vectors: the input vectors W (V×N, the word vectors we keep) and output parameters W′.
- **Skip-gram** predicts each context word from the centre word. Like word2vec.c, every (centre, context) pair
  is trained as "context vector → predict centre", which covers the same pairs.
- **CBOW** predicts the centre word from h = mean of the context vectors (or their sum, `cbow_mean=False`).
  As in word2vec.c the error vector is added to *every* context vector in full (for the sum this is the
  exact gradient; for the mean it is word2vec.c's choice, not divided by the context size).
- **Negative sampling**: maximise log σ(u_o·h) + Σ_k log σ(−u_k·h) for the true word o and k = `negative`
  noise words drawn from the unigram distribution raised to 3/4 (a table like word2vec.c's), a noise word
  equal to o is skipped. Only k+1 output rows change per example instead of all V.
- **Hierarchical softmax**: the words are leaves of a Huffman tree (frequent words get short codes); p(w|h)
  = Π over the inner nodes n on w's path of σ((1 − 2·code_n) · θ_n·h), one parameter θ_n per inner node,
  so the leaves' probabilities sum to 1 with only ~log2 V dot products per example.
- **Subsampling** of frequent words (word2vec.c): a word with count f out of T corpus words is kept with
  probability (√(f / (t·T)) + 1) · (t·T) / f (capped at 1), t = `sample`; dropped words leave the sentence
  before windows are taken, so windows reach further.
- **Window**: for each centre word a reduced window b ~ U{1..window} is drawn (word2vec.c's `window − rand %
  window`), so near words are sampled more often than far ones.
- **Learning rate** falls linearly from `alpha` to `min_alpha` over all training words of all epochs.

The fast path is vectorised over batches of examples with torch (gather the rows, one bmm, sparse updates
with `index_add_`): all examples of a batch read the parameters as they were at the start of the batch and
their updates are summed (like word2vec.c's lock-free threads, which also let updates of one word collide).
`sgd_step_naive` is the same step as plain per-example Python loops; a test holds the two equal.
`sgd_step_naive(..., sequential=True)` is word2vec.c's order of updates for comparison. Keep `batch_size` small
next to the vocabulary: a row that occurs k times in one batch takes k summed steps at once, where
word2vec.c's sequential steps would saturate (on a 25-word toy vocabulary CBOW diverges at batch 256 and
trains at 24; on real text with ~40 k words 1,024 matches gensim's neighbours).
Worker threads (`threads`) train chunks of the corpus concurrently on the shared tables, lock-free like
word2vec.c's threads; every chunk draws from its own seeded generator.

Not covered: phrases, incremental vocabulary updates, per-word learning-rate locks.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tinyllm.nlp.vectors import KeyedVectors

__all__ = ["KeyedVectors", "Vocab", "Word2Vec", "build_vocab", "cbow_contexts", "huffman_tree", "keep_probabilities",
           "segment_corpus", "sgd_step", "sgd_step_naive", "split_sentences", "unigram_table", "window_pairs"]


# ------------------------------------------------------------------ corpus
_SENTENCE_END = re.compile(r"[。！？；!?;\n\r]+")
_WORDLIKE = re.compile(r"\w")


def split_sentences(text: str) -> list[str]:
    """Cut at sentence-final punctuation and line breaks: windows should not run across sentences."""
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def segment_corpus(texts: Iterable[str], segmenter: Any = None, progress: bool = False) -> list[list[str]]:
    """Texts → sentences of words for Word2Vec: segmented (tinyllm's jieba-compatible `Segmenter` by
    default), keeping only tokens with a letter or digit (punctuation and spaces dropped)."""
    if segmenter is None:
        from tinyllm.nlp.segment import Segmenter

        segmenter = Segmenter.from_jieba()
    from tqdm.auto import tqdm

    out = []
    for text in tqdm(texts, desc="segment", unit="doc", disable=not progress):
        for sent in split_sentences(text):
            words = [w for w in segmenter.cut(sent) if _WORDLIKE.search(w) and not any(c.isspace() for c in w)]
            if words:
                out.append(words)
    return out


# ------------------------------------------------------------------ vocabulary and tables
@dataclass
class Vocab:
    words: list[str]       # by descending count (ties: first occurrence)
    counts: np.ndarray     # int64 [V]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)


def build_vocab(sentences: Iterable[Sequence[str]], min_count: int = 5) -> Vocab:
    """Words seen at least `min_count` times, most frequent first."""
    if min_count < 1:
        raise ValueError(f"min_count={min_count} must be >= 1")
    counter: Counter[str] = Counter()
    for s in sentences:
        counter.update(s)
    kept = [(w, c) for w, c in counter.items() if c >= min_count]
    kept.sort(key=lambda wc: -wc[1])  # stable: ties keep first-occurrence order
    if not kept:
        raise ValueError(f"no word occurs min_count={min_count} times; lower min_count or add text")
    return Vocab([w for w, _ in kept], np.array([c for _, c in kept], dtype=np.int64))


def huffman_tree(counts: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Huffman codes and paths for V leaves: (codes[i], points[i]) per word, root first.

    Repeatedly merge the two lightest nodes (ties: lower node id first); the lighter child gets bit 0, the
    other bit 1 (word2vec.c's convention). Inner nodes are numbered 0..V−2 in merge order, so the root is
    V−2; points[i] are the inner nodes on the path root → leaf i, codes[i] the bits taken at each.
    """
    counts = np.asarray(counts)
    v = len(counts)
    if v < 2:
        raise ValueError(f"a Huffman tree needs at least 2 words, got {v}")
    heap = [(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = np.zeros(2 * v - 1, dtype=np.int64)
    bit = np.zeros(2 * v - 1, dtype=np.uint8)
    for k in range(v - 1):
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        node = v + k
        parent[a], parent[b], bit[b] = node, node, 1
        heapq.heappush(heap, (c1 + c2, node))
    root = 2 * v - 2
    codes, points = [], []
    for i in range(v):
        code, path, n = [], [], i
        while n != root:
            code.append(bit[n])
            n = parent[n]
            path.append(n - v)
        codes.append(np.array(code[::-1], dtype=np.int8))
        points.append(np.array(path[::-1], dtype=np.int64))
    return codes, points


def unigram_table(counts: np.ndarray, power: float = 0.75, size: int = 10_000_000) -> np.ndarray:
    """word2vec.c's noise table: word i fills a share count_i^power / Σ count^power of `size` slots, so a
    uniform slot index samples the smoothed unigram distribution (power 0.75 lifts rare words)."""
    if size < 1:
        raise ValueError(f"table size={size} must be >= 1")
    weights = np.asarray(counts, dtype=np.float64) ** power
    cum = np.cumsum(weights / weights.sum())
    slots = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.minimum(np.searchsorted(cum, slots), len(cum) - 1).astype(np.int32)


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """word2vec.c's subsampling: keep a word of count f with probability (√(f/(t·T)) + 1)·(t·T)/f, capped at
    1, where T = Σ counts and t = `sample` (0 disables subsampling)."""
    counts = np.asarray(counts, dtype=np.float64)
    if sample < 0:
        raise ValueError(f"sample={sample} must be >= 0")
    if sample == 0:
        return np.ones_like(counts)
    tt = sample * counts.sum()
    return np.minimum((np.sqrt(counts / tt) + 1.0) * tt / counts, 1.0)


# ------------------------------------------------------------------ examples from text
def window_pairs(sent: np.ndarray, reduced: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Skip-gram (centre position, context position) pairs over a flat token stream.

    `sent[i]` is the sentence id of token i (windows never cross sentences), `reduced[i]` ∈ 1..window the
    reduced window drawn for centre i. Pairs come ordered by centre, then context position.
    """
    n = len(sent)
    pos = np.arange(n)
    centres, contexts = [], []
    for d in range(1, min(window, n - 1) + 1):
        i, j = pos[: n - d], pos[d:]
        same = sent[i] == sent[j]
        right = same & (reduced[i] >= d)  # centre i sees j = i + d
        left = same & (reduced[j] >= d)   # centre j sees i = j − d
        centres += [i[right], j[left]]
        contexts += [j[right], i[left]]
    if not centres:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    c, x = np.concatenate(centres), np.concatenate(contexts)
    order = np.lexsort((x, c))
    return c[order], x[order]


def cbow_contexts(sent: np.ndarray, reduced: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """CBOW examples: (centre positions [B], context positions [B, 2·window] with −1 for none); centres with
    no context word are dropped."""
    n = len(sent)
    pos = np.arange(n)
    ctx = np.full((n, 2 * window), -1, dtype=np.int64)
    for d in range(1, window + 1):
        j = pos - d
        ok = (j >= 0) & (reduced >= d)
        ok[ok] &= sent[j[ok]] == sent[ok]
        ctx[ok, 2 * d - 2] = j[ok]
        j = pos + d
        ok = (j < n) & (reduced >= d)
        ok[ok] &= sent[j[ok]] == sent[ok]
        ctx[ok, 2 * d - 1] = j[ok]
    has = (ctx >= 0).any(axis=1)
    return pos[has], ctx[has]


# ------------------------------------------------------------------ one SGD step
def sgd_step(syn0: torch.Tensor, syn1: torch.Tensor, inputs: torch.Tensor, in_mask: torch.Tensor,
             targets: torch.Tensor, labels: torch.Tensor, t_mask: torch.Tensor, alpha: float,
             cbow_mean: bool = True) -> float:
    """One batched SGD step in place; returns the summed loss Σ −log σ(±f) of the batch (before the step).

    inputs [B, C] rows of `syn0` (C = 1 for skip-gram; CBOW pads with any id and in_mask 0), h = their mean
    (or sum). targets [B, T] rows of `syn1`: for negative sampling the true word then the noise words
    (labels 1, 0, ...), for hierarchical softmax the inner nodes of the word's path (labels 1 − code);
    t_mask 0 switches a target off (padding, a noise word equal to the true word).
    Per target: g = (label − σ(θ·h))·α·mask; θ += g·h; the input rows get Σ g·θ (θ before the step).
    """
    b, c = inputs.shape
    t, dim = targets.shape[1], syn0.shape[1]
    if c == 1:
        h = syn0.index_select(0, inputs[:, 0])                                  # [B, N]
    else:
        h = (syn0.index_select(0, inputs.reshape(-1)).view(b, c, dim) * in_mask[:, :, None]).sum(1)
        if cbow_mean:
            h = h / in_mask.sum(1, keepdim=True).clamp_min(1.0)
    flat = targets.reshape(-1)
    w = syn1.index_select(0, flat).view(b, t, dim)                              # [B, T, N]
    f = torch.bmm(w, h[:, :, None]).squeeze(2)                                  # [B, T]
    loss = -(F.logsigmoid((2.0 * labels - 1.0) * f) * t_mask).sum().item()
    g = (labels - torch.sigmoid(f)).mul_(t_mask).mul_(alpha)                    # [B, T]
    neu1e = torch.bmm(g[:, None, :], w).squeeze(1)                              # [B, N]
    syn1.index_add_(0, flat, (g[:, :, None] * h[:, None, :]).view(-1, dim))
    if c == 1:
        syn0.index_add_(0, inputs[:, 0], neu1e)
    else:
        syn0.index_add_(0, inputs.reshape(-1), (neu1e[:, None, :] * in_mask[:, :, None]).view(-1, dim))
    return loss


def sgd_step_naive(syn0: np.ndarray, syn1: np.ndarray, inputs: np.ndarray, in_mask: np.ndarray,
                   targets: np.ndarray, labels: np.ndarray, t_mask: np.ndarray, alpha: float,
                   cbow_mean: bool = True, sequential: bool = False) -> float:
    """The reference for `sgd_step`: one Python loop iteration per example and per target, numpy arrays.

    sequential=False reads every parameter as it was before the step (the batched semantics);
    sequential=True is word2vec.c's order: an output row changes as soon as its target is done, the input
    rows at the end of each example.
    """
    read0, read1 = (syn0, syn1) if sequential else (syn0.copy(), syn1.copy())
    loss = 0.0
    for e in range(inputs.shape[0]):
        rows = [int(i) for i, m in zip(inputs[e], in_mask[e]) if m > 0]
        h = np.zeros(syn0.shape[1], dtype=np.float64)
        for i in rows:
            h += read0[i]
        if cbow_mean and rows:
            h /= len(rows)
        neu1e = np.zeros_like(h)
        for t, label, m in zip(targets[e], labels[e], t_mask[e]):
            if m == 0:
                continue
            f = float(h @ read1[t])
            loss -= math.log(1.0 / (1.0 + math.exp(-(2.0 * label - 1.0) * f)))
            g = (label - 1.0 / (1.0 + math.exp(-f))) * alpha
            neu1e += g * read1[t]
            syn1[t] += g * h
        for i in rows:
            syn0[i] += neu1e
    return loss


# ------------------------------------------------------------------ the model
class Word2Vec:
    """Train word vectors on tokenised sentences (gensim-like arguments and defaults).

        model = Word2Vec(sentences, vector_size=100, window=5, min_count=5, sg=1, negative=5, epochs=5)
        model.wv.most_similar("北京")
    """

    def __init__(self, sentences: Sequence[Sequence[str]] | None = None, vector_size: int = 100,
                 window: int = 5, min_count: int = 5, sg: int = 0, hs: int = 0, negative: int = 5,
                 ns_exponent: float = 0.75, sample: float = 1e-3, alpha: float | None = None,
                 min_alpha: float = 1e-4, epochs: int = 5, cbow_mean: bool = True, seed: int = 1,
                 batch_size: int = 1024, chunk_words: int = 50_000, threads: int = 1,
                 table_size: int = 10_000_000, progress: bool = True) -> None:
        for name, value, low in (("vector_size", vector_size, 1), ("window", window, 1), ("epochs", epochs, 1),
                                 ("negative", negative, 0), ("batch_size", batch_size, 1),
                                 ("chunk_words", chunk_words, 1), ("threads", threads, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if sg not in (0, 1) or hs not in (0, 1):
            raise ValueError(f"sg={sg!r} and hs={hs!r} must be 0 or 1")
        if hs == 1 and negative > 0:
            raise ValueError(f"hs=1 with negative={negative}: choose one output layer (set negative=0 for hs)")
        if hs == 0 and negative == 0:
            raise ValueError("negative=0 with hs=0 leaves no output layer to train")
        self.vector_size, self.window, self.min_count, self.sg, self.hs = vector_size, window, min_count, sg, hs
        self.negative, self.ns_exponent, self.sample, self.epochs = negative, ns_exponent, sample, epochs
        self.alpha = (0.025 if sg else 0.05) if alpha is None else alpha  # word2vec.c's defaults
        if not 0 < min_alpha <= self.alpha:
            raise ValueError(f"need 0 < min_alpha ({min_alpha}) <= alpha ({self.alpha})")
        self.min_alpha, self.cbow_mean, self.seed = min_alpha, cbow_mean, seed
        self.batch_size, self.chunk_words, self.threads = batch_size, chunk_words, threads
        self.table_size, self.progress = table_size, progress
        self.vocab: Vocab | None = None
        self.wv: KeyedVectors | None = None
        self.losses: list[float] = []    # mean loss per example, one value per epoch
        self.words_per_second = 0.0
        if sentences is not None:
            self.build_vocab(sentences)
            self.train(sentences)

    def build_vocab(self, sentences: Iterable[Sequence[str]]) -> None:
        """Count words, keep those with count >= min_count, initialise the tables (word2vec.c's init:
        W ~ U(−0.5/N, 0.5/N), W′ = 0)."""
        self.vocab = build_vocab(sentences, self.min_count)
        v, n = len(self.vocab), self.vector_size
        rng = np.random.default_rng(self.seed)
        self.syn0 = torch.from_numpy(((rng.random((v, n)) - 0.5) / n).astype(np.float32))
        self.syn1 = torch.zeros(v - 1 if self.hs else v, n)
        if self.hs:
            codes, points = huffman_tree(self.vocab.counts)
            depth = max(len(c) for c in codes)
            self._codes = np.zeros((v, depth), np.float32)
            self._points = np.zeros((v, depth), np.int64)
            self._path_mask = np.zeros((v, depth), np.float32)
            for i, (c, p) in enumerate(zip(codes, points)):
                self._codes[i, : len(c)], self._points[i, : len(p)], self._path_mask[i, : len(c)] = c, p, 1.0
        else:
            self._table = unigram_table(self.vocab.counts, self.ns_exponent, self.table_size)
        self._keep = keep_probabilities(self.vocab.counts, self.sample)
        self._sync()

    def _sync(self) -> None:
        assert self.vocab is not None
        self.wv = KeyedVectors(self.vocab.words, self.syn0.numpy())  # shares memory with syn0

    def _targets(self, centre_ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        if self.hs:
            return (self._points[centre_ids], 1.0 - self._codes[centre_ids], self._path_mask[centre_ids])
        noise = self._table[rng.integers(0, len(self._table), (len(centre_ids), self.negative))]
        targets = np.concatenate([centre_ids[:, None], noise], axis=1)
        labels = np.zeros(targets.shape, np.float32)
        labels[:, 0] = 1.0
        mask = np.ones(targets.shape, np.float32)
        mask[:, 1:] = noise != centre_ids[:, None]
        return targets, labels, mask

    def train(self, sentences: Sequence[Sequence[str]]) -> Word2Vec:
        """`epochs` passes over `sentences` (a re-iterable sequence of token lists)."""
        if self.vocab is None:
            self.build_vocab(sentences)
        assert self.vocab is not None
        from tqdm.auto import tqdm

        index = self.vocab.index
        ids_list, sent_list = [], []
        raw_words = 0
        for s_id, s in enumerate(sentences):
            raw_words += len(s)
            ids = [index[w] for w in s if w in index]
            ids_list.append(np.array(ids, dtype=np.int64))
            sent_list.append(np.full(len(ids), s_id, dtype=np.int64))
        corpus = np.concatenate(ids_list) if ids_list else np.zeros(0, np.int64)
        sent = np.concatenate(sent_list) if sent_list else np.zeros(0, np.int64)
        # chunk boundaries at sentence starts, ~chunk_words words each
        starts = np.flatnonzero(np.r_[True, sent[1:] != sent[:-1]]) if len(sent) else np.zeros(0, np.int64)
        cuts = [0]
        for s in starts[1:]:
            if s - cuts[-1] >= self.chunk_words:
                cuts.append(int(s))
        cuts.append(len(corpus))
        total = self.epochs * len(corpus)
        jobs = [(ep, a, b) for ep in range(self.epochs) for a, b in itertools.pairwise(cuts)]

        def work(job: tuple[int, int, int]) -> tuple[float, int]:
            ep, a, b = job
            rng = np.random.default_rng([self.seed, ep, a])  # per chunk: the same draws with any thread count
            return self._train_chunk(corpus[a:b], sent[a:b], rng, ep * len(corpus) + a, total)

        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)  # parallelism comes from worker threads (torch kernels release the GIL)
        bar = tqdm(total=self.epochs * raw_words, desc="word2vec", unit="word", disable=not self.progress,
                   unit_scale=True)
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        t0 = time.perf_counter()
        try:
            results = pool.map(work, jobs) if pool else map(work, jobs)
            sums = np.zeros((self.epochs, 2))
            for (ep, a, b), (ls, ne) in zip(jobs, results):
                sums[ep] += (ls, ne)
                bar.update(round((b - a) * raw_words / max(len(corpus), 1)))
                bar.set_postfix(loss=f"{ls / max(ne, 1):.3f}")
            self.losses += [float(x / max(n, 1)) for x, n in sums]
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
            torch.set_num_threads(threads_before)
            bar.close()
        self.words_per_second = self.epochs * raw_words / max(time.perf_counter() - t0, 1e-9)
        self._sync()
        return self

    def _train_chunk(self, ids: np.ndarray, sent: np.ndarray, rng: np.random.Generator, done: int,
                     total: int) -> tuple[float, int]:
        keep = rng.random(len(ids)) < self._keep[ids]
        ids, sent = ids[keep], sent[keep]
        if len(ids) < 2:
            return 0.0, 0
        reduced = self.window - rng.integers(0, self.window, len(ids))  # 1..window
        if self.sg:
            centre_pos, ctx_pos = window_pairs(sent, reduced, self.window)
            inputs = ids[ctx_pos][:, None]
        else:
            centre_pos, ctx_pos = cbow_contexts(sent, reduced, self.window)
            inputs = ids[np.maximum(ctx_pos, 0)]
        in_mask = (ctx_pos >= 0).astype(np.float32).reshape(inputs.shape)
        centres = ids[centre_pos]
        n_chunk = len(keep)
        loss, bs = 0.0, self.batch_size
        for k in range(0, len(centres), bs):
            frac = (done + n_chunk * k / len(centres)) / max(total, 1)
            alpha = max(self.alpha - (self.alpha - self.min_alpha) * frac, self.min_alpha)
            targets, labels, t_mask = self._targets(centres[k: k + bs], rng)
            loss += sgd_step(self.syn0, self.syn1, torch.from_numpy(inputs[k: k + bs]),
                             torch.from_numpy(in_mask[k: k + bs]), torch.from_numpy(targets),
                             torch.from_numpy(labels), torch.from_numpy(t_mask), alpha, self.cbow_mean)
        return loss, len(centres)

    # gensim-style conveniences
    def save_word2vec_format(self, path: str, binary: bool = False) -> None:
        if self.wv is None:
            raise ValueError("the model has no vocabulary yet: call build_vocab/train first")
        self.wv.save_word2vec_format(path, binary=binary)
