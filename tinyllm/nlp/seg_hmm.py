"""The BMES hidden Markov model of the segmenter (notes ch.01: 隐马尔可夫模型 for unknown words): log-space start,
transition and emission tables, Viterbi over a run of characters, estimation from segmented text, and the reader
of jieba's `finalseg` tables (plain data, jieba is never imported). `segment.py` uses it for runs of characters
the dictionary does not cover."""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MIN_FLOAT = -3.14e100  # jieba's log(0) stand-in for HMM tables
STATES = "BMES"
PREV_STATES = {"B": "ES", "M": "MB", "S": "SE", "E": "BM"}  # allowed predecessors of each BMES state


@dataclass
class HMM:
    """BMES hidden Markov model in log space: start[s], trans[s][t], emit[s][char] (missing = MIN_FLOAT)."""

    start: dict[str, float]
    trans: dict[str, dict[str, float]]
    emit: dict[str, dict[str, float]] = field(repr=False)

    def __post_init__(self) -> None:
        for name, table in (("start", self.start), ("trans", self.trans), ("emit", self.emit)):
            if set(table) != set(STATES):
                raise ValueError(f"HMM {name} table has states {sorted(table)}, expected {list(STATES)}")

    def viterbi(self, obs: str) -> str:
        """Most likely BMES tag string of `obs` (non-empty), exactly jieba's `finalseg.viterbi` path.

        Scores are (prev + trans) + emit, the same float operations in the same order as jieba, and ties are
        broken the way its `max` over (score, state) tuples breaks them: toward the later letter (S > M > E > B).
        """
        if not obs:
            raise ValueError("viterbi needs a non-empty observation string")
        st, tr, em = self.start, self.trans, self.emit
        eB, eM, eE, eS = em["B"].get, em["M"].get, em["E"].get, em["S"].get
        tEB, tSB = tr["E"].get("B", MIN_FLOAT), tr["S"].get("B", MIN_FLOAT)
        tMM, tBM = tr["M"].get("M", MIN_FLOAT), tr["B"].get("M", MIN_FLOAT)
        tSS, tES = tr["S"].get("S", MIN_FLOAT), tr["E"].get("S", MIN_FLOAT)
        tBE, tME = tr["B"].get("E", MIN_FLOAT), tr["M"].get("E", MIN_FLOAT)
        c = obs[0]
        vB = st["B"] + eB(c, MIN_FLOAT)
        vM = st["M"] + eM(c, MIN_FLOAT)
        vE = st["E"] + eE(c, MIN_FLOAT)
        vS = st["S"] + eS(c, MIN_FLOAT)
        back: list[tuple[str, str, str, str]] = []  # per step: predecessor of B, M, E, S
        for c in obs[1:]:
            e = eB(c, MIN_FLOAT)
            a, b = vE + tEB + e, vS + tSB + e
            nB, pB = (b, "S") if b >= a else (a, "E")
            e = eM(c, MIN_FLOAT)
            a, b = vB + tBM + e, vM + tMM + e
            nM, pM = (b, "M") if b >= a else (a, "B")
            e = eE(c, MIN_FLOAT)
            a, b = vB + tBE + e, vM + tME + e
            nE, pE = (b, "M") if b >= a else (a, "B")
            e = eS(c, MIN_FLOAT)
            a, b = vE + tES + e, vS + tSS + e
            nS, pS = (b, "S") if b >= a else (a, "E")
            vB, vM, vE, vS = nB, nM, nE, nS
            back.append((pB, pM, pE, pS))
        state = "S" if vS >= vE else "E"
        tags = [state]
        index = {"B": 0, "M": 1, "E": 2, "S": 3}
        for ptr in reversed(back):
            state = ptr[index[state]]
            tags.append(state)
        return "".join(reversed(tags))

    def viterbi_reference(self, obs: str) -> str:
        """The textbook Viterbi over dicts (jieba's formulation), kept as the twin of `viterbi`."""
        V = [{y: self.start[y] + self.emit[y].get(obs[0], MIN_FLOAT) for y in STATES}]
        path = {y: y for y in STATES}
        for t in range(1, len(obs)):
            V.append({})
            new = {}
            for y in STATES:
                em = self.emit[y].get(obs[t], MIN_FLOAT)
                prob, prev = max((V[t - 1][y0] + self.trans[y0].get(y, MIN_FLOAT) + em, y0)
                                 for y0 in PREV_STATES[y])
                V[t][y] = prob
                new[y] = path[prev] + y
            path = new
        _, last = max((V[-1][y], y) for y in "ES")
        return path[last]

    def to_json(self) -> dict:
        return {"start": self.start, "trans": self.trans, "emit": self.emit}

    @staticmethod
    def count(words_per_sentence: Iterable[Iterable[str]]) -> tuple[Counter, dict[str, Counter], dict[str, Counter]]:
        """BMES counts of segmented sentences: (start[s], trans[s][t], emit[s][char]). A word of length 1 is S,
        a longer one B M…M E."""
        texts, tag_strs = [], []
        for words in words_per_sentence:
            words = [w for w in words if w]
            if words:
                texts.append("".join(words))
                tag_strs.append("".join(_bmes(len(w)) for w in words))
        # one C-level pass each: "|" separates sentences, so pairs containing it are not transitions
        text, tags = "|".join(texts), "|".join(tag_strs)
        start: Counter[str] = Counter(t[0] for t in tag_strs)
        trans: dict[str, Counter[str]] = {s: Counter() for s in STATES}
        emit: dict[str, Counter[str]] = {s: Counter() for s in STATES}
        for (a, b), n in Counter(itertools.pairwise(tags)).items():
            if a != "|" and b != "|":
                trans[a][b] += n
        for (ch, t), n in Counter(zip(text, tags)).items():
            if t != "|":
                emit[t][ch] += n
        return start, trans, emit

    @classmethod
    def from_counts(cls, start: Counter, trans: dict[str, Counter], emit: dict[str, Counter],
                    alpha: float = 0.0) -> HMM:
        """Maximum-likelihood log tables from BMES counts: start(s) = #start in s / #sequences,
        trans(s→t) = #(s,t) / #(s,·), emit(s, c) = (#(s,c) + α) / (#s + α·|V_s|) over the characters seen in
        s; a zero count becomes MIN_FLOAT (log 0), as in jieba's tables."""

        def logs(counter: Counter, keys: Iterable[str], add: float = 0.0) -> dict[str, float]:
            keys = list(keys)
            total = sum(counter[k] for k in keys) + add * len(keys)
            return {k: (math.log((counter[k] + add) / total) if counter[k] + add > 0 else MIN_FLOAT)
                    for k in keys}

        return cls(start=logs(start, STATES), trans={s: logs(trans[s], PREV_OF_NEXT[s]) for s in STATES},
                   emit={s: logs(emit[s], emit[s], alpha) for s in STATES})

    @classmethod
    def estimate(cls, words_per_sentence: Iterable[Iterable[str]], alpha: float = 0.0) -> HMM:
        """Supervised BMES model of segmented sentences (`count` then `from_counts`)."""
        return cls.from_counts(*cls.count(words_per_sentence), alpha=alpha)


@functools.lru_cache(maxsize=64)
def _bmes(n: int) -> str:
    """BMES tags of a word of n characters: S, BE, BME, BMME, ..."""
    return "S" if n == 1 else "B" + "M" * (n - 2) + "E"


PREV_OF_NEXT = {"B": "EM", "M": "EM", "E": "BS", "S": "BS"}  # allowed successors of each state


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed (pip install tinyllm[nlp])")
    return Path(next(iter(spec.submodule_search_locations)))


_TABLE_ITEM = re.compile(r"'((?:[^'\\]|\\.)*)'\s*:\s*(\{|[-+0-9.eE]+)")


def _read_table(path: Path) -> dict:
    """A jieba `prob_*.py` file (`P = {'B': {'\\u4e00': -3.65, ...}, ...}`) read as data, never imported: a
    scan of its 'key': value items (6× faster than `ast.literal_eval` on the 1.3 MB emission table, same
    floats — tests compare the two)."""
    text = path.read_text(encoding="utf-8")
    top: dict = {}
    cur = top
    for m in _TABLE_ITEM.finditer(text):
        key = m.group(1)
        if "\\" in key:
            key = key.encode("latin-1", "backslashreplace").decode("unicode_escape")
        if m.group(2) == "{":
            cur = top[key] = {}
        else:
            cur[key] = float(m.group(2))
    if set(top) != set(STATES):
        raise ValueError(f"{path}: expected a table over the states {list(STATES)}, got keys {sorted(top)[:8]}")
    return top


def _read_table_reference(path: Path) -> dict:
    """The same table through `ast.literal_eval` (slow, obviously right)."""
    text = path.read_text(encoding="utf-8")
    return ast.literal_eval(text[text.index("P=") + 2:].strip())


@functools.lru_cache(maxsize=1)
def jieba_hmm() -> HMM:
    """jieba's `finalseg` BMES tables (prob_start/prob_trans/prob_emit), read from the installed package."""
    root = _package_dir("jieba") / "finalseg"
    return HMM(start=_read_table(root / "prob_start.py"), trans=_read_table(root / "prob_trans.py"),
               emit=_read_table(root / "prob_emit.py"))
