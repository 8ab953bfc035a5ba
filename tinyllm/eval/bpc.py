"""Bits per character and bits per byte of held-out text (notes ch.01 熵/困惑度, ch.09 评估).

Perplexity is per *token*, so it cannot compare two models with different vocabularies: a tokenizer with
longer tokens predicts fewer, harder tokens. The total code length of the text does not depend on how it was
cut: bits per character = Σ −log2 p(token) over the text / its number of characters (and the same sum / its
UTF-8 bytes). This module measures it for a causal LM with any tokenizer and for a character n-gram baseline
(interpolated Kneser–Ney, `tinyllm.nlp.ngram`) on exactly the same characters, so the numbers line up.

Conventions (shared by both scorers, so their denominators are equal by construction):
- A held-out text is a list of documents. Each is scored on its own, starting from the document boundary
  (the LM reads its end-of-text token, the n-gram its `<s>` padding), and each model also predicts the end of
  the document (end-of-text / `</s>`). That boundary counts as one character and one byte, as if documents
  were separated by a line break, so characters = Σ (len(doc) + 1) and bytes = Σ (len(utf8(doc)) + 1).
- The LM scores a document in windows of at most `context` input tokens. The first window scores all its
  tokens; each next window starts `stride` tokens later and scores only the tokens not scored yet, so every
  token is predicted once, with at least context − stride tokens (or the whole document prefix) before it.
  stride = context gives non-overlapping windows (cheapest, weakest context). Scoring is fp32 under no_grad.
- Text is normalised as the tokenizer normalises it (`tokenizer.normalization`, usually none) before either
  model sees it, and the LM's tokenization must decode back to the same string (checked), so both models
  pay for the same characters.
- The n-gram's `<unk>` stands for every character unseen in training. A model that only gave P(<unk>) would
  pay nothing for *which* character it was, so an unseen character is also charged a spelling cost: its UTF-8
  length k ∈ {1..4} uniformly (2 bits) and each byte uniformly (8 bits): −log2 P(<unk>) + 2 + 8k bits. That is
  a proper distribution over all characters, so the baseline's bits are an honest upper bound.
- The n-gram's training vocabulary keeps every character seen at least `min_count` times; `min_count` is the
  smallest value that lets the vectorised engine's k-gram keys fit in 64 bits (usually 1 for 3-grams).

The n-gram result is cached as JSON keyed by the hash of the training text, the held-out text, the order and
the convention version, so evaluating the same run again costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.atomic import atomic_write_json
from tinyllm.eval.harness import scored_logits

CONVENTION = ("per-document scoring from the boundary token; the end of each document is predicted and counted "
              "as one character and one byte")
_CACHE_VERSION = 1
_LN2 = math.log(2.0)


def texts_sha256(texts: Iterable[str]) -> str:
    """Hash of a document list (each document length-prefixed, so boundaries are part of the hash)."""
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class BitsScore:
    """Total code length of a held-out text and the units it is divided by."""

    bits: float
    chars: int          # Σ (len(doc) + 1): the +1 is the end-of-document boundary
    bytes: int          # Σ (len(utf8(doc)) + 1)
    documents: int
    predictions: int    # tokens (LM) or characters + boundaries (n-gram) predicted
    sha256: str         # texts_sha256 of the scored documents

    @property
    def bits_per_char(self) -> float:
        return self.bits / self.chars

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits_per_char": self.bits_per_char, "bits_per_byte": self.bits_per_byte}


def text_units(texts: Sequence[str]) -> tuple[int, int]:
    """(characters, bytes) of a document list under the boundary convention above."""
    return sum(len(t) + 1 for t in texts), sum(len(t.encode("utf-8")) + 1 for t in texts)


def normalize_texts(texts: Iterable[str], normalization: str | None) -> list[str]:
    """Apply the tokenizer's Unicode normalisation (NFC/NFKC/...) so every model scores the same string."""
    if not normalization:
        return list(texts)
    return [unicodedata.normalize(normalization, t) for t in texts]


def select_documents(pool: Iterable[str], char_budget: int, exclude: Iterable[str] = ()) -> list[str]:
    """Whole documents from `pool`, in order, while they fit in `char_budget` characters (a document that
    would overflow it is skipped); exact duplicates and documents in `exclude` (e.g. the training text) are
    dropped, so the held-out set is really unseen."""
    if char_budget <= 0:
        raise ValueError(f"char_budget={char_budget} must be positive")
    seen, out, n = set(exclude), [], 0
    for doc in pool:
        if not doc or doc in seen:
            continue
        seen.add(doc)
        if n + len(doc) + 1 <= char_budget:
            out.append(doc)
            n += len(doc) + 1
    return out


# ------------------------------------------------------------------ the LM
def _windows(ids: list[int], context: int, stride: int) -> list[tuple[list[int], int]]:
    """(window tokens, number of targets scored at its end) covering every target of `ids` exactly once.
    A window of k + 1 tokens gives k inputs and k targets (inputs ids[b:e], targets ids[b+1:e+1])."""
    m = len(ids) - 1  # targets
    out, begin, scored_to = [], 0, 0
    while True:
        end = min(begin + context, m)
        out.append((ids[begin : end + 1], end - scored_to))
        scored_to = end
        if end == m:
            return out
        begin += stride


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document, encoded as the training shards were; raises if a document does not
    decode back to itself (then the LM would be scored on a different string than the n-gram)."""
    docs = []
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t)
        ids = list(getattr(ids, "ids", ids))
        if tokenizer.decode(ids) != t:
            raise ValueError(f"document {i} ({t[:20]!r}...) does not round-trip through the tokenizer; "
                             "normalise the texts with normalize_texts() first")
        docs.append(ids)
    return docs


@torch.no_grad()
def lm_bits(model: nn.Module, token_docs: Sequence[Sequence[int]], texts: Sequence[str], boundary_id: int,
            context: int, stride: int | None = None, batch_tokens: int = 4096) -> BitsScore:
    """Σ −log2 p over every token of every document and its closing boundary, each document prefixed by
    `boundary_id`, scored in windows of `context` inputs advancing by `stride` (default context // 2).

    `token_docs[i]` must be `texts[i]` encoded (see `encode_documents`); `texts` gives the denominators.
    `model(ids)` returns logits [b, t, V]. Windows are sorted by length and batched up to `batch_tokens` inputs.
    """
    if len(token_docs) != len(texts) or not texts:
        raise ValueError(f"{len(token_docs)} token documents for {len(texts)} texts (need equal, non-zero)")
    stride = context // 2 if stride is None else stride
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"context={context}, stride={stride}: need context >= 1 and 1 <= stride <= context")
    wins = [w for ids in token_docs for w in _windows([boundary_id, *ids, boundary_id], context, stride)]
    wins.sort(key=lambda w: -len(w[0]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, i = 0.0, 0, 0
    while i < len(wins):
        width = len(wins[i][0]) - 1
        chunk = wins[i : i + max(1, batch_tokens // width)]
        i += len(chunk)
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (toks, n_scored) in enumerate(chunk):
            k = len(toks) - 1
            x[r, :k] = torch.tensor(toks[:-1])
            y[r, k - n_scored : k] = torch.tensor(toks[k + 1 - n_scored :])  # logits at t predict token t+1
        scored = y != -100
        logits = scored_logits(model, x.to(device), scored.to(device))  # [n_scored, V]
        total += float(F.cross_entropy(logits, y[scored].to(device), reduction="sum"))
        count += int(scored.sum())
    model.train(was_training)
    expected = sum(len(d) + 1 for d in token_docs)
    if count != expected:  # every token and every closing boundary exactly once
        raise AssertionError(f"scored {count} tokens, expected {expected}")
    chars, nbytes = text_units(texts)
    return BitsScore(total / _LN2, chars, nbytes, len(texts), count, texts_sha256(texts))


# ------------------------------------------------------------------ the n-gram baseline
def _min_count_for_keys(train_texts: Sequence[str], order: int) -> int:
    """Smallest min_count whose vocabulary (+ <s>, </s>, <unk>) keeps base^order under 2^63."""
    freq = sorted(Counter(ch for t in train_texts for ch in t).values(), reverse=True)
    m = 1
    while (sum(c >= m for c in freq) + 3) ** order >= 2**63:
        m += 1
    return m


def kneser_ney_bits(train_texts: Sequence[str], texts: Sequence[str], order: int, modified: bool = True,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Bits of `texts` under a character Kneser–Ney `order`-gram trained on `train_texts` (documents as
    sentences), with the spelling charge for unseen characters; a `BitsScore.as_dict()` plus `order`,
    `min_count`, `train_sha256`, `train_chars`, `oov_chars`, `seconds` and `cached` (True when read back from
    `cache_dir`)."""
    from tinyllm.nlp.ngram import KneserNeyLM

    if not train_texts or not texts:
        raise ValueError(f"{len(train_texts)} training and {len(texts)} held-out documents (need both)")
    train_sha, held_sha = texts_sha256(train_texts), texts_sha256(texts)
    key = hashlib.sha256(json.dumps({"v": _CACHE_VERSION, "order": order, "modified": modified,
                                     "train": train_sha, "heldout": held_sha}).encode()).hexdigest()
    path = Path(cache_dir) / f"kn{order}-{key[:32]}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
        except (json.JSONDecodeError, OSError):
            pass  # a damaged entry is recomputed and overwritten
    t0 = time.perf_counter()
    min_count = _min_count_for_keys(train_texts, order)
    lm = KneserNeyLM(order, modified=modified, min_count=min_count, backend="numpy")
    lm.fit(list(t) for t in train_texts)
    res = lm.evaluate([list(t) for t in texts])
    chars, nbytes = text_units(texts)
    if res["tokens"] != chars:
        raise AssertionError(f"the n-gram predicted {res['tokens']} units for {chars} characters")
    oov = [ch for t in texts for ch in t if ch not in lm.vocab]
    spelling = sum(2 + 8 * len(ch.encode("utf-8")) for ch in oov)
    score = BitsScore(res["bits_per_token"] * res["tokens"] + spelling, chars, nbytes, len(texts), res["tokens"],
                      held_sha)
    out = {**score.as_dict(), "order": order, "modified": modified, "min_count": min_count,
           "train_sha256": train_sha, "train_documents": len(train_texts),
           "train_chars": text_units(train_texts)[0], "oov_chars": len(oov), "oov_spelling_bits": spelling,
           "seconds": time.perf_counter() - t0}
    if path is not None:
        atomic_write_json(path, out)
    return {**out, "cached": False}
