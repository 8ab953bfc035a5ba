"""n-gram language model with interpolated Kneser–Ney smoothing (notes ch.01 语言模型 01.1.e).

An n-gram LM makes the Markov assumption p(w_i | w_1..w_{i−1}) ≈ p(w_i | w_{i−n+1}..w_{i−1}) and estimates
it from counts. Raw relative frequencies give zero probability to every unseen n-gram, so counts are
smoothed. Interpolated Kneser–Ney (Chen & Goodman 1998) is the strongest classic recipe:

    P_k(w | h) = max(a_k(hw) − D_k(a_k(hw)), 0) / Σ_v a_k(hv)  +  γ_k(h) · P_{k−1}(w | h′)
    γ_k(h)     = (D_k1·N1(h•) + D_k2·N2(h•) + D_k3+·N3+(h•)) / Σ_v a_k(hv)

h′ is h without its first word, N_r(h•) the number of words v with a_k(hv) = r (r ≥ 3 for N3+), and the
recursion ends in a uniform distribution over the vocabulary: P_0(w) = 1/|V|. A history never seen at order
k passes its lower order's distribution through unchanged (γ = 1). Every P_k(·|h) sums to 1 exactly: the
discounted mass Σ D is what γ gives to the lower order.

- Counts a_k: raw counts at the highest order; below it, *continuation counts* N1+(• g) = the number of
  distinct words seen before g — "Francisco" is frequent but follows only "San", so as a lower-order
  estimate it should be rare. k-grams that start with `<s>` have no real left context and keep raw counts
  (as KenLM does).
- Discounts, per order, from the count-of-counts n_r of a_k (Chen & Goodman): Y = n1 / (n1 + 2·n2),
  D1 = 1 − 2Y·n2/n1, D2 = 2 − 3Y·n3/n2, D3+ = 3 − 4Y·n4/n3 (`modified=True`); plain interpolated KN uses the
  single discount D = Y for every count. An estimate that is undefined or outside (0, r] (tiny corpora) falls
  back to Y (or 0.5 when Y is undefined); `discounts=` sets them by hand.
- Sentences are padded with n−1 `<s>` before and one `</s>` after; `</s>` is predicted, `<s>` never is.
  Units seen fewer than `min_count` times in training become `<unk>`, so is any unit unseen in training;
  the vocabulary is the kept units plus `<unk>` and `</s>`.
- Works on any units: characters (`list(text)`) or words from a segmenter. `exact=True` does the arithmetic
  in `fractions.Fraction` so that sums to 1 can be checked exactly.

Two engines hold the same tables: `backend="python"` (dicts of tuples, one Python loop per query — the
readable reference, and the only one that does exact arithmetic) and `backend="numpy"` (every k-gram is one
int64 key Σ id_j·B^(k−1−j) over B unit ids; counting is `np.unique`, lookups are `np.searchsorted`, and a
whole held-out text is scored in n vectorised passes). "auto" picks numpy when B^order fits in 63 bits.
A test holds the two equal.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_BOS, _EOS, _UNK = 0, 1, 2  # ids of the numpy engine


def estimate_discounts(count_of_counts: Counter[int], modified: bool = True, exact: bool = False) -> tuple:
    """(D1, D2, D3+) from n_r = count_of_counts[r] (Chen & Goodman); plain KN returns (Y, Y, Y)."""
    num: Any = Fraction if exact else float
    n1, n2, n3, n4 = (count_of_counts.get(r, 0) for r in (1, 2, 3, 4))
    y = num(n1) / (n1 + 2 * n2) if n1 > 0 else num(1) / 2
    if not modified:
        return (y, y, y)
    out = []
    for r, (nr, nr1) in enumerate(((n1, n2), (n2, n3), (n3, n4)), start=1):
        d = r - (r + 1) * y * num(nr1) / nr if nr > 0 else y
        out.append(d if 0 < d <= r else min(y, num(r)))
    return tuple(out)


class KneserNeyLM:
    """Interpolated (modified) Kneser–Ney n-gram LM over arbitrary string units.

        lm = KneserNeyLM(order=3).fit([list("今天天气很好"), list("今天下雨")])
        lm.prob("天", ["今"]);  lm.perplexity([list("今天很好")])
    """

    def __init__(self, order: int = 3, modified: bool = True, min_count: int = 1,
                 discounts: float | Sequence[float] | Sequence[Sequence[float]] | None = None,
                 exact: bool = False, backend: str = "auto") -> None:
        if backend not in ("auto", "python", "numpy"):
            raise ValueError(f"backend={backend!r} is not one of ['auto', 'python', 'numpy']")
        if exact and backend == "numpy":
            raise ValueError("exact=True needs backend='python' (fractions are not numpy numbers)")
        if int(order) != order or order < 1:
            raise ValueError(f"order={order!r} must be an integer >= 1")
        if int(min_count) != min_count or min_count < 1:
            raise ValueError(f"min_count={min_count!r} must be an integer >= 1")
        self.order, self.modified, self.min_count, self.exact = order, modified, min_count, exact
        self._given = discounts
        self.backend = "python" if exact else backend
        self._fast: _Tables | None = None
        self.vocab: set[str] = set()
        self.counts: list[dict[tuple[str, ...], int]] = []   # [k] k-gram → a_k (index 0 unused)
        self.stats: list[dict[tuple[str, ...], list]] = []   # [k] history → [Σ a_k, N1, N2, N3+, γ]
        self.discounts: list[tuple] = []                      # [k] (D1, D2, D3+)

    # ------------------------------------------------------------------ training
    def _map(self, unit: str) -> str:
        return unit if unit in self.vocab else UNK

    def fit(self, sentences: Iterable[Sequence[str]]) -> KneserNeyLM:
        sentences = [list(s) for s in sentences]
        raw = Counter(u for s in sentences for u in s)
        for bad in (BOS, EOS, UNK):
            if bad in raw:
                raise ValueError(f"the training text contains the reserved unit {bad!r}")
        self.vocab = {u for u, c in raw.items() if c >= self.min_count} | {UNK, EOS}
        n = self.order
        ids = {u: i + 3 for i, u in enumerate(sorted(self.vocab - {UNK, EOS}))}
        ids.update({BOS: _BOS, EOS: _EOS, UNK: _UNK})
        use_numpy = self.backend == "numpy" or (self.backend == "auto" and len(ids) ** n < 2**63)
        if use_numpy and len(ids) ** n >= 2**63:
            raise ValueError(f"backend='numpy': {len(ids)} unit ids ** order {n} does not fit in int64 keys")
        if use_numpy:
            self._ids = ids
            stream_ids = []
            for s in sentences:
                stream_ids += [_BOS] * (n - 1) + [ids.get(u, _UNK) for u in s] + [_EOS]
            self._fast = _Tables(np.array(stream_ids, dtype=np.int64), n, len(ids), self._order_discounts)
            self.discounts = self._fast.discounts
            return self
        self._fast = None
        stream: list[str] = []
        for s in sentences:
            stream += [BOS] * (n - 1) + [self._map(u) for u in s] + [EOS]
        counts: list[dict] = [{} for _ in range(n + 1)]
        # highest order: raw counts of n-grams that end in a predicted unit (never <s>)
        counts[n] = dict(Counter(g for g in zip(*(stream[j:] for j in range(n))) if g[-1] != BOS))
        for k in range(n - 1, 0, -1):  # continuation counts from the order above; raw for <s>-initial k-grams
            cont: Counter = Counter(g[1:] for g in counts[k + 1] if g[1] != BOS)
            raw_bos = Counter(g for g in zip(*(stream[j:] for j in range(k))) if g[0] == BOS and g[-1] != BOS)
            cont.update(raw_bos)
            counts[k] = dict(cont)
        self.counts = counts
        self.discounts = [()] + [self._order_discounts(k, Counter(counts[k].values())) for k in range(1, n + 1)]
        self.stats = [{} for _ in range(n + 1)]
        for k in range(1, n + 1):
            d1, d2, d3 = self.discounts[k]
            st: dict[tuple[str, ...], list] = defaultdict(lambda: [0, 0, 0, 0])
            for g, c in counts[k].items():
                row = st[g[:-1]]
                row[0] += c
                row[min(c, 3)] += 1
            self.stats[k] = {h: [t, n1, n2, n3, (d1 * n1 + d2 * n2 + d3 * n3) / t]
                             for h, (t, n1, n2, n3) in st.items()}
        return self

    def _order_discounts(self, k: int, count_of_counts: Counter[int]) -> tuple:
        given = self._given
        if given is None:
            return estimate_discounts(count_of_counts, self.modified, self.exact)
        if isinstance(given, (int, float, Fraction)):
            d = (given,) * 3
        else:
            item = given[k - 1]
            d = tuple(item) * (3 if len(item) == 1 else 1) if isinstance(item, (list, tuple)) else (item,) * 3
        if len(d) != 3 or not all(0 <= x <= r for r, x in zip((1, 2, 3), d)):
            raise ValueError(f"discounts for order {k} = {d!r}: need 0 <= D_r <= r for r = 1, 2, 3+")
        return tuple(Fraction(x) if self.exact else float(x) for x in d)

    # ------------------------------------------------------------------ probabilities
    def prob(self, word: str, context: Sequence[str] = ()) -> Any:
        """P(word | the last order−1 units of context); a shorter context uses the orders it can fill."""
        if not self.counts and self._fast is None:
            raise ValueError("the model is not trained: call fit() first")
        if self._fast is not None:
            keep = list(context[max(0, len(context) - (self.order - 1)):]) if self.order > 1 else []
            ctx = [-1] * (self.order - 1 - len(keep)) + [self._ids.get(u, _UNK) for u in keep]
            w = self._ids.get(word, _UNK)
            return float(self._fast.probs(np.array([ctx], dtype=np.int64).reshape(1, -1), np.array([w]))[0])
        w = EOS if word == EOS else self._map(word)
        keep = context[max(0, len(context) - (self.order - 1)):] if self.order > 1 else ()
        ctx = tuple(u if u == BOS else self._map(u) for u in keep)
        p: Any = Fraction(1, len(self.vocab)) if self.exact else 1.0 / len(self.vocab)
        for k in range(1, min(self.order, len(ctx) + 1) + 1):
            h = ctx[len(ctx) - (k - 1):] if k > 1 else ()
            st = self.stats[k].get(h)
            if st is None:
                continue  # unseen history: γ = 1, the lower order's distribution passes through
            c = self.counts[k].get((*h, w), 0)
            if c:
                d = self.discounts[k][min(c, 3) - 1]
                p = (c - d) / st[0] + st[4] * p
            else:
                p = st[4] * p
        return p

    def sentence_logprob(self, units: Sequence[str]) -> tuple[float, int]:
        """(log2 probability of the sentence and its </s>, number of predicted units)."""
        pad = [BOS] * (self.order - 1) + list(units) + [EOS]
        bits = 0.0
        for i in range(self.order - 1, len(pad)):
            bits += math.log2(self.prob(pad[i], pad[i - self.order + 1: i]))
        return bits, len(pad) - self.order + 1

    def evaluate(self, sentences: Iterable[Sequence[str]]) -> dict[str, float]:
        """Held-out cross-entropy: bits per predicted unit (</s> included), perplexity 2^bits, the OOV rate."""
        bits, tokens, oov, chars = 0.0, 0, 0, 0
        if self._fast is not None:
            sentences = [list(s) for s in sentences]
            n = self.order
            stream = []
            for s in sentences:
                stream += [_BOS] * (n - 1) + [self._ids.get(u, _UNK) for u in s] + [_EOS]
            arr = np.array(stream, dtype=np.int64)
            pred = np.flatnonzero(arr != _BOS)
            ctx = np.stack([arr[pred - (n - 1) + j] for j in range(n - 1)], axis=1) if n > 1 \
                else np.zeros((len(pred), 0), np.int64)
            bits = -float(np.log2(self._fast.probs(ctx, arr[pred])).sum())
            tokens = len(pred)
        for s in sentences:
            if self._fast is None:
                b, t = self.sentence_logprob(s)
                bits, tokens = bits - b, tokens + t
            oov += sum(u not in self.vocab for u in s)
            chars += sum(len(u) for u in s) + 1  # + 1: the </s> stands for the line break
        return {"bits_per_token": bits / tokens, "perplexity": 2 ** (bits / tokens), "tokens": tokens,
                "oov_rate": oov / max(tokens, 1), "bits_per_char": bits / chars, "chars": chars}

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> float:
        return self.evaluate(sentences)["perplexity"]


class _Tables:
    """The numpy engine's tables: per order k, sorted int64 k-gram keys with their counts a_k, and per
    history key its Σ a_k and back-off weight γ. Keys are base-B numbers over the unit ids (<s> = 0)."""

    def __init__(self, stream: np.ndarray, order: int, base: int, discount_fn: Any) -> None:
        n, b = order, base
        self.order, self.base = n, b
        pred = np.flatnonzero(stream != _BOS)  # every predicted position has n − 1 units before it

        def gram_keys(k: int) -> np.ndarray:
            key = np.zeros(len(pred), dtype=np.int64)
            for j in range(k):
                key = key * b + stream[pred - k + 1 + j]
            return key

        keys: list[np.ndarray] = [np.zeros(0, np.int64)] * (n + 1)
        counts: list[np.ndarray] = [np.zeros(0, np.int64)] * (n + 1)
        keys[n], counts[n] = np.unique(gram_keys(n), return_counts=True)
        for k in range(n - 1, 0, -1):
            up = keys[k + 1]
            suffix = up % b**k                             # distinct left extensions of each k-gram,
            suffix = suffix[suffix // b ** (k - 1) != _BOS]  # but <s>-initial k-grams keep raw counts
            ck, cc = np.unique(suffix, return_counts=True)
            raw = gram_keys(k)
            bk, bc = np.unique(raw[raw // b ** (k - 1) == _BOS], return_counts=True)  # <s>-initial: raw counts
            allk, allc = np.concatenate([ck, bk]), np.concatenate([cc, bc])
            order_ = np.argsort(allk, kind="stable")
            keys[k], counts[k] = allk[order_], allc[order_]
        self.keys, self.counts = keys, counts
        self.discounts: list[tuple] = [()]
        self.hist: list[np.ndarray] = [np.zeros(0, np.int64)]
        self.total: list[np.ndarray] = [np.zeros(0, np.int64)]
        self.gamma: list[np.ndarray] = [np.zeros(0)]
        self.dtab: list[np.ndarray] = [np.zeros(0)]
        for k in range(1, n + 1):
            c = counts[k]
            cc = np.bincount(np.minimum(c, 5), minlength=6)
            d = discount_fn(k, Counter({r: int(cc[r]) for r in range(1, 5)}))
            self.discounts.append(d)
            h = keys[k] // b
            starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
            total = np.add.reduceat(c, starts)
            nr = [np.add.reduceat((c == r) if r < 3 else (c >= 3), starts) for r in (1, 2, 3)]
            self.hist.append(h[starts])
            self.total.append(total)
            self.gamma.append((float(d[0]) * nr[0] + float(d[1]) * nr[1] + float(d[2]) * nr[2]) / total)
            self.dtab.append(np.array([0.0, float(d[0]), float(d[1]), float(d[2])]))

    def probs(self, ctx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """P(w | ctx) for rows of ctx [m, order−1] (unit ids, −1 where the context is shorter)."""
        b, n = self.base, self.order
        vocab_size = b - 1  # every id but <s>
        p = np.full(len(w), 1.0 / vocab_size)
        hkey = np.zeros(len(w), dtype=np.int64)
        avail = np.ones(len(w), dtype=bool)
        for k in range(1, n + 1):
            if k > 1:
                tok = ctx[:, n - k]
                avail &= tok >= 0
                hkey = np.where(avail, np.maximum(tok, 0) * b ** (k - 2) + hkey, 0)
            hs = self.hist[k]
            i = np.minimum(np.searchsorted(hs, hkey), len(hs) - 1)
            found = avail & (hs[i] == hkey)
            gk = hkey * b + w
            ks = self.keys[k]
            j = np.minimum(np.searchsorted(ks, gk), len(ks) - 1)
            c = np.where(found & (ks[j] == gk), self.counts[k][j], 0)
            own = np.where(c > 0, (c - self.dtab[k][np.minimum(c, 3)]) / self.total[k][i], 0.0)
            p = np.where(found, own + self.gamma[k][i] * p, p)
        return p
