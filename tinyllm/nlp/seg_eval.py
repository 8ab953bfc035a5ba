"""Segmentation corpora and scores: read word-segmented text, word-level precision / recall / F1 by span."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_TAG = re.compile(r"/[A-Za-z]+$")


def read_segmented(path: str | os.PathLike, strip_tags: bool = True) -> list[list[str]]:
    """A segmented corpus: one sentence per line, words separated by whitespace; `word/tag` tokens lose the
    tag when `strip_tags`."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        words = [(_TAG.sub("", w) if strip_tags else w) for w in line.split()]
        words = [w for w in words if w]
        if words:
            out.append(words)
    return out


def _spans(words: Iterable[str]) -> Iterator[tuple[int, int]]:
    start = 0
    for w in words:
        yield start, start + len(w)
        start += len(w)


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    gold: int
    predicted: int
    correct: int


def segmentation_prf(gold: Iterable[list[str]], predicted: Iterable[list[str]]) -> PRF:
    """Word-level precision/recall/F1: a predicted word is correct when its (start, end) span is a gold span.
    Each gold/predicted pair must spell the same text (else ValueError naming the sentence)."""
    n_gold = n_pred = n_ok = 0
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if "".join(g) != "".join(p):
            raise ValueError(f"sentence {i}: gold and predicted words spell different text: "
                             f"{''.join(g)[:40]!r} vs {''.join(p)[:40]!r}")
        gs = set(_spans(g))
        ps = list(_spans(p))
        n_gold += len(gs)
        n_pred += len(ps)
        n_ok += sum(1 for s in ps if s in gs)
    prec = n_ok / n_pred if n_pred else 0.0
    rec = n_ok / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return PRF(prec, rec, f1, n_gold, n_pred, n_ok)
