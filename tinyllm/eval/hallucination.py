"""Hallucination detection scores and their AUROC (notes ch.09 大模型幻觉: 9.2.e SelfCheckGPT, 9.3 factuality
detection by retrieval and by uncertainty).

Every score here is "higher = more likely hallucinated", so one `auroc` ranks them all:

- **SelfCheck consistency** (Manakul et al. 2023, SelfCheckGPT): sample k answers to the same prompt; a
  sentence the model knows recurs across them, an invented one does not. Two BERTScore-free variants:
  `selfcheck_overlap` — for each sentence of the main answer, 1 − the share of its n-grams found in a sample
  (counts clipped, as ROUGE-N recall), averaged over the k samples: 0 when every sample repeats the sentence;
  `selfcheck_unigram` — SelfCheckGPT's n-gram variant with n = 1: a unigram model with add-one smoothing fit
  on the samples and the main answer, each sentence scored by its mean (and max) negative log-probability.
- **Retrieval-grounded support** (`retrieval_support`): retrieve the top-k passages for a query (the claim,
  or the question it answers) with our BM25 index (`tinyllm.rag.bm25`), and score 1 − the largest share of
  the claim's n-grams that one retrieved passage contains — a claim no evidence backs is suspect.
- **Uncertainty** (`sequence_uncertainty`): from the model's logits at the claim's tokens given its context,
  the mean token entropy H = −Σ_v p_v log p_v and the length-normalised log-probability (1/T) Σ_t log p(y_t);
  the scores are the entropy and −(1/T) Σ log p.

Text units: Chinese characters one by one, runs of Latin letters (lower-cased) or digits as words (`tokens`),
so no segmenter decides the result. `auroc` is the Mann–Whitney statistic: the probability that a random
positive outscores a random negative, ties counted half (equal to `sklearn.metrics.roc_auc_score`).

`inews_fact_set` builds the constructed benchmark: an inews article's lead as context, its real title as a
true claim, and a corrupted title (a number changed, a place/person/organisation name swapped for one of the
same kind from another title, or another article's title) as a false one.

Not covered: BERTScore/NLI/QA-based SelfCheck variants, named-entity error rate with a trained NER,
sentence-level repair (RARR), and detection from hidden states.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNIT = re.compile(f"[{_HAN}]|[^\\W\\d_{_HAN}]+|\\d+")
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|(?<=\.)\s+|\n+")


def tokens(text: str) -> list[str]:
    """Chinese characters, lower-cased Latin words and digit runs; punctuation and spaces dropped."""
    return _UNIT.findall(text.lower())


def split_sentences(text: str) -> list[str]:
    """Sentences ending in 。！？!?；; or '. ', or at a line break; empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def ngrams(units: Sequence[str], n: int) -> Counter:
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    return Counter(tuple(units[i: i + n]) for i in range(len(units) - n + 1))


def coverage(claim: str, evidence: str, n: int = 1) -> float:
    """Share of the claim's n-grams (with multiplicity) that the evidence contains; 1.0 for an empty claim."""
    c = ngrams(tokens(claim), n)
    total = sum(c.values())
    if total == 0:
        return 1.0
    return sum((c & ngrams(tokens(evidence), n)).values()) / total


# ------------------------------------------------------------------ SelfCheck consistency over k samples

def _check_samples(samples: Sequence[str]) -> None:
    if not samples:
        raise ValueError("selfcheck needs at least one sampled answer")


def selfcheck_overlap(sentences: Sequence[str], samples: Sequence[str], n: int = 1) -> list[float]:
    """Per sentence: mean over the samples of 1 − coverage(sentence, sample)."""
    _check_samples(samples)
    return [sum(1.0 - coverage(s, x, n) for x in samples) / len(samples) for s in sentences]


def selfcheck_unigram(sentences: Sequence[str], samples: Sequence[str], passage: str | None = None,
                      smoothing: float = 1.0) -> dict[str, Any]:
    """SelfCheckGPT's unigram variant: P(w) = (count(w) + α) / (N + α·|V|) over the units of the samples and
    the main passage (default: the sentences joined), an unseen unit counted as '<unk>' (count 0).
    Returns per-sentence `avg_neg_logprob` and `max_neg_logprob` and their document-level means."""
    _check_samples(samples)
    if smoothing < 0:
        raise ValueError(f"smoothing={smoothing} must be >= 0")
    counts: Counter = Counter()
    for text in [*samples, passage if passage is not None else " ".join(sentences)]:
        counts.update(tokens(text))
    vocab = len(counts) + 1  # + '<unk>'
    total = sum(counts.values())

    def logp(u: str) -> float:
        num = counts.get(u, 0) + smoothing
        return math.log(num / (total + smoothing * vocab)) if num > 0 else -math.inf

    avg, mx, all_lp = [], [], []
    for s in sentences:
        lps = [logp(u) for u in tokens(s)]
        if not lps:
            avg.append(0.0)
            mx.append(0.0)
            continue
        all_lp += lps
        avg.append(-sum(lps) / len(lps))
        mx.append(-min(lps))
    return {"avg_neg_logprob": avg, "max_neg_logprob": mx,
            "doc_avg_neg_logprob": -sum(all_lp) / len(all_lp) if all_lp else 0.0,
            "doc_avg_max_neg_logprob": sum(mx) / len(mx) if mx else 0.0}


# ------------------------------------------------------------------ retrieval-grounded support

def retrieval_support(claims: Sequence[str], index: Any, passages: Callable[[str], str] | dict[str, str],
                      queries: Sequence[str] | None = None, k: int = 3, n: int = 2) -> list[dict[str, Any]]:
    """For each claim: BM25 top-k passages for its query (default: the claim itself), the support
    max_p coverage(claim, p, n), and the hallucination score 1 − support. `index` is a
    `tinyllm.rag.bm25.BM25Index` (or anything with `search(query, k) -> [(id, score)]`); `passages` maps an
    id to its text."""
    if queries is not None and len(queries) != len(claims):
        raise ValueError(f"{len(claims)} claims but {len(queries)} queries")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    text = passages.__getitem__ if isinstance(passages, dict) else passages
    out = []
    for i, claim in enumerate(claims):
        hits = index.search(queries[i] if queries is not None else claim, k)
        support = max((coverage(claim, text(pid), n) for pid, _ in hits), default=0.0)
        out.append({"support": support, "score": 1.0 - support, "passages": [pid for pid, _ in hits]})
    return out


# ------------------------------------------------------------------ uncertainty from the logits

@torch.no_grad()
def sequence_uncertainty(lm: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 8) -> list[dict[str, float]]:
    """Per (context, continuation): the continuation's mean token entropy (nats), mean and min token
    log-probability, and token count, under `lm` (a `TinyLM` or `HFLM` of `tinyllm.eval.lm`). The pair is
    split into tokens as lm-eval's loglikelihood splits it (`encode_pair`)."""
    from tinyllm.eval.lm import encode_pair

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    toks = [encode_pair(lm.encode, c, x) for c, x in pairs]
    for (c, x), (_, cont) in zip(pairs, toks):
        if not cont:
            raise ValueError(f"continuation {x!r} of context {c[-30:]!r} encodes to no tokens")
    out: list[dict[str, float]] = []
    for s in range(0, len(toks), batch_size):
        chunk = [(ctx + cont)[-(lm.max_length + 1):] for ctx, cont in toks[s: s + batch_size]]
        ncont = [min(len(cont), len(row) - 1) for (_, cont), row in zip(toks[s: s + batch_size], chunk)]
        width = max(len(r) for r in chunk) - 1
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols = [], []
        for r, row in enumerate(chunk):
            ids[r, : len(row) - 1] = torch.tensor(row[:-1])
            rows += [r] * ncont[r]
            cols += range(len(row) - 1 - ncont[r], len(row) - 1)
        logits = _logits_at(lm, ids.to(lm.device), torch.tensor(rows), torch.tensor(cols))
        logp = F.log_softmax(logits.float(), -1).cpu()  # [Σ ncont, V]
        ent = -(logp.exp() * logp).sum(-1)
        start = 0
        for r, row in enumerate(chunk):
            m = ncont[r]
            target = torch.tensor(row[len(row) - m:])
            lp = logp[start: start + m].gather(1, target[:, None])[:, 0]
            out.append({"mean_entropy": float(ent[start: start + m].mean()), "mean_logprob": float(lp.mean()),
                        "min_logprob": float(lp.min()), "tokens": m})
            start += m
    return out


def _logits_at(lm: Any, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits [n, V] at (rows, cols) only: a tinyllm model projects just those positions onto the vocabulary."""
    rows, cols = rows.to(ids.device), cols.to(ids.device)
    if hasattr(lm, "_logits_at"):
        return lm._logits_at(ids, rows, cols)
    out = lm.model(ids)
    return (out.logits if hasattr(out, "logits") else out)[rows, cols]


# ------------------------------------------------------------------ AUROC

def auroc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive): the Mann–Whitney U over
    n_pos · n_neg, from average ranks (ties count half)."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    bad = [y for y in labels if y not in (0, 1)]
    if bad:
        raise ValueError(f"labels must be 0 or 1, got {bad[0]!r}")
    if any(math.isnan(s) for s in scores):
        raise ValueError("scores contain NaN")
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"AUROC needs both classes (got {pos} positive, {neg} negative)")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1  # average 1-based rank of the tie group
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


# ------------------------------------------------------------------ the constructed inews fact set

ENTITY_TAGS = ("ns", "nr", "nt")  # place, person, organisation in jieba's dictionary
KINDS = ("number", "entity", "other_title")
_DIGITS = re.compile(r"\d+")


def _entity_tags() -> tuple[Callable[[str], list[str]], dict[str, str]]:
    from tinyllm.data.corpora import package_dir
    from tinyllm.rag.bm25 import _cut

    tags: dict[str, str] = {}
    with open(package_dir("jieba") / "dict.txt", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] in ENTITY_TAGS and len(parts[0]) >= 2:
                tags[parts[0]] = parts[2]
    return _cut(), tags


def change_number(title: str, rng: random.Random) -> str | None:
    """The title with one of its numbers replaced by a different number of the same digit count."""
    found = list(_DIGITS.finditer(title))
    if not found:
        return None
    m = rng.choice(found)
    value = m.group(0)
    for _ in range(20):
        lo = 10 ** (len(value) - 1) if len(value) > 1 else 0
        new = str(rng.randint(lo, 10 ** len(value) - 1))
        if new != value:
            return title[: m.start()] + new + title[m.end():]
    return None


def inews_fact_set(split: str = "test", n: int = 100, seed: int = 0, lead_chars: int = 80) -> list[dict[str, Any]]:
    """2·n claims from the first n usable articles of an inews split: {"context": the article's lead,
    "claim": a title, "label": 0 for the real title, 1 for a corrupted one, "kind", "article"}. Article i's
    corruption is KINDS[i % 3] (a number changed, an entity swapped with one of the same tag from another
    title, another article's title), falling back along that list when the title has no number or entity."""
    from tinyllm.data.corpora import inews

    arts = [a for a in inews(split) if a.title and len(a.content.strip()) >= lead_chars]
    if n < 1 or n > len(arts):
        raise ValueError(f"n={n} must be in [1, {len(arts)}] (usable articles in inews {split})")
    arts = arts[:n]
    cut, tags = _entity_tags()
    words = [cut(a.title) for a in arts]
    pool: dict[str, list[str]] = {}
    for ws in words:
        for w in ws:
            if w in tags:
                pool.setdefault(tags[w], []).append(w)
    rng = random.Random(seed)
    out = []
    for i, a in enumerate(arts):
        lead = " ".join(a.content.split())[:lead_chars]
        fake, kind = None, ""
        for kind in KINDS[i % 3:] + KINDS[: i % 3]:
            if kind == "number":
                fake = change_number(a.title, rng)
            elif kind == "entity":
                ents = [w for w in words[i] if w in tags]
                if ents:
                    w = rng.choice(ents)
                    others = sorted({x for x in pool[tags[w]] if x != w})
                    fake = a.title.replace(w, rng.choice(others), 1) if others else None
            else:
                j = rng.choice([j for j in range(len(arts)) if arts[j].title != a.title])
                fake = arts[j].title
            if fake:
                break
        out.append({"context": lead, "claim": a.title, "label": 0, "kind": "true", "article": i})
        out.append({"context": lead, "claim": fake, "label": 1, "kind": kind, "article": i})
    return out


def title_prompt(lead: str) -> str:
    """The prompt of the `inews_title` task: the claim (a title) is its continuation."""
    return f"新闻：{lead}\n标题："


def score_fact_set(lm: Any, facts: Sequence[dict[str, Any]], k: int = 5, temperature: float = 0.8,
                   max_gen_toks: int = 32, seed: int = 0, corpus_split: str = "test", chunk_chars: int = 200,
                   top_k: int = 3, batch_size: int = 16) -> dict[str, Any]:
    """Every method's score of every claim of `inews_fact_set` with `lm`, and the AUROC of each method, overall
    and per corruption kind (the true claims against that kind's corrupted ones)."""
    from tinyllm.data.corpora import inews
    from tinyllm.rag.bm25 import BM25Index

    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    leads = sorted({f["context"] for f in facts})
    prompts = {c: title_prompt(c) for c in leads}
    reqs = [(prompts[c], {"until": ["\n"], "max_gen_toks": max_gen_toks, "temperature": temperature,
                          "seed": seed + j}) for c in leads for j in range(k)]
    gens = lm.generate_until(reqs, batch_size)
    samples = {c: gens[i * k: (i + 1) * k] for i, c in enumerate(leads)}
    unc = sequence_uncertainty(lm, [(prompts[f["context"]], f["claim"]) for f in facts], batch_size)
    passages: dict[str, str] = {}
    for a, art in enumerate(inews(corpus_split)):
        text = " ".join(art.content.split())
        for j in range(0, len(text), chunk_chars):
            passages[f"{a}#{j // chunk_chars}"] = text[j: j + chunk_chars]
    index = BM25Index(tokenizer="zh-bigram")
    index.add(list(passages), list(passages.values()))
    claims = [f["claim"] for f in facts]
    by_question = retrieval_support(claims, index, passages, queries=[f["context"] for f in facts], k=top_k)
    by_claim = retrieval_support(claims, index, passages, k=top_k)
    scores: dict[str, list[float]] = {
        "selfcheck_overlap_1gram": [selfcheck_overlap([f["claim"]], samples[f["context"]], 1)[0] for f in facts],
        "selfcheck_overlap_2gram": [selfcheck_overlap([f["claim"]], samples[f["context"]], 2)[0] for f in facts],
        "selfcheck_unigram": [selfcheck_unigram([f["claim"]], samples[f["context"]])["avg_neg_logprob"][0]
                              for f in facts],
        "retrieval_question_query": [r["score"] for r in by_question],
        "retrieval_claim_query": [r["score"] for r in by_claim],
        "mean_entropy": [u["mean_entropy"] for u in unc],
        "neg_mean_logprob": [-u["mean_logprob"] for u in unc],
    }
    labels = [int(f["label"]) for f in facts]
    kinds = sorted({f["kind"] for f in facts if f["label"]})
    result: dict[str, Any] = {"auroc": {}, "auroc_by_kind": {}, "n": len(facts), "k": k,
                              "kinds": {c: sum(f["kind"] == c for f in facts) for c in kinds}}
    for name, s in scores.items():
        result["auroc"][name] = auroc(s, labels)
        result["auroc_by_kind"][name] = {
            c: auroc([x for x, f in zip(s, facts) if f["label"] == 0 or f["kind"] == c],
                     [y for y, f in zip(labels, facts) if f["label"] == 0 or f["kind"] == c]) for c in kinds}
    result["scores"], result["samples"] = scores, samples
    return result
