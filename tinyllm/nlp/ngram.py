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
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


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
                 exact: bool = False) -> None:
        if int(order) != order or order < 1:
            raise ValueError(f"order={order!r} must be an integer >= 1")
        if int(min_count) != min_count or min_count < 1:
            raise ValueError(f"min_count={min_count!r} must be an integer >= 1")
        self.order, self.modified, self.min_count, self.exact = order, modified, min_count, exact
        self._given = discounts
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
        self.discounts = [()] + [self._order_discounts(k) for k in range(1, n + 1)]
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

    def _order_discounts(self, k: int) -> tuple:
        given = self._given
        if given is None:
            return estimate_discounts(Counter(self.counts[k].values()), self.modified, self.exact)
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
        if not self.counts:
            raise ValueError("the model is not trained: call fit() first")
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
        for s in sentences:
            b, t = self.sentence_logprob(s)
            bits, tokens = bits - b, tokens + t
            oov += sum(u not in self.vocab for u in s)
            chars += sum(len(u) for u in s) + 1  # + 1: the </s> stands for the line break
        return {"bits_per_token": bits / tokens, "perplexity": 2 ** (bits / tokens), "tokens": tokens,
                "oov_rate": oov / max(tokens, 1), "bits_per_char": bits / chars, "chars": chars}

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> float:
        return self.evaluate(sentences)["perplexity"]
