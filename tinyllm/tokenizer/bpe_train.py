"""Byte-level BPE training (notes ch.02.4 a; Sennrich et al. 2016; GPT-2, Radford et al. 2019).

`train_bpe` cuts texts into chunks with the pre-tokenizer regex, counts chunk types (`collections.Counter` over
`findall`), and learns merges on their UTF-8 bytes. `train_merges` is incremental and vectorised (see its
docstring: one symbol array with links, a position index per pair, numpy per merge); `train_merges_naive`
recounts every pair each step and is the oracle the tests compare against. Tie-break in both: highest count,
then the lexicographically smallest (left bytes, right bytes).

Not covered: BPE-dropout, SentencePiece-style training (▁, byte fallback), parallel pre-tokenization.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

from tinyllm.tokenizer.pretokenize import DEFAULT_PATTERN, compile_pattern

if TYPE_CHECKING:
    from tinyllm.tokenizer.bpe import BPETokenizer

Pair = tuple[int, int]
_SHIFT = 24  # the trainer packs a pair of ids into one int: a << 24 | b
_LOW = (1 << _SHIFT) - 1


def pair_counts(words: Mapping[tuple[Hashable, ...], int] | Iterable[Sequence[Hashable]]) -> Counter:
    """Adjacent-pair counts weighted by word frequency, in first-seen order (so `most_common` breaks ties the
    way the note's `collections.Counter` code does). `words` maps symbol tuples to frequencies, or is a
    sequence of symbol sequences (each occurrence counts once)."""
    items = words.items() if isinstance(words, Mapping) else ((tuple(w), 1) for w in words)
    counts: Counter = Counter()
    for symbols, freq in items:
        for pair in pairwise(symbols):
            counts[pair] += freq
    return counts


def _merge_word(symbols: tuple[int, ...], a: int, b: int, new: int) -> tuple[int, ...]:
    """Replace each non-overlapping occurrence of (a, b), left to right, with `new`."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == a and symbols[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


class _Vocab:
    """Growing id <-> bytes table for the trainers; a merge whose bytes already exist reuses that id."""

    def __init__(self) -> None:
        self.tokens: list[bytes] = [bytes([b]) for b in range(256)]
        self.index: dict[bytes, int] = {t: i for i, t in enumerate(self.tokens)}

    def add(self, data: bytes) -> int:
        if data not in self.index:
            self.index[data] = len(self.tokens)
            self.tokens.append(data)
        return self.index[data]


def _chunk_types(texts: Iterable[str], pattern: str) -> Counter:
    rx = compile_pattern(pattern)
    types: Counter = Counter()
    for text in texts:
        types.update(rx.findall(text))
    return types


def train_merges(types: Mapping[bytes, int], num_tokens: int, min_frequency: int = 2,
                 show_progress: bool = False) -> tuple[list[bytes], list[Pair]]:
    """Incremental BPE on chunk types (bytes -> frequency) until the vocab holds `num_tokens` tokens or no pair
    occurs `min_frequency` times. Returns (tokens by id, merges in order).

    Layout (numpy): the bytes of all chunk types back to back in one symbol array, `nxt`/`prv` links between
    the live symbols of a type, and each position's type frequency. `where[pair]` holds arrays of positions
    where the pair started at some point (stale ones are filtered when used). A merge handles all its
    occurrences at once: keep the positions that still hold (a, b); for a == b keep every other one of a run
    ("aaaa" -> two merges, left to right, as the sequential rule does); then the neighbour pairs (x, a) and
    (b, y) lose the occurrence's frequency and (x, new), (new, y) gain it -- where two occurrences touch, the
    pair between them becomes (new, new). Cost per merge: a few numpy calls on its occurrences only.
    """
    import numpy as np
    from tqdm.auto import tqdm

    vocab = _Vocab()
    tok = vocab.tokens
    lengths = np.fromiter(map(len, types), dtype=np.int64, count=len(types))
    freqs = np.fromiter(types.values(), dtype=np.int64, count=len(types))
    sym = np.frombuffer(b"".join(types), dtype=np.uint8).astype(np.int64)
    n = len(sym)
    ends = np.cumsum(lengths)[lengths > 0]
    firsts = ends - lengths[lengths > 0]
    weight = np.repeat(freqs, lengths)
    nxt = np.arange(1, n + 1, dtype=np.int64)
    nxt[ends - 1] = -1
    prv = np.arange(-1, n - 1, dtype=np.int64)
    prv[firsts] = -1
    # initial byte pairs, counted and indexed at once (positions ascending inside each group)
    starts = np.flatnonzero(nxt >= 0)
    codes = sym[starts] << _SHIFT | sym[starts + 1]
    order = np.argsort(codes, kind="stable")
    keys, first_of = np.unique(codes[order], return_index=True)
    totals = np.add.reduceat(weight[starts][order], first_of) if len(keys) else np.zeros(0, dtype=np.int64)
    grouped = starts[order]
    bounds = [*first_of.tolist(), len(grouped)]
    counts: dict[int, int] = dict(zip(keys.tolist(), totals.tolist()))
    where: dict[int, list] = {k: [grouped[bounds[g]:bounds[g + 1]]] for g, k in enumerate(keys.tolist())}
    # heap entries are upper bounds of the true count; the key orders by count desc, then bytes asc
    heap = [(-c, tok[k >> _SHIFT], tok[k & _LOW], k >> _SHIFT, k & _LOW) for k, c in counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    bar = tqdm(total=max(num_tokens - len(tok), 0), disable=not show_progress, desc="bpe merges")
    get = counts.get
    while len(tok) < num_tokens and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        ab = a << _SHIFT | b
        c = get(ab, 0)
        if c != -neg:  # stale: the pair lost occurrences since this entry was pushed
            if c > 0:
                heapq.heappush(heap, (-c, tok[a], tok[b], a, b))
            continue
        if c < min_frequency:
            break
        size = len(tok)
        new = vocab.add(tok[a] + tok[b])
        merges.append((a, b))
        chunks = where.pop(ab)
        pos = np.unique(np.concatenate(chunks)) if len(chunks) > 1 else chunks[0]
        pos = pos[sym[pos] == a]
        nj = nxt[pos]
        pos = pos[(nj >= 0) & (sym[nj] == b)]  # sym[-1] is read for nj < 0 but masked out
        if a == b and len(pos) > 1:  # runs "aaa..": positions chained by nxt; keep ranks 0, 2, 4... of a run
            idx = np.arange(len(pos))
            head = np.ones(len(pos), dtype=bool)
            head[1:] = prv[pos[1:]] != pos[:-1]
            rank = idx - np.maximum.accumulate(np.where(head, idx, 0))
            pos = pos[rank % 2 == 0]
        i, j = pos, nxt[pos]
        f, left, right = weight[i], prv[i], nxt[j]
        ladj = np.zeros(len(i), dtype=bool)  # the left neighbour is the right half of the previous occurrence
        ladj[1:] = left[1:] == j[:-1]
        radj = np.zeros(len(i), dtype=bool)  # the right neighbour starts the next occurrence
        radj[:-1] = right[:-1] == i[1:]
        lm, rm = (left >= 0) & ~ladj, (right >= 0) & ~radj
        x, y = sym[left[lm]], sym[right[rm]]
        minus_keys = np.concatenate([x << _SHIFT | a, b << _SHIFT | y, np.full(int(radj.sum()), b << _SHIFT | a)])
        minus_f = np.concatenate([f[lm], f[rm], f[radj]])
        plus_keys = np.concatenate([x << _SHIFT | new, new << _SHIFT | y,
                                    np.full(int(ladj.sum()), new << _SHIFT | new)])
        plus_pos = np.concatenate([left[lm], i[rm], i[:-1][ladj[1:]]])
        plus_f = np.concatenate([f[lm], f[rm], f[ladj]])
        sym[i], sym[j], nxt[i] = new, -1, right
        prv[right[right >= 0]] = i[right >= 0]
        # aggregate the count changes per pair, then index the new pairs' positions
        uk, inv = np.unique(np.concatenate([minus_keys, plus_keys]), return_inverse=True)
        delta = np.bincount(inv, weights=np.concatenate([-minus_f, plus_f]), minlength=len(uk))
        for k, d in zip(uk.tolist(), delta.astype(np.int64).tolist()):
            counts[k] = get(k, 0) + d
        del counts[ab]  # no occurrence is left after merging left to right
        order = np.argsort(plus_keys, kind="stable")
        sk, sp = plus_keys[order], plus_pos[order]
        gk, gs = np.unique(sk, return_index=True)
        gs = [*gs.tolist(), len(sk)]
        for g, k in enumerate(gk.tolist()):
            where.setdefault(k, []).append(sp[gs[g]:gs[g + 1]])
            heapq.heappush(heap, (-counts[k], tok[k >> _SHIFT], tok[k & _LOW], k >> _SHIFT, k & _LOW))
        bar.update(len(tok) - size)
    bar.close()
    return tok, merges


def train_merges_naive(types: Mapping[bytes, int], num_tokens: int,
                       min_frequency: int = 2) -> tuple[list[bytes], list[Pair]]:
    """The oracle: recount every pair after every merge. Same contract and tie-break as `train_merges`."""
    vocab = _Vocab()
    tok = vocab.tokens
    words = {tuple(w): f for w, f in types.items()}
    merges: list[Pair] = []
    while len(tok) < num_tokens:
        counts = pair_counts(words)
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], tok[p[0]], tok[p[1]]))
        if counts[(a, b)] < min_frequency:
            break
        new = vocab.add(tok[a] + tok[b])
        merges.append((a, b))
        merged: dict[tuple[int, ...], int] = {}
        for w, f in words.items():
            m = _merge_word(w, a, b, new)
            merged[m] = merged.get(m, 0) + f
        words = merged
    return tok, merges


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = DEFAULT_PATTERN,
              special_tokens: Sequence[str] = (), min_frequency: int = 2, show_progress: bool = True,
              algorithm: Literal["incremental", "naive"] = "incremental", **tokenizer_kwargs: Any) -> BPETokenizer:
    """Train a byte-level BPE tokenizer.

    Ids: 0..255 are the bytes, then merged tokens in merge order, then `special_tokens` in the given order.
    `vocab_size` counts all three; training stops earlier when no pair reaches `min_frequency`.
    `tokenizer_kwargs` go to `BPETokenizer` (bos_token, eos_token, pad_token, chat_template).
    """
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"duplicate special tokens in {list(special_tokens)!r}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for 256 bytes + {len(special_tokens)} specials")
    if algorithm not in ("incremental", "naive"):
        raise ValueError(f"unknown algorithm {algorithm!r}; use 'incremental' or 'naive'")
    types = _chunk_types(texts, pattern)
    byte_types: Counter = Counter()
    for chunk, f in types.items():
        byte_types[chunk.encode("utf-8")] += f
    num_tokens = vocab_size - len(special_tokens)
    if algorithm == "naive":
        tokens, merges = train_merges_naive(byte_types, num_tokens, min_frequency)
    else:
        tokens, merges = train_merges(byte_types, num_tokens, min_frequency, show_progress)
    specials = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
    from tinyllm.tokenizer.bpe import BPETokenizer

    return BPETokenizer(dict(enumerate(tokens)), merges, specials, pattern=pattern, **tokenizer_kwargs)
