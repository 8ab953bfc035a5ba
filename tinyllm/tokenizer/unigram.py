"""Unigram language-model tokenizer: EM training with pruning, Viterbi segmentation, subword sampling
(notes ch.02.4 d/e; Kudo 2018 "Subword Regularization"; Kudo & Richardson 2018 "SentencePiece").

Model. A vocabulary V of pieces with probabilities p(x), Σ p(x) = 1; a text X is a sequence of independent pieces,
P(x_1..x_m) = Π p(x_i). The tokenization of X is the most probable segmentation

    x* = argmax_{x ∈ S(X)} Σ_i log p(x_i)        (Viterbi over the lattice of pieces that spell X)

and the corpus log-likelihood marginalises over segmentations: L = Σ_s log Σ_{x ∈ S(X_s)} P(x).

Training (`unigram_train.train_unigram`):
1. seed vocabulary: every character of the alphabet (the most frequent characters covering `character_coverage`
   of the text; rarer ones become <unk>) plus the most frequent substrings (count ≥ 2, at most
   `max_piece_length` characters, ranked by count · length; `seed_size` of them). Pieces never cross a script
   boundary (Han / Latin / ... / "common" digits and punctuation) and hold "▁" (the space) only at their start,
   as SentencePiece's defaults do. Initial log p = log(score / Σ score).
2. EM, `num_sub_iterations` times: E-step -- expected piece counts by forward-backward over each chunk's lattice
   (α_j = logsumexp_{(i→j)} α_i + log p(x_ij), β likewise from the end, posterior of an edge
   exp(α_i + log p + β_j − log Z)); M-step -- drop pieces expected fewer than 0.5 times, log p(x) =
   ψ(c(x)) − ψ(Σ c) (the digamma of counts: SentencePiece's variational-Bayes flavour of c(x)/Σc, which
   shrinks rare pieces more).
3. prune: for each piece x, the loss of removing it is (share of chunks whose Viterbi path uses x) ·
   (log p(x) − Σ_{y ∈ alt(x)} log p'(y)), alt(x) being x's best segmentation without x and p' the probabilities
   after x's count moves to alt(x). Keep the `shrinking_factor` (75%) of pieces with the largest loss (single
   characters are always kept), i.e. remove the 25% whose removal costs least -- the note's "10-20%".
4. repeat 2-3 until at most 1.1 · vocab_size pieces remain, then keep the characters and the most probable
   pieces up to vocab_size (with <unk>, <s>, </s>).

Encoding: NFKC (optional), runs of whitespace collapsed, a space prepended (`add_dummy_prefix`), spaces written
"▁"; Viterbi per "▁"-word; characters outside the vocabulary become <unk> (consecutive ones fused, score
min − 10), as in SentencePiece. Decoding is lossless up to that normalisation.

Subword regularisation (`sample`): forward-filtering backward-sampling draws a segmentation with probability
∝ P(x)^α -- forward α-sums over the lattice with scores α·log p, then from the end pick each previous edge with
probability ∝ exp(fwd_i + α·log p(x_ij)). α → ∞ concentrates on the Viterbi path; α → 0 is uniform over
segmentations. `nbest` lists the k best segmentations exactly.

Fast and naive: the E-step and the corpus Viterbi of training run vectorised over all chunks at once (numpy,
one step per position); `UnigramTokenizer.viterbi` / `forward_backward_naive` are the per-string reference
implementations they are tested against (and brute-force enumeration tests those).

Not covered: byte fallback, SentencePiece's precompiled normalisation rules (we use NFKC), BPE mode of
SentencePiece, reading `.model` protobuf files (`from_pieces` takes pieces and scores from any source).
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import os
import random
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import regex

from tinyllm.atomic import atomic_write_files
from tinyllm.tokenizer.bpe import split_special

SPACE = "\u2581"  # ▁, SentencePiece's visible space
UNK_PENALTY = 10.0  # an unknown character scores min(log p) - 10 (SentencePiece and HF use the same)
_PLACEHOLDER = "\x00"  # stands for characters outside the alphabet during training
_SCRIPTS = ("Han|Hiragana|Katakana", "Latin", "Greek", "Cyrillic", "Hangul", "Arabic", "Hebrew", "Thai",
            "Devanagari", "Bengali", "Tamil", "Armenian", "Georgian", "Ethiopic")
# training chunks: an optional ▁, then a run of one script's letters (with marks) or a run of "common" characters
_CHUNK = regex.compile(
    SPACE + "?(?:"
    + "|".join("(?:[" + "".join(rf"\p{{Script={s}}}" for s in group.split("|")) + r"ー][\p{M}]*)+"
               for group in _SCRIPTS)
    + r"|(?:[\p{L}][\p{M}]*)+|[^\p{L}\p{M}" + SPACE + r"]+|" + "[\\p{M}]+)|" + SPACE)


def normalize(text: str, nfkc: bool = True, add_dummy_prefix: bool = True) -> str:
    """SentencePiece-style input: NFKC, whitespace runs -> one space, trimmed, a leading space, spaces -> ▁."""
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    text = " ".join(text.split())
    if add_dummy_prefix and text:
        text = " " + text
    return text.replace(" ", SPACE)


def words(normalized: str) -> list[str]:
    """Cut before every ▁ (pieces hold ▁ only at their start, so Viterbi per word equals Viterbi overall)."""
    return [w for w in regex.split("(?=" + SPACE + ")", normalized) if w]


def chunks(normalized: str) -> list[str]:
    """Training chunks: single-script runs, each with its leading ▁ if any."""
    return _CHUNK.findall(normalized)


def digamma(x: np.ndarray) -> np.ndarray:
    """ψ(x) for x > 0: recurrence ψ(x) = ψ(x+1) − 1/x up to x ≥ 10, then the asymptotic series (error < 1e-12)."""
    x = np.asarray(x, dtype=np.float64).copy()
    out = np.zeros_like(x)
    while True:
        small = x < 10
        if not small.any():
            break
        out[small] -= 1.0 / x[small]
        x[small] += 1.0
    inv2 = 1.0 / (x * x)
    return out + np.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 / 240)))


# --- the tokenizer ---------------------------------------------------------------------------------------------
@dataclass
class Lattice:
    """Edges (start, end, piece id, score) over positions 0..n of one string."""

    n: int
    edges: list[tuple[int, int, int, float]] = field(default_factory=list)

    def ending_at(self) -> list[list[tuple[int, int, int, float]]]:
        by_end: list[list[tuple[int, int, int, float]]] = [[] for _ in range(self.n + 1)]
        for e in self.edges:
            by_end[e[1]].append(e)
        return by_end


class UnigramTokenizer:
    """Pieces with log-probabilities; ids: the special tokens first (<unk>, <s>, </s>), then the pieces.

    Interface as `interface.Tokenizer` (encode without specials unless allowed, decode, special ids, save/load as
    an HF `tokenizer.json` that the `tokenizers` library reads) plus `viterbi`, `nbest`, `sample`, `log_prob`."""

    def __init__(self, pieces: Sequence[tuple[str, float]], unk_token: str = "<unk>",
                 special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>"), nfkc: bool = True,
                 add_dummy_prefix: bool = True, bos_token: str | None = "<s>", eos_token: str | None = "</s>",
                 pad_token: str | None = None, add_bos_token: bool = False, chat_template: str | None = None,
                 max_piece_length: int | None = None) -> None:
        if unk_token not in special_tokens:
            raise ValueError(f"unk_token={unk_token!r} must be one of the special tokens {list(special_tokens)}")
        self.pieces = [p for p, _ in pieces]
        self.scores = [float(s) for _, s in pieces]
        if len(set(self.pieces)) != len(self.pieces):
            raise ValueError("a piece appears twice in the vocabulary")
        bad = [p for p in self.pieces if not p or p in special_tokens]
        if bad:
            raise ValueError(f"pieces {bad[:5]!r} are empty or special tokens")
        bad = [s for s in self.scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"piece scores must be finite log-probabilities, got {bad[:5]}")
        self._special = {t: i for i, t in enumerate(special_tokens)}
        base = len(special_tokens)
        self.piece_to_id = {p: base + i for i, p in enumerate(self.pieces)}
        self._score_of = dict(zip(self.pieces, self.scores))
        self.id_to_piece = {i: p for p, i in self.piece_to_id.items()} | {i: t for t, i in self._special.items()}
        self.unk_token = unk_token
        self.nfkc, self.add_dummy_prefix = nfkc, add_dummy_prefix
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if tok is not None and tok not in self._special:
                raise ValueError(f"{name}={tok!r} is not among the special tokens")
        self.add_bos_token, self.chat_template = add_bos_token, chat_template
        self.min_score = min(self.scores, default=0.0)
        self.max_len = max_piece_length or max((len(p) for p in self.pieces), default=1)
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._viterbi_ids)

    # --- interface -----------------------------------------------------------------------------------------
    @property
    def special_tokens(self) -> Mapping[str, int]:
        return dict(self._special)

    @property
    def vocab_size(self) -> int:
        return len(self._special) + len(self.pieces)

    def _id(self, tok: str | None) -> int | None:
        return None if tok is None else self._special[tok]

    @property
    def unk_token_id(self) -> int:
        return self._special[self.unk_token]

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    def score(self, piece_id: int) -> float:
        """log p of a piece id (<unk>: min − 10)."""
        p = self.id_to_piece[piece_id]
        return self._score_of.get(p, self.min_score - UNK_PENALTY)

    # --- lattice and segmentation ---------------------------------------------------------------------------
    def lattice(self, text: str) -> Lattice:
        """Every vocabulary piece at every position of `text` (normalised already), plus an <unk> edge over any
        character no piece starts with."""
        lat = Lattice(len(text))
        get, unk = self._score_of.get, self.unk_token_id
        for i in range(len(text)):
            single = False
            for j in range(i + 1, min(len(text), i + self.max_len) + 1):
                s = get(text[i:j])
                if s is not None:
                    lat.edges.append((i, j, self.piece_to_id[text[i:j]], s))
                    single |= j == i + 1
            if not single and text[i] not in self._score_of:
                lat.edges.append((i, i + 1, unk, self.min_score - UNK_PENALTY))
        return lat

    def viterbi(self, text: str) -> tuple[list[int], float]:
        """Best segmentation of `text` (already normalised): (ids, Σ log p), unknown characters fused."""
        n = len(text)
        best = [0.0] + [-math.inf] * n
        back: list[tuple[int, int]] = [(0, -1)] * (n + 1)
        for i, j, pid, s in sorted(self.lattice(text).edges, key=lambda e: (e[1], e[0])):
            if best[i] + s > best[j]:
                best[j], back[j] = best[i] + s, (i, pid)
        ids, j = [], n
        while j > 0:
            i, pid = back[j]
            ids.append(pid)
            j = i
        ids.reverse()
        return self._fuse_unk(ids), best[n]

    def _fuse_unk(self, ids: list[int]) -> list[int]:
        unk = self.unk_token_id
        return [t for k, t in enumerate(ids) if not (t == unk and k > 0 and ids[k - 1] == unk)]

    def _viterbi_ids(self, word: str) -> tuple[int, ...]:
        return tuple(self.viterbi(word)[0])

    def nbest(self, text: str, k: int) -> list[tuple[list[int], float]]:
        """The k most probable segmentations of `text` (normalised), best first: best-first search from the end
        with the Viterbi forward scores as an exact heuristic (A*)."""
        if k < 1:
            raise ValueError(f"nbest k={k} must be >= 1")
        n, by_end = len(text), self.lattice(text).ending_at()
        fwd = [0.0] + [-math.inf] * n
        for j in range(1, n + 1):
            fwd[j] = max((fwd[i] + s for i, _, _, s in by_end[j]), default=-math.inf)
        out: list[tuple[list[int], float]] = []
        heap: list[tuple[float, float, int, tuple[int, ...]]] = [(-fwd[n], 0.0, n, ())]
        while heap and len(out) < k:
            _, suffix, j, ids = heapq.heappop(heap)
            if j == 0:
                out.append((list(ids), suffix))
                continue
            for i, _, pid, s in by_end[j]:
                heapq.heappush(heap, (-(fwd[i] + s + suffix), suffix + s, i, (pid, *ids)))
        return out

    def log_prob(self, text: str) -> float:
        """log Σ over all segmentations of `text` (normalised) of P(x): the forward algorithm."""
        return self.forward_backward_naive(text)[0]

    def forward_backward_naive(self, text: str) -> tuple[float, dict[int, float]]:
        """(log Z, expected count of each piece id) over the segmentations of one string: the reference for the
        vectorised E-step."""
        n, lat = len(text), self.lattice(text)
        fwd = [0.0] + [-math.inf] * n
        bwd = [-math.inf] * n + [0.0]
        for i, j, _, s in sorted(lat.edges, key=lambda e: e[1]):
            fwd[j] = np.logaddexp(fwd[j], fwd[i] + s)
        for i, j, _, s in sorted(lat.edges, key=lambda e: -e[0]):
            bwd[i] = np.logaddexp(bwd[i], s + bwd[j])
        counts: dict[int, float] = {}
        for i, j, pid, s in lat.edges:
            counts[pid] = counts.get(pid, 0.0) + math.exp(fwd[i] + s + bwd[j] - fwd[n])
        return float(fwd[n]), counts

    def sample(self, text: str, alpha: float = 0.1, rng: random.Random | None = None) -> list[int]:
        """One segmentation of `text` (normalised) drawn with probability ∝ P(x)^alpha (subword regularisation):
        forward-filtering with scores alpha·log p, then backward sampling of the edge into each node."""
        if alpha <= 0:
            raise ValueError(f"alpha={alpha} must be > 0")
        rng = rng or random.Random()
        n, by_end = len(text), self.lattice(text).ending_at()
        fwd = [0.0] + [-math.inf] * n
        for j in range(1, n + 1):
            fwd[j] = float(np.logaddexp.reduce([fwd[i] + alpha * s for i, _, _, s in by_end[j]]))
        ids, j = [], n
        while j > 0:
            logits = [fwd[i] + alpha * s for i, _, _, s in by_end[j]]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            i, _, pid, _ = rng.choices(by_end[j], weights)[0]
            ids.append(pid)
            j = i
        ids.reverse()
        return self._fuse_unk(ids)

    # --- encoding -------------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        return normalize(text, self.nfkc, self.add_dummy_prefix)

    def encode_ordinary(self, text: str, alpha: float | None = None, rng: random.Random | None = None) -> list[int]:
        """Ids of `text` with no special-token matching; `alpha` draws a sampled segmentation instead of Viterbi."""
        ids: list[int] = []
        for w in words(self.normalize(text)):
            ids += self._word_ids(w) if alpha is None else self.sample(w, alpha, rng)
        return ids

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = (),
               add_special_tokens: bool = False) -> list[int]:
        """Token ids (Viterbi). Special tokens are recognised only when allowed; `add_special_tokens` prepends
        <s> when `add_bos_token` is set."""
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        for piece, special in split_special(text, allowed_special, self._special):
            ids += self.encode_ordinary(piece) if special is None else [special]
        return ids

    def tokenize(self, text: str) -> list[str]:
        return [self.id_to_piece[i] for i in self.encode_ordinary(text)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Pieces joined, ▁ -> space, the dummy-prefix space dropped; <unk> reads " ⁇ " as in SentencePiece."""
        out = []
        for i in ids:
            if i not in self.id_to_piece:
                raise ValueError(f"unknown token id {i!r}")
            if i in self._special.values():
                if i == self.unk_token_id:
                    out.append(" \u2047 ")
                elif not skip_special_tokens:
                    out.append(self.id_to_piece[i])
            else:
                out.append(self.id_to_piece[i].replace(SPACE, " "))
        text = "".join(out)
        return text[1:] if self.add_dummy_prefix and text.startswith(" ") else text

    # --- files ----------------------------------------------------------------------------------------------
    def to_hf_json(self) -> dict[str, Any]:
        """HF `tokenizers` serialization: NFKC + whitespace squeeze, Metaspace, Unigram model, Metaspace decoder."""
        norm: list[dict[str, Any]] = [{"type": "NFKC"}] if self.nfkc else []
        norm += [{"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Strip", "strip_left": True,
                                                                                     "strip_right": True}]
        scheme = "always" if self.add_dummy_prefix else "never"
        meta = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme, "split": True}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                  "special": True} for t, i in self._special.items()]
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": norm}, "pre_tokenizer": meta,
                "post_processor": None, "decoder": meta,
                "model": {"type": "Unigram", "unk_id": self.unk_token_id, "byte_fallback": False,
                          "vocab": [[t, 0.0] for t in self._special] + [[p, s] for p, s in zip(self.pieces,
                                                                                           self.scores)]}}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (together, atomically); `load` and HF read them."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": self.unk_token,
                  "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "add_bos_token": self.add_bos_token, "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return atomic_write_files(directory, {  # both files change together
            "tokenizer.json": json.dumps(self.to_hf_json(), ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> UnigramTokenizer:
        """A directory written by `save` (or its tokenizer.json). Raises ValueError for other Unigram files."""
        from tinyllm.tokenizer.bpe_io import read_tokenizer_config, token_text

        path = Path(path)
        file, directory = (path, path.parent) if path.is_file() else (path / "tokenizer.json", path)
        spec = json.loads(file.read_text(encoding="utf-8"))
        model = spec.get("model") or {}
        if model.get("type") != "Unigram" or model.get("byte_fallback"):
            raise ValueError(f"{file}: model type {model.get('type')!r} is not a Unigram without byte fallback")
        norms = [n.get("type") for n in (spec.get("normalizer") or {}).get("normalizers", [])]
        if norms not in (["NFKC", "Replace", "Strip"], ["Replace", "Strip"]):
            raise ValueError(f"{file}: normalizer {norms} is not the one this tokenizer writes")
        meta = spec.get("pre_tokenizer") or {}
        if meta.get("type") != "Metaspace":
            raise ValueError(f"{file}: pre-tokenizer {meta.get('type')!r} is not Metaspace")
        specials = [t["content"] for t in sorted(spec.get("added_tokens", []), key=lambda t: t["id"])]
        vocab = model["vocab"]
        if [p for p, _ in vocab[:len(specials)]] != specials:
            raise ValueError(f"{file}: the special tokens must come first in the vocabulary")
        cfg = read_tokenizer_config(directory)

        def special(key: str) -> str | None:
            value = token_text(cfg.get(key))
            return value if value in specials else None

        return cls([(p, s) for p, s in vocab[len(specials):]], unk_token=specials[model.get("unk_id", 0)],
                   special_tokens=specials, nfkc=norms[0] == "NFKC",
                   add_dummy_prefix=meta.get("prepend_scheme", "always") != "never", bos_token=special("bos_token"),
                   eos_token=special("eos_token"), pad_token=special("pad_token"),
                   add_bos_token=bool(cfg.get("add_bos_token", False)), chat_template=cfg.get("chat_template"))
