"""WordPiece training (notes ch.02 tokenization): merge the pair with the highest likelihood score
freq(ab) / (freq(a)·freq(b)) until the vocabulary is full; a heap-based trainer and the naive oracle it is
tested equal to. The tokenizer itself lives in `wordpiece.py`."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise

from tinyllm.tokenizer.wordpiece import SPECIAL_NAMES, basic_tokenize


def word_counts(texts: Iterable[str], lowercase: bool = True, strip_accents: bool | None = None,
                handle_chinese_chars: bool = True) -> Counter:
    """Words of a corpus after BERT's basic tokenization, with their frequencies."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(basic_tokenize(text, lowercase, strip_accents, True, handle_chinese_chars))
    return counts


def _split_word(word: str, prefix: str) -> tuple[str, ...]:
    return tuple(c if k == 0 else prefix + c for k, c in enumerate(word))


def _join(a: str, b: str, prefix: str) -> str:
    return a + (b[len(prefix):] if b.startswith(prefix) else b)


def _score_key(pair: tuple[str, str], count: int, freq: Mapping[str, int]) -> tuple[float, int, tuple[str, str]]:
    """Sort key, smallest first: highest score, then highest pair count, then smallest pair."""
    return (-count / (freq[pair[0]] * freq[pair[1]]), -count, pair)


def train_wordpiece_naive(words: Mapping[str, int], vocab_size: int, prefix: str = "##",
                          special_tokens: Sequence[str] = SPECIAL_NAMES) -> tuple[list[str], list[tuple[str, str]]]:
    """The oracle: recount symbol and pair frequencies over all words before every merge.
    Returns (vocabulary: specials, alphabet sorted, merged tokens in merge order; merges)."""
    splits = {w: list(_split_word(w, prefix)) for w in words}
    alphabet = sorted({s for syms in splits.values() for s in syms})
    vocab = [*special_tokens, *(a for a in alphabet if a not in special_tokens)]
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        freq: Counter = Counter()
        pairs: Counter = Counter()
        for w, syms in splits.items():
            for s in syms:
                freq[s] += words[w]
            for p in pairwise(syms):
                pairs[p] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: _score_key(p, pairs[p], freq))
        merges.append(best)
        new = _join(*best, prefix)
        for syms in splits.values():
            k = 0
            while k < len(syms) - 1:
                if (syms[k], syms[k + 1]) == best:
                    syms[k : k + 2] = [new]
                k += 1
        if new not in vocab:
            vocab.append(new)
    return vocab, merges


def train_wordpiece(words: Mapping[str, int], vocab_size: int, prefix: str = "##",
                    special_tokens: Sequence[str] = SPECIAL_NAMES,
                    show_progress: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Likelihood-score merges, incremental: symbol and pair counts are updated only in the words that hold the
    merged pair, and a heap keyed by score is refreshed for every pair whose score moved (a merge changes
    freq(a), freq(b) and so the score of every pair holding a or b, up or down). Same output as the naive
    trainer."""
    from tqdm import tqdm

    types = list(words.items())
    splits = [list(_split_word(w, prefix)) for w, _ in types]
    alphabet = sorted({s for syms in splits for s in syms})
    vocab = [*special_tokens, *(a for a in alphabet if a not in special_tokens)]
    freq: Counter = Counter()
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> indices of words holding it
    partners: dict[str, set[tuple[str, str]]] = defaultdict(set)  # symbol -> pairs it is part of
    for k, (syms, (_, n)) in enumerate(zip(splits, types)):
        for s in syms:
            freq[s] += n
        for p in pairwise(syms):
            pairs[p] += n
            where[p].add(k)
            partners[p[0]].add(p)
            partners[p[1]].add(p)
    heap = [(*_score_key(p, c, freq), c) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    bar = tqdm(total=vocab_size, initial=len(vocab), disable=not show_progress, desc="wordpiece merges")
    while len(vocab) < vocab_size and heap:
        neg_score, _, pair, count = heapq.heappop(heap)
        if pairs.get(pair, 0) != count or _score_key(pair, count, freq)[0] != neg_score:
            continue  # stale: a fresher entry for this pair is in the heap
        a, b = pair
        new = _join(a, b, prefix)
        merges.append(pair)
        if new not in vocab:
            vocab.append(new)
            bar.update(1)
        touched: set[tuple[str, str]] = set()
        for k in list(where.pop(pair, ())):
            syms, n = splits[k], types[k][1]
            for p in pairwise(syms):  # remove this word's contribution, then add it back merged
                pairs[p] -= n
                touched.add(p)
            for s in syms:
                freq[s] -= n
            i, merged = 0, []
            while i < len(syms):
                if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            splits[k] = merged
            for s in merged:
                freq[s] += n
            old = set(pairwise(syms))
            for p in pairwise(merged):
                pairs[p] += n
                touched.add(p)
            for p in old - set(pairwise(merged)):
                where[p].discard(k)
            for p in pairwise(merged):
                where[p].add(k)
                partners[p[0]].add(p)
                partners[p[1]].add(p)
        for s in (a, b, new):
            touched |= partners[s]
        for p in touched:
            c = pairs.get(p, 0)
            if c <= 0:
                pairs.pop(p, None)
                continue
            heapq.heappush(heap, (*_score_key(p, c, freq), c))
    bar.close()
    return vocab, merges
