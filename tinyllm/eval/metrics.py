"""Text-generation and language-model metrics (notes ch.01 熵/困惑度, ch.09 评估).

- Perplexity: exp(mean negative log-likelihood per predicted token), i.e. exp of the cross-entropy in nats;
  2^(bits per token) is the same number.
- ROUGE-L (Lin 2004): from the longest common subsequence of candidate c and reference r,
  P = LCS/|c|, R = LCS/|r|, F = (1+β²)PR/(R+β²P); β = 1 gives the harmonic mean that `rouge-score` reports
  as `fmeasure`. For Chinese, score characters (`tokenize="char"`): word segmentation would make the
  metric depend on the segmenter.
- Accuracy and the majority-class baseline for classification tasks.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(total negative log-likelihood in nats / number of predicted tokens)."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens={num_tokens} must be positive")
    return math.exp(total_nll / num_tokens)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(|a|·|b|) time, O(min) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    fmeasure: float


_WORD = re.compile(r"[a-z0-9]+")


def tokens_for_rouge(text: str, tokenize: str = "char") -> list[str]:
    """"char": every non-space character; "word": lower-cased alphanumeric runs (rouge-score's default)."""
    if tokenize == "char":
        return [c for c in text if not c.isspace()]
    if tokenize == "word":
        return _WORD.findall(text.lower())
    raise ValueError(f"tokenize={tokenize!r} is not one of ['char', 'word']")


def rouge_l(candidate: str, reference: str, tokenize: str = "char") -> Score:
    c, r = tokens_for_rouge(candidate, tokenize), tokens_for_rouge(reference, tokenize)
    if not c or not r:
        return Score(0.0, 0.0, 0.0)
    lcs = lcs_length(c, r)
    p, rec = lcs / len(c), lcs / len(r)
    f = 0.0 if lcs == 0 else 2 * p * rec / (p + rec)
    return Score(p, rec, f)


def mean_rouge_l(candidates: Sequence[str], references: Sequence[str], tokenize: str = "char") -> float:
    """Mean ROUGE-L F over pairs."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates vs {len(references)} references")
    if not candidates:
        raise ValueError("no pairs to score")
    return sum(rouge_l(c, r, tokenize).fmeasure for c, r in zip(candidates, references)) / len(candidates)


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need equal, non-empty lists (got {len(predictions)} and {len(labels)})")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def majority_baseline(train_labels: Sequence, test_labels: Sequence) -> float:
    """Accuracy of always answering the most frequent training label."""
    majority = Counter(train_labels).most_common(1)[0][0]
    return accuracy([majority] * len(test_labels), test_labels)
