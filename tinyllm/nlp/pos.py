"""Part-of-speech tagging with a hidden Markov model (notes ch.01 词性标注, 01.5.b).

What: hidden states are tags, observations are (already segmented) words. A tag sequence t_1..t_n for words
w_1..w_n scores

    P(t, w) = Π_i P(t_i | t_{i-1}) · P(w_i | t_i)        (bigram, `order=1`)
    P(t, w) = Π_i P(t_i | t_{i-2}, t_{i-1}) · P(w_i | t_i)  (trigram, `order=2`, TnT-style)

with <s> before the first word and </s> after the last. Viterbi finds the best sequence in O(n·|T|^(order+1))
over *candidate* tags per word (known words keep the tags they were seen with; unknown words a pruned beam).

Estimates (all from counts of a tagged corpus, so training is one pass):
- transitions: deleted interpolation (Brants 2000, TnT) of unigram, bigram (and trigram) relative
  frequencies, P(t|p) = λ1·P̂(t) + λ2·P̂(t|p); the λ are set by leaving each n-gram out once, so no tuning.
- emissions: by Bayes, P(w|t) = P(t|w)·P(w)/P(t), and P(w) is the same for every tag at a position, so the
  Viterbi only needs e(w, t) = log P(t|w) − log P(t). For a word seen c(w) times,
  P(t|w) = (c(w,t) + β·P_unk(t|w)) / (c(w) + β): frequent words keep their relative frequencies, rare words
  borrow from the unknown-word model, unseen words (c(w)=0) use it alone. β=0 with `interpolation=False,
  end_state=False` is the plain maximum-likelihood HMM (what nltk's supervised HMM trainer estimates).
- unknown words: P_unk(t|w) from the word's *shape* (ASCII and full-width digits → "0", Latin letters → "a",
  Chinese characters kept) — its last and first characters are strong cues in Chinese (…县 ns, …者 n,
  …化 v/vn, 0月 t, 00 m, aaa nx). Counted over rare training words (the closest thing to unseen ones), each
  affix chain backs off from the longest affix to shorter ones to the rare-word tag prior with a Dirichlet
  pseudo-count (a count-aware form of TnT's successive abstraction); suffix and prefix estimates are combined
  as independent evidence, P_unk ∝ P(t|suffix)·P(t|prefix)/P(t).

`tag_brute_force` scores every candidate sequence — the naive twin the tests hold Viterbi to.

Not covered: CRF or neural taggers; joint segmentation + tagging (this tagger takes words; jieba.posseg's
joint (BMES, tag) HMM over characters is the notes' 01.5.a, in `tinyllm.nlp.posseg`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tinyllm.atomic import atomic_write_text

FORMAT = "tinyllm-hmm-pos"
VERSION = 1
NEG_INF = -1e30  # log(0) that stays finite, so sums never produce nan

# jieba's dictionary tags → the People's Daily 1998 (PKU) tag set. jieba's set is ICTCLAS-derived: lower-case
# morpheme tags (ng, vg, ...), split particles (uj 的, ul 了, uz 着, ug 过, uv 地, ud 得), name variants
# (nrt transliterated, nrfg full names), 'x' for punctuation and other non-words, 'eng' for Latin words,
# 'mq' numeral+classifier, 'df' 不要-like adverbs, 'zg' an odd status tag. Tags not listed map to themselves.
JIEBA_TO_PD: dict[str, str] = {
    "x": "w", "eng": "nx", "nrt": "nr", "nrfg": "nr", "ng": "Ng", "vg": "Vg", "tg": "Tg", "ag": "Ag",
    "dg": "Dg", "rg": "Rg", "mg": "Mg", "bg": "Bg", "yg": "Yg", "uj": "u", "ul": "u", "uz": "u", "ug": "u",
    "uv": "u", "ud": "u", "mq": "m", "df": "d", "rr": "r", "rz": "r", "zg": "z", "vi": "v", "vq": "v",
    "g": "Ng",
}


def word_shape(word: str) -> str:
    """Digits (ASCII and full-width) → '0', Latin letters (both widths) → 'a'; everything else is kept."""
    out = []
    for ch in word:
        o = ord(ch)
        if (ch.isascii() and ch.isdigit()) or 0xFF10 <= o <= 0xFF19:
            out.append("0")
        elif (ch.isascii() and ch.isalpha()) or 0xFF21 <= o <= 0xFF3A or 0xFF41 <= o <= 0xFF5A:
            out.append("a")
        else:
            out.append(ch)
    return "".join(out)


def _check_sentences(sentences: Iterable[Sequence[tuple[str, str]]]) -> list[Sequence[tuple[str, str]]]:
    sents = [s for s in sentences if len(s)]
    if not sents:
        raise ValueError("no tagged sentences to train on")
    return sents


class HMMTagger:
    """A bigram (order=1) or trigram (order=2) HMM POS tagger estimated from a tagged corpus.

    `HMMTagger.train(sentences)` counts; `tag(words)` returns one tag per word; `save`/`load` keep the counts
    (JSON, written atomically) so every derived probability is rebuilt identically on load.

    Defaults (β = 0.3, affixes counted over words seen ≤ 10 times as TnT does, 2-character affixes, affix
    pseudo-count 8) were chosen on a development carve-out of the training lines (every 9th), never on the
    held-out lines; they move accuracy by less than 0.1 point.
    """

    def __init__(self, counts: dict[str, Any], order: int = 1, beta: float = 0.3, rare_max: int = 10,
                 max_affix: int = 2, affix_prior: float = 8.0, beam: float = 1e-3, interpolation: bool = True,
                 end_state: bool = True) -> None:
        if order not in (1, 2):
            raise ValueError(f"order={order!r} must be 1 (bigram) or 2 (trigram)")
        for name, v in (("beta", beta), ("affix_prior", affix_prior)):
            if not v >= 0:
                raise ValueError(f"{name}={v!r} must be >= 0")
        if not 0 <= beam < 1:
            raise ValueError(f"beam={beam!r} must be in [0, 1)")
        if max_affix < 0 or rare_max < 1:
            raise ValueError(f"max_affix={max_affix!r} must be >= 0 and rare_max={rare_max!r} >= 1")
        self.counts = counts
        self.order, self.beta, self.rare_max = order, beta, rare_max
        self.max_affix, self.affix_prior, self.beam = max_affix, affix_prior, beam
        self.interpolation, self.end_state = interpolation, end_state
        self.tags: list[str] = counts["tags"]
        self.tag_index = {t: i for i, t in enumerate(self.tags)}
        self.words: dict[str, dict[str, int]] = counts["words"]
        self._build()

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, sentences: Iterable[Sequence[tuple[str, str]]], progress: bool = False,
              **params: Any) -> HMMTagger:
        """Count tags, tag n-grams, word/tag pairs and the affixes of rare words; see the module docstring."""
        sents = _check_sentences(sentences)
        rare_max = int(params.get("rare_max", 10))
        max_affix = int(params.get("max_affix", 2))
        uni: Counter[str] = Counter()
        bi: Counter[tuple[str, str]] = Counter()
        tri: Counter[tuple[str, str, str]] = Counter()
        pairs: Counter[tuple[str, str]] = Counter()
        for sent in tqdm(sents, desc="count", disable=not progress):
            pairs.update(map(tuple, sent))
            seq = ["<s>", "<s>", *(t for _, t in sent), "</s>"]
            uni.update(seq[2:-1])
            bi.update(itertools.pairwise(seq[1:]))
            tri.update(zip(seq, seq[1:], seq[2:]))
        words: dict[str, dict[str, int]] = {}
        for pair, c in pairs.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], str) and pair[0] and pair[1]):
                raise ValueError(f"{pair!r} is not a (word, tag) pair of non-empty strings")
            words.setdefault(pair[0], {})[pair[1]] = c
        suffix: dict[str, Counter[str]] = defaultdict(Counter)
        prefix: dict[str, Counter[str]] = defaultdict(Counter)
        rare_tags: Counter[str] = Counter()
        for w, tc in words.items():
            if sum(tc.values()) > rare_max:
                continue
            shape = word_shape(w)
            rare_tags.update(tc)
            for k in range(1, min(max_affix, len(shape)) + 1):
                suffix[shape[-k:]].update(tc)
                prefix[shape[:k]].update(tc)
        tags = sorted(uni)
        counts = {
            "tags": tags, "n_sentences": len(sents), "unigram": dict(uni),
            "bigram": [[a, b, c] for (a, b), c in sorted(bi.items())],
            "trigram": [[a, b, c, n] for (a, b, c), n in sorted(tri.items())],
            "words": words,
            "rare_tags": dict(rare_tags), "suffix": {k: dict(v) for k, v in suffix.items()},
            "prefix": {k: dict(v) for k, v in prefix.items()},
            "rare_max": rare_max, "max_affix": max_affix,
        }
        params = {k: v for k, v in params.items() if k not in ("rare_max", "max_affix")}
        return cls(counts, rare_max=rare_max, max_affix=max_affix, **params)

    def _build(self) -> None:
        """Turn counts into log-probability tables (transitions, tag prior, affix models)."""
        c = self.counts
        n, idx = len(self.tags), self.tag_index
        k = n  # index of <s> as a history and of </s> as an outcome
        ix = {**idx, "<s>": k, "</s>": k}
        uni = np.zeros(n + 1)
        for t, v in c["unigram"].items():
            uni[idx[t]] = v
        uni[k] = c["n_sentences"]  # </s> follows every sentence once
        total = uni.sum()
        bi = np.zeros((n + 1, n + 1))
        for a, b, v in c["bigram"]:
            bi[ix[a], ix[b]] = v
        tri = np.zeros((n + 1, n + 1, n + 1))
        for a, b, t, v in c["trigram"]:
            tri[ix[a], ix[b], ix[t]] = v
        if not self.end_state:  # no </s>: a sentence may end after any tag (nltk's HMM)
            uni[k], bi[:, k], tri[:, :, k] = 0, 0, 0
        hist1 = bi.sum(1, keepdims=True)  # how often each tag (or <s>) is a history
        hist2 = tri.sum(2, keepdims=True)
        p1 = uni / total
        p2 = np.divide(bi, hist1, out=np.zeros_like(bi), where=hist1 > 0)
        p3 = np.divide(tri, hist2, out=np.zeros_like(tri), where=hist2 > 0)
        lam = self._deleted_interpolation(uni, total, bi, hist1, tri, hist2) if self.interpolation else \
            [0.0] * self.order + [1.0]  # plain maximum likelihood: unseen transitions are impossible
        self.lambdas = lam
        if self.order == 1:
            a = lam[0] * p1[None, :] + lam[1] * p2
        else:
            a = lam[0] * p1[None, None, :] + lam[1] * p2[None, :, :] + lam[2] * p3
        self.log_trans = np.log(np.maximum(a, 1e-300)).astype(np.float64)
        self.log_trans[a == 0] = NEG_INF
        if not self.end_state:
            self.log_trans[..., k] = 0.0
        self.log_prior = np.log(uni[:n] / uni[:n].sum())
        rare = np.array([c["rare_tags"].get(t, 0) for t in self.tags], dtype=np.float64) + 0.5
        self.rare_prior = rare / rare.sum()  # smoothed so every tag stays possible for unknown words
        self._affix = {name: {a: self._vec(tc) for a, tc in c[name].items()} for name in ("suffix", "prefix")}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _deleted_interpolation(self, uni: np.ndarray, total: float, bi: np.ndarray, hist1: np.ndarray,
                               tri: np.ndarray, hist2: np.ndarray) -> list[float]:
        """TnT's λ: each n-gram votes, with its count, for the order whose estimate survives removing it."""
        lam = [0.0, 0.0, 0.0]
        if self.order == 1:
            for a, b in zip(*np.nonzero(bi)):
                v = bi[a, b]
                c1 = (uni[b] - 1) / (total - 1)
                c2 = (v - 1) / (hist1[a, 0] - 1) if hist1[a, 0] > 1 else 0.0
                lam[int(c2 > c1)] += v
        else:
            for a, b, t in zip(*np.nonzero(tri)):
                v = tri[a, b, t]
                c1 = (uni[t] - 1) / (total - 1)
                c2 = (bi[b, t] - 1) / (hist1[b, 0] - 1) if hist1[b, 0] > 1 else 0.0
                c3 = (v - 1) / (hist2[a, b, 0] - 1) if hist2[a, b, 0] > 1 else 0.0
                lam[int(np.argmax([c1, c2, c3]))] += v
        s = sum(lam)
        return [x / s for x in lam[: self.order + 1]]

    def _vec(self, tag_counts: dict[str, int]) -> np.ndarray:
        v = np.zeros(len(self.tags))
        for t, n in tag_counts.items():
            v[self.tag_index[t]] = n
        return v

    # ------------------------------------------------------------------ emissions
    def unknown_distribution(self, word: str) -> np.ndarray:
        """P_unk(t | word) from its suffix and prefix chains (backing off to shorter affixes)."""
        shape = word_shape(word)
        chains = []
        for name, take in (("suffix", lambda s, k: s[-k:]), ("prefix", lambda s, k: s[:k])):
            p = self.rare_prior
            for k in range(1, min(self.max_affix, len(shape)) + 1):
                counts = self._affix[name].get(take(shape, k))
                if counts is None:
                    break
                p = (counts + self.affix_prior * p) / (counts.sum() + self.affix_prior)
            chains.append(p)
        p = chains[0] * chains[1] / self.rare_prior
        return p / p.sum()

    def candidates(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        """(candidate tag indices, emission scores log P(t|w) − log P(t)) for one word, cached."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        seen = self.words.get(word)
        if seen and self.beta == 0:
            tags = np.array(sorted(self.tag_index[t] for t in seen))
            cw = sum(seen.values())
            post = np.array([seen[self.tags[i]] / cw for i in tags])
            out = (tags, np.log(post) - self.log_prior[tags])
        else:
            p = self.unknown_distribution(word)
            if seen:
                p = (self._vec(seen) + self.beta * p) / (sum(seen.values()) + self.beta)
            tags = np.nonzero(p >= self.beam * p.max())[0]
            out = (tags, np.log(p[tags]) - self.log_prior[tags])
        if len(self._cache) < 500_000:
            self._cache[word] = out
        return out

    # ------------------------------------------------------------------ decoding
    def tag(self, words: Sequence[str]) -> list[str]:
        """The Viterbi tag sequence for a segmented sentence."""
        if isinstance(words, str):
            raise ValueError(f"tag() takes a list of words, not the string {words[:20]!r}; segment it first")
        if not words:
            return []
        cands = [self.candidates(w) for w in words]
        path = self._viterbi1(cands) if self.order == 1 else self._viterbi2(cands)
        return [self.tags[i] for i in path]

    def tag_pairs(self, words: Sequence[str]) -> list[tuple[str, str]]:
        return list(zip(words, self.tag(words)))

    def _viterbi1(self, cands: list[tuple[np.ndarray, np.ndarray]]) -> list[int]:
        a, s = self.log_trans, len(self.tags)  # s: <s>/</s> index
        tags0, e0 = cands[0]
        delta = a[s, tags0] + e0
        back = []
        for (prev, _), (cur, e) in itertools.pairwise(cands):
            scores = delta[:, None] + a[np.ix_(prev, cur)]  # [prev, cur]
            best = scores.argmax(0)
            back.append(best)
            delta = scores[best, np.arange(len(cur))] + e
        last = cands[-1][0]
        j = int((delta + a[last, s]).argmax())
        path = [j]
        for b in reversed(back):
            j = int(b[j])
            path.append(j)
        path.reverse()
        return [int(cands[i][0][j]) for i, j in enumerate(path)]

    def _viterbi2(self, cands: list[tuple[np.ndarray, np.ndarray]]) -> list[int]:
        a, s = self.log_trans, len(self.tags)
        start = np.array([s])
        prevs = [start] + [c for c, _ in cands]  # prevs[i] = candidates of word i-1 (<s> for i=0)
        tags0, e0 = cands[0]
        delta = (a[s, s, tags0] + e0)[None, :]  # [cand(i-1), cand(i)]
        back = []
        for i in range(1, len(cands)):
            pp, p, (cur, e) = prevs[i - 1], prevs[i], cands[i]
            scores = delta[:, :, None] + a[np.ix_(pp, p, cur)]  # [i-2, i-1, i]
            best = scores.argmax(0)  # [i-1, i]
            back.append(best)
            delta = np.take_along_axis(scores, best[None], 0)[0] + e[None, :]
        pp, p = prevs[-2], prevs[-1]
        final = delta + a[np.ix_(pp, p, [s])][:, :, 0]
        jb, jc = np.unravel_index(int(final.argmax()), final.shape)
        path = [int(jc), int(jb)]
        for b in reversed(back):
            jb, jc = int(b[jb, jc]), jb
            path.append(jb)
        path.reverse()
        path = path[1:]  # drop the <s> slot
        return [int(cands[i][0][j]) for i, j in enumerate(path)]

    def score(self, words: Sequence[str], tags: Sequence[str]) -> float:
        """log P(tags, words) up to the per-position constant log P(w): the quantity Viterbi maximises."""
        s, idx = len(self.tags), self.tag_index
        seq = [s] * self.order + [idx[t] for t in tags] + [s]
        total = 0.0
        for i, w in enumerate(words):
            cand, e = self.candidates(w)
            hit = np.nonzero(cand == idx[tags[i]])[0]
            if not len(hit):
                return -math.inf
            total += float(e[hit[0]])
        for i in range(self.order, len(seq)):
            total += float(self.log_trans[tuple(seq[i - self.order: i + 1])])
        return total

    def tag_brute_force(self, words: Sequence[str]) -> list[str]:
        """The naive oracle of `tag`: score every sequence of candidate tags (short inputs only)."""
        cands = [[self.tags[i] for i in self.candidates(w)[0]] for w in words]
        n_seq = math.prod(len(c) for c in cands)
        if n_seq > 200_000:
            raise ValueError(f"{n_seq} tag sequences are too many to enumerate; use a shorter sentence")
        best = max(itertools.product(*cands), key=lambda ts: self.score(words, ts))
        return list(best)

    # ------------------------------------------------------------------ I/O
    def params(self) -> dict[str, Any]:
        return {"order": self.order, "beta": self.beta, "rare_max": self.rare_max, "max_affix": self.max_affix,
                "affix_prior": self.affix_prior, "beam": self.beam, "interpolation": self.interpolation,
                "end_state": self.end_state}

    def save(self, path: str | Path) -> Path:
        """Write counts and parameters as JSON (atomically, so a crash leaves no half file)."""
        path = Path(path)
        blob = {"format": FORMAT, "version": VERSION, "params": self.params(), "counts": self.counts}
        atomic_write_text(path, json.dumps(blob, ensure_ascii=False, separators=(",", ":")))
        return path

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> HMMTagger:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such POS model file (train one with `tinyllm pos --train`)")
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a POS model file ({e})") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        if blob.get("version") != VERSION:
            raise ValueError(f"{path}: version {blob.get('version')!r}, expected {VERSION}")
        params = {**blob["params"], **overrides}
        return cls(blob["counts"], **params)


def evaluate(tagger: HMMTagger, sentences: Iterable[Sequence[tuple[str, str]]],
             progress: bool = False) -> dict[str, float]:
    """Token accuracy on gold-segmented sentences, split into words seen in training (known) and unseen."""
    right = Counter()
    total = Counter()
    for sent in tqdm(list(sentences), desc="tag", disable=not progress):
        words = [w for w, _ in sent]
        for (w, gold), pred in zip(sent, tagger.tag(words)):
            kind = "known" if w in tagger.words else "unknown"
            total[kind] += 1
            right[kind] += pred == gold
    n = total["known"] + total["unknown"]
    if n == 0:
        raise ValueError("no tokens to evaluate")
    return {
        "accuracy": (right["known"] + right["unknown"]) / n,
        "known_accuracy": right["known"] / max(total["known"], 1),
        "unknown_accuracy": right["unknown"] / max(total["unknown"], 1),
        "tokens": n, "unknown_tokens": total["unknown"], "unknown_rate": total["unknown"] / n,
    }
