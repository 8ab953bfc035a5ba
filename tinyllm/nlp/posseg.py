"""Segmentation with POS tags the jieba.posseg way (notes ch.01 词性标注 01.5.a).

What: cut text with the prefix-dictionary route of `tinyllm.nlp.segment.Segmenter` and tag every
dictionary word with its dictionary tag (the third column of dict.txt). Runs of single characters that are
not a dictionary word together — the unknown-word buffers — go to a *joint* HMM whose hidden states are
(BMES position, POS tag) pairs, e.g. ('B', 'nr'), ('E', 'nr'): one Viterbi pass both segments the buffer
and tags the pieces (a word takes the tag of its E or S state). So 虞子期 comes out as one nr, where the
dictionary tagger of `keywords.dictionary_tagger` has only 'x' for words it never saw.

The joint Viterbi (jieba's `posseg.viterbi`):
- states allowed for a character come from `char_state_tab` (all states for an unseen character);
- at step t the predecessors are the previous step's states that have any outgoing transition; the
  candidates are allowed(obs_t) ∩ reachable-from-predecessors, falling back to reachable, then to all;
- δ_t(y) = max_{y0} δ_{t−1}(y0) + log A(y0→y) + log B_y(obs_t), an absent transition is −∞ and an absent
  emission −3.14e100; ties go to the larger (prob, state) tuple, as Python's max over tuples does.

Characters outside Han runs: number runs → 'm', Latin/digit runs → 'eng', anything else → 'x'.
Tables are read from the installed jieba package's data files (`jieba/posseg/*.p`), never from its code.
`PossegTagger.from_jieba()` with our jieba-compatible segmenter reproduces `jieba.posseg.lcut`.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

MIN_FLOAT = -3.14e100
MIN_INF = float("-inf")

_RE_HAN_DETAIL = re.compile("([\u4e00-\u9fd5]+)")
_RE_SKIP_DETAIL = re.compile(r"([\.0-9]+|[a-zA-Z0-9]+)")
_RE_BLOCK = re.compile("([\u4e00-\u9fd5a-zA-Z0-9+#&\\._]+)")  # narrower than jieba.cut's: no % or -
_RE_SKIP = re.compile(r"(\r\n|\s)")
_RE_ENG = re.compile("[a-zA-Z0-9]+")
_RE_NUM = re.compile(r"[\.0-9]+")
_RE_ENG1 = re.compile("^[a-zA-Z0-9]$")

State = tuple[str, str]


@lru_cache(maxsize=1)
def jieba_posseg_tables() -> tuple[dict, dict, dict, dict]:
    """(char_state_tab, start, trans, emit) of jieba's joint (BMES, tag) HMM, from the installed package."""
    spec = importlib.util.find_spec("jieba")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("jieba's posseg tables need the jieba package (pip install jieba)")
    root = Path(next(iter(spec.submodule_search_locations))) / "posseg"
    out = []
    for name in ("char_state_tab", "prob_start", "prob_trans", "prob_emit"):
        with open(root / f"{name}.p", "rb") as f:
            out.append(pickle.load(f))
    return tuple(out)  # type: ignore[return-value]


def joint_viterbi(obs: str, char_states: dict[str, Any], start: dict[State, float],
                  trans: dict[State, dict[State, float]], emit: dict[State, dict[str, float]]
                  ) -> tuple[float, list[State]]:
    """Best (BMES, tag) state per character of `obs` (non-empty) and its log probability."""
    all_states = trans.keys()
    v: list[dict[State, float]] = [{}]
    back: list[dict[State, State | None]] = [{}]
    for y in char_states.get(obs[0], all_states):
        v[0][y] = start[y] + emit[y].get(obs[0], MIN_FLOAT)
        back[0][y] = None
    for t in range(1, len(obs)):
        prev = [x for x in back[t - 1] if trans[x]]
        reachable = {y for x in prev for y in trans[x]}
        cands = set(char_states.get(obs[t], all_states)) & reachable
        if not cands:
            cands = reachable or set(all_states)
        vt, bt = {}, {}
        for y in cands:
            e = emit[y].get(obs[t], MIN_FLOAT)
            vt[y], bt[y] = max((v[t - 1][y0] + trans[y0].get(y, MIN_INF) + e, y0) for y0 in prev)
        v.append(vt)
        back.append(bt)
    prob, state = max((v[-1][y], y) for y in back[-1])
    path: list[State] = [state]
    for t in range(len(obs) - 1, 0, -1):
        state = back[t][state]  # type: ignore[assignment]
        path.append(state)
    path.reverse()
    return prob, path


class PossegTagger:
    """Callable: `tagger(text) -> [(word, tag), ...]`, jieba.posseg's algorithm over our segmenter."""

    def __init__(self, segmenter: Any, tables: tuple[dict, dict, dict, dict]) -> None:
        self.seg = segmenter
        self.char_states, self.start, self.trans, self.emit = tables

    @classmethod
    def from_jieba(cls, segmenter: Any = None) -> PossegTagger:
        if segmenter is None:
            from tinyllm.nlp.segment import Segmenter

            segmenter = Segmenter.from_jieba()
        return cls(segmenter, jieba_posseg_tables())

    def __call__(self, text: str) -> list[tuple[str, str]]:
        return self.cut(text)

    def cut(self, text: str, hmm: bool = True) -> list[tuple[str, str]]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        out: list[tuple[str, str]] = []
        for i, blk in enumerate(_RE_BLOCK.split(text)):
            if i % 2:
                (self._cut_block if hmm else self._cut_block_no_hmm)(blk, out)
                continue
            for x in _RE_SKIP.split(blk):
                if _RE_SKIP.match(x):
                    out.append((x, "x"))
                    continue
                eng = bool(_RE_ENG.match(x))  # jieba tests the whole run here, not the character
                out.extend((ch, "m" if _RE_NUM.match(ch) else "eng" if eng else "x") for ch in x)
        return out

    def _tag(self, word: str) -> str:
        return self.seg.tags.get(word, "x")

    def _flush(self, buf: str, out: list[tuple[str, str]]) -> None:
        if len(buf) == 1:
            out.append((buf, self._tag(buf)))
        elif not self.seg.freq.get(buf):
            self._cut_unknown(buf, out)
        else:  # a dictionary word the route split into characters: keep the characters
            out.extend((ch, self._tag(ch)) for ch in buf)

    def _cut_block(self, blk: str, out: list[tuple[str, str]]) -> None:
        ends = self.seg.route(blk)
        x, buf = 0, ""
        while x < len(blk):
            y = ends[x]
            if y - x == 1:
                buf += blk[x]
            else:
                if buf:
                    self._flush(buf, out)
                    buf = ""
                out.append((blk[x:y], self._tag(blk[x:y])))
            x = y
        if buf:
            self._flush(buf, out)

    def _cut_block_no_hmm(self, blk: str, out: list[tuple[str, str]]) -> None:
        ends = self.seg.route(blk)
        x, buf = 0, ""
        while x < len(blk):
            word = blk[x:ends[x]]
            if _RE_ENG1.match(word):
                buf += word
            else:
                if buf:
                    out.append((buf, "eng"))
                    buf = ""
                out.append((word, self._tag(word)))
            x = ends[x]
        if buf:
            out.append((buf, "eng"))

    def _cut_unknown(self, buf: str, out: list[tuple[str, str]]) -> None:
        for i, part in enumerate(_RE_HAN_DETAIL.split(buf)):
            if i % 2:
                _, states = joint_viterbi(part, self.char_states, self.start, self.trans, self.emit)
                begin = nexti = 0
                for j, (pos, tag) in enumerate(states):
                    if pos == "B":
                        begin = j
                    elif pos == "E":
                        out.append((part[begin:j + 1], tag))
                        nexti = j + 1
                    elif pos == "S":
                        out.append((part[j], tag))
                        nexti = j + 1
                if nexti < len(part):
                    out.append((part[nexti:], states[nexti][1]))
                continue
            for x in _RE_SKIP_DETAIL.split(part):
                if x:
                    out.append((x, "m" if _RE_NUM.match(x) else "eng" if _RE_ENG.match(x) else "x"))
