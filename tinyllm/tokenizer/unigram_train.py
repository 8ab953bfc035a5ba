"""Unigram LM training (notes ch.02 tokenization): seed vocabulary of frequent substrings, EM over the
segmentation lattices, pruning by the loss each piece's removal would cause. The tokenizer itself (Viterbi,
n-best, sampling) lives in `unigram.py`."""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tinyllm.tokenizer.unigram import _PLACEHOLDER, SPACE, UnigramTokenizer, chunks, digamma, normalize


@dataclass
class UnigramTrainStats:
    """What training did: seed size, pieces and corpus negative log-likelihood per round, seconds."""

    seed_size: int = 0
    rounds: list[tuple[int, float]] = field(default_factory=list)  # (pieces, −Σ log Z) after each EM round
    seconds: float = 0.0


def _required_chars(counts: Counter, coverage: float) -> list[str]:
    total, acc, out = sum(counts.values()), 0, []
    for ch, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
        if out and acc / total >= coverage:
            break
        out.append(ch)
        acc += n
    return out


def _frequent_substrings(chunk_counts: Mapping[str, int], max_len: int, min_count: int = 2) -> Counter:
    """Counts of every substring of length 2..max_len occurring ≥ min_count times (Apriori: an n-gram can be
    frequent only if both its (n−1)-grams are, so each level scans only the surviving positions)."""
    texts = list(chunk_counts)
    weights = [chunk_counts[t] for t in texts]
    out: Counter = Counter()
    alive = [(k, i) for k, t in enumerate(texts) for i in range(len(t))]  # level 1: every position
    prev: set[str] | None = None  # frequent (n−1)-grams; None = all characters
    for n in range(2, max_len + 1):
        level: Counter = Counter()
        nxt = []
        for k, i in alive:
            t = texts[k]
            if i + n > len(t):
                continue
            if prev is not None and t[i + 1 : i + n] not in prev:
                continue
            g = t[i : i + n]
            if _PLACEHOLDER in g or SPACE in g[1:]:
                continue
            level[g] += weights[k]
            nxt.append((k, i))
        keep = {g for g, c in level.items() if c >= min_count}
        if not keep:
            break
        out.update({g: level[g] for g in keep})
        alive = [(k, i) for k, i in nxt if texts[k][i : i + n] in keep]
        prev = keep
    return out


class _ChunkLattices:
    """All chunks' lattices as flat numpy arrays, for the vectorised E-step and Viterbi. Nodes: chunk c owns
    nodes start[c] .. start[c] + len(c); an edge (src, dst, piece) with local positions."""

    def __init__(self, texts: Sequence[str], weights: np.ndarray, piece_id: Mapping[str, int], max_len: int) -> None:
        prefixes = {p[:k] for p in piece_id for k in range(1, len(p) + 1)}
        lens = np.array([len(t) for t in texts], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]).astype(np.int64)
        self.end = self.start + lens
        self.num_nodes = int(self.end[-1]) + 1 if len(texts) else 0
        self.weights = weights
        src, dst, pid, owner = [], [], [], []
        for c, t in enumerate(texts):
            base = int(self.start[c])
            for i in range(len(t)):
                for j in range(i + 1, min(len(t), i + max_len) + 1):
                    s = t[i:j]
                    if s not in prefixes:
                        break
                    p = piece_id.get(s)
                    if p is not None:
                        src.append(base + i)
                        dst.append(base + j)
                        pid.append(p)
                        owner.append(c)
        self.src, self.dst = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
        self.pid, self.owner = np.array(pid, dtype=np.int64), np.array(owner, dtype=np.int64)
        self.node_chunk = np.repeat(np.arange(len(texts)), lens + 1)
        self.set_alive(np.ones(len(self.src), dtype=bool))

    def set_alive(self, mask: np.ndarray) -> None:
        """Keep the edges whose piece survives; precompute the forward and backward processing groups."""
        keep = np.flatnonzero(mask)
        self.e_src, self.e_dst, self.e_pid = self.src[keep], self.dst[keep], self.pid[keep]
        self.e_owner = self.owner[keep]
        local_end = self.e_dst - self.start[self.e_owner]
        local_start = self.e_src - self.start[self.e_owner]
        self.fwd_groups = self._groups(local_end, self.e_dst)
        self.bwd_groups = self._groups(-local_start, self.e_src)

    @staticmethod
    def _groups(step: np.ndarray, node: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Edges ordered by (step, node); per step: (edge indices, first index of each node run, the nodes)."""
        order = np.lexsort((node, step))
        steps = step[order]
        cuts = np.flatnonzero(np.diff(steps)) + 1
        out = []
        for idx in np.split(order, cuts):
            nodes = node[idx]
            first = np.concatenate([[0], np.flatnonzero(np.diff(nodes)) + 1])
            out.append((idx, first, nodes[first]))
        return out

    def _sweep(self, logp: np.ndarray, forward: bool, use_max: bool) -> np.ndarray:
        val = np.full(self.num_nodes, -np.inf)
        val[self.start if forward else self.end] = 0.0
        src = self.e_src if forward else self.e_dst  # the node an edge leaves in this direction
        for idx, first, nodes in (self.fwd_groups if forward else self.bwd_groups):
            v = val[src[idx]] + logp[self.e_pid[idx]]
            top = np.maximum.reduceat(v, first)
            if use_max:
                val[nodes] = top
            else:
                run = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(idx))))
                val[nodes] = top + np.log(np.add.reduceat(np.exp(v - top[run]), first))
        return val

    def expected_counts(self, logp: np.ndarray) -> tuple[np.ndarray, float]:
        """E-step: (expected count of each piece, Σ weight · log Z)."""
        alpha, beta = self._sweep(logp, True, False), self._sweep(logp, False, False)
        log_z = alpha[self.end]
        post = np.exp(alpha[self.e_src] + logp[self.e_pid] + beta[self.e_dst] - log_z[self.e_owner])
        counts = np.bincount(self.e_pid, weights=post * self.weights[self.e_owner], minlength=len(logp))
        return counts, float(self.weights @ log_z)

    def viterbi_counts(self, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weighted count of each piece on the Viterbi paths, weighted number of chunks whose path uses it)."""
        best = self._sweep(logp, True, True)
        # the edge into each node on a best path: an edge that attains best[dst] (ties: the last such edge)
        good = np.flatnonzero(best[self.e_src] + logp[self.e_pid] >= best[self.e_dst] - 1e-9)
        back = np.full(self.num_nodes, -1, dtype=np.int64)
        back[self.e_dst[good]] = good
        cur = self.end[self.end > self.start].copy()
        count = np.zeros(len(logp))
        used_pairs = []
        while len(cur):
            e = back[cur]
            owner = self.e_owner[e]
            np.add.at(count, self.e_pid[e], self.weights[owner])
            used_pairs.append(owner * len(logp) + self.e_pid[e])
            cur = self.e_src[e]
            cur = cur[cur != self.start[self.node_chunk[cur]]]
        pairs = np.unique(np.concatenate(used_pairs)) if used_pairs else np.zeros(0, dtype=np.int64)
        docs = np.bincount(pairs % len(logp), weights=self.weights[pairs // len(logp)], minlength=len(logp))
        return count, docs


def _viterbi_alternative(piece: str, logp: Mapping[str, float], max_len: int) -> list[str] | None:
    """Best segmentation of `piece` into other pieces (never the piece itself); None if there is none."""
    n = len(piece)
    best = [0.0] + [-math.inf] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_len), j):
            if i == 0 and j == n:
                continue
            s = logp.get(piece[i:j])
            if s is not None and best[i] + s > best[j]:
                best[j], back[j] = best[i] + s, i
    if best[n] == -math.inf:
        return None
    out, j = [], n
    while j > 0:
        out.append(piece[back[j] : j])
        j = back[j]
    return out[::-1]


def train_unigram(texts: Iterable[str], vocab_size: int, character_coverage: float = 0.9995,
                  max_piece_length: int = 16, seed_size: int = 1_000_000, shrinking_factor: float = 0.75,
                  num_sub_iterations: int = 2, nfkc: bool = True, special_tokens: Sequence[str] = ("<unk>", "<s>",
                                                                                                   "</s>"),
                  show_progress: bool = False, stats: UnigramTrainStats | None = None) -> UnigramTokenizer:
    """Train a Unigram tokenizer of `vocab_size` ids (specials included) on `texts` (one sentence or line each).
    See the module docstring for the algorithm; `stats` (optional) receives the per-round record. On a corpus too
    small for the size asked, EM leaves fewer useful pieces and the vocabulary comes out smaller (sentencepiece
    raises instead unless hard_vocab_limit=false)."""
    import time

    from tqdm import tqdm

    if not 0 < character_coverage <= 1:
        raise ValueError(f"character_coverage={character_coverage} must be in (0, 1]")
    if not 0 < shrinking_factor < 1:
        raise ValueError(f"shrinking_factor={shrinking_factor} must be in (0, 1)")
    if max_piece_length < 1 or num_sub_iterations < 1:
        raise ValueError(f"max_piece_length={max_piece_length} and num_sub_iterations={num_sub_iterations} "
                         "must be >= 1")
    t0 = time.perf_counter()
    stats = stats if stats is not None else UnigramTrainStats()
    chunk_counts: Counter = Counter()
    for text in texts:
        chunk_counts.update(chunks(normalize(text, nfkc)))
    if not chunk_counts:
        raise ValueError("no text to train on")
    char_counts: Counter = Counter()
    for t, n in chunk_counts.items():
        for ch in t:
            char_counts[ch] += n
    required = _required_chars(char_counts, character_coverage)
    budget = vocab_size - len(special_tokens)
    if budget < len(required):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(required)} characters needed for "
                         f"character_coverage={character_coverage} plus {len(special_tokens)} special tokens")
    known = set(required)
    if len(known) < len(char_counts):  # rare characters stand for <unk> during training
        merged: Counter = Counter()
        for t, n in chunk_counts.items():
            merged["".join(c if c in known else _PLACEHOLDER for c in t)] += n
        chunk_counts = merged
        char_counts[_PLACEHOLDER] = sum(n for c, n in char_counts.items() if c not in known)
        required.append(_PLACEHOLDER)
    subs = _frequent_substrings(chunk_counts, max_piece_length)
    seeds = heapq.nlargest(seed_size, subs.items(), key=lambda x: (x[1] * len(x[0]), x[0]))
    pieces = list(required) + [s for s, _ in seeds]
    raw = np.array([char_counts[c] for c in required] + [n * len(s) for s, n in seeds], dtype=np.float64)
    stats.seed_size = len(pieces)
    piece_id = {p: i for i, p in enumerate(pieces)}
    logp = np.log(raw) - np.log(raw.sum())
    texts_list = list(chunk_counts)
    lat = _ChunkLattices(texts_list, np.array([chunk_counts[t] for t in texts_list], dtype=np.float64), piece_id,
                         max_piece_length)
    alive = np.ones(len(pieces), dtype=bool)
    is_char = np.zeros(len(pieces), dtype=bool)
    is_char[: len(required)] = True
    target = max(int(budget * 1.1), len(required))
    bar = tqdm(desc="unigram EM", disable=not show_progress)
    while True:
        for _ in range(num_sub_iterations):
            counts, loglik = lat.expected_counts(logp)
            drop = alive & ~is_char & (counts < 0.5)
            if drop.any():
                alive &= ~drop
                lat.set_alive(alive[lat.pid])
            c = np.where(alive, np.maximum(counts, 0.5 * is_char), 0.0)  # characters never vanish
            logp = np.full(len(pieces), -np.inf)
            logp[alive] = digamma(c[alive]) - digamma(np.array([c[alive].sum()]))[0]
        stats.rounds.append((int(alive.sum()), -loglik))
        bar.update(1)
        bar.set_postfix(pieces=int(alive.sum()), nll=f"{-loglik:.4g}")
        if alive.sum() <= target:
            break
        pruned = _prune(pieces, logp, alive, is_char, lat, shrinking_factor, target, max_piece_length)
        if pruned.sum() == alive.sum():
            break  # nothing left to remove (only characters remain)
        alive = pruned
        lat.set_alive(alive[lat.pid])
    bar.close()
    # final vocabulary: the characters, then the most probable other pieces
    others = sorted((i for i in np.flatnonzero(alive & ~is_char)), key=lambda i: (-logp[i], pieces[i]))
    chosen = [i for i in range(len(required)) if pieces[i] != _PLACEHOLDER] + others[: budget - len(known)]
    chosen.sort(key=lambda i: (-logp[i], pieces[i]))
    stats.seconds = time.perf_counter() - t0
    return UnigramTokenizer([(pieces[i], float(logp[i])) for i in chosen], special_tokens=special_tokens,
                            unk_token=special_tokens[0], nfkc=nfkc, bos_token=special_tokens[1] if len(
                                special_tokens) > 1 else None,
                            eos_token=special_tokens[2] if len(special_tokens) > 2 else None)


def _prune(pieces: Sequence[str], logp: np.ndarray, alive: np.ndarray, is_char: np.ndarray, lat: _ChunkLattices,
           shrinking_factor: float, target: int, max_len: int) -> np.ndarray:
    """Keep the pieces whose removal would cost the likelihood most (see the module docstring, step 3)."""
    freq, docs = lat.viterbi_counts(logp)
    total, ndocs = freq.sum(), lat.weights.sum()
    current = {pieces[i]: float(logp[i]) for i in np.flatnonzero(alive)}
    index = {pieces[i]: i for i in np.flatnonzero(alive)}
    keep = alive & is_char
    candidates: list[tuple[float, int]] = []
    for i in np.flatnonzero(alive & ~is_char):
        if freq[i] == 0:
            continue  # not on any Viterbi path: free to drop
        alt = _viterbi_alternative(pieces[i], current, max_len)
        if alt is None:
            keep[i] = True
            continue
        # after removal, x's Viterbi count moves to each piece of its alternative
        new_total = total + freq[i] * (len(alt) - 1)
        lp_alt = sum(math.log(freq[index[y]] + freq[i]) - math.log(new_total) for y in alt)
        lp_x = math.log(freq[i]) - math.log(total)
        candidates.append(((docs[i] / ndocs) * (lp_x - lp_alt), i))
    size = max(target, int(shrinking_factor * alive.sum()))
    room = max(0, size - int(keep.sum()))
    for _, i in sorted(candidates, key=lambda x: (-x[0], x[1]))[:room]:
        keep[i] = True
    return keep
