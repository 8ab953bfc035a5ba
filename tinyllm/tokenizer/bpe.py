"""Byte-level BPE: training, encoding, decoding, vocabulary import and HF export (notes ch.02.4 a/b).

Byte pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units") starts
from single symbols and repeatedly merges the most frequent adjacent pair. Byte-level BPE (GPT-2, Radford et al.
2019) starts from the 256 byte values, so any string -- Chinese, emoji, binary junk -- encodes without an unknown
token and decodes back exactly. Text is first cut into chunks by a regex (`pretokenize.py`); merges never cross
a chunk.

Training lives in `bpe_train.py` (`train_bpe`, re-exported here); files in and out in `bpe_io.py`.

Encoding applies merges by rank inside each chunk: merge the adjacent pair with the lowest rank, leftmost first,
until none applies (the note's longest-token-first replacement differs -- see `encode_longest_first`). Two rank
semantics exist and both are implemented:
- "merges" (GPT-2, HF `tokenizers`, our trainer): a pair may merge only if it is in the merge list; rank = position.
- "ranks" (tiktoken: cl100k, Qwen): any pair whose concatenated bytes is a token may merge; rank = that token's id,
  and a chunk that is itself a token is emitted whole.
Speed: a chunk's ids are cached, and in mode "merges" a chunk starts from its characters' own BPE results
rather than bytes whenever that provably changes nothing (`_partial_char_fragments`).

Covered: training, encode/decode with special tokens, tiktoken rank files, the GPT-2-style vocab inside GGUF files,
HF `tokenizer.json` export and import (ByteLevel BPE only). Not covered: BPE-dropout, SentencePiece BPE (▁ and
byte fallback), WordPiece/Unigram (separate modules).
"""

from __future__ import annotations

import functools
import os
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import regex

from tinyllm.tokenizer.pretokenize import (
    DEFAULT_PATTERN,
    compile_pattern,
    resolve_pattern,
)

Pair = tuple[int, int]
_SHIFT = 24  # the trainer packs a pair of ids into one int: a << 24 | b
_LOW = (1 << _SHIFT) - 1
_INF = 1 << 62  # rank of a pair that never merges


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of bytes: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, NBSP, soft hyphen) are shifted to U+0100 onwards, so every token is a visible string in
    vocab.json/merges.txt and tokenizer.json."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, shift = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shift)
            shift += 1
    return out


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _spell(data: bytes) -> str:
    return data.decode("latin-1").translate(_SPELL)


def _unspell(text: str) -> bytes:
    inverse = _unicode_to_bytes()
    try:
        return bytes([inverse[c] for c in text])
    except KeyError as e:
        raise ValueError(f"token {text!r} is not spelled in the byte-level alphabet") from e


_SPELL = {b: c for b, c in bytes_to_unicode().items()}  # str.translate table: latin-1 code point -> spelling


class BPETokenizer:
    """A byte-level BPE vocabulary with its merge rule, pre-tokenizer and special tokens.

    `tokens` maps id -> bytes for ordinary tokens; `merges` lists (left id, right id) in rank order (mode
    "merges"), or is None in mode "ranks" (tiktoken semantics, rank = id; merges are derived when exporting).
    """

    def __init__(self, tokens: Mapping[int, bytes], merges: Sequence[Pair] | None,
                 special_tokens: Mapping[str, int] | None = None, pattern: str = DEFAULT_PATTERN,
                 mode: Literal["merges", "ranks"] = "merges", normalization: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool = False, cache_size: int = 1 << 16) -> None:
        if mode not in ("merges", "ranks"):
            raise ValueError(f"unknown BPE mode {mode!r}; use 'merges' or 'ranks'")
        if mode == "merges" and merges is None:
            raise ValueError("mode 'merges' needs a merge list")
        self.tokens = dict(tokens)
        self.encoder = {t: i for i, t in self.tokens.items()}
        if len(self.encoder) != len(self.tokens):
            raise ValueError("two ids spell the same bytes; a byte-level vocabulary must be one-to-one")
        # a real vocabulary may lack bytes that never occur in UTF-8 text (0xC0, 0xF5..0xFF, some controls)
        self._missing_bytes = frozenset(b for b in range(256) if bytes([b]) not in self.encoder)
        if len(self._missing_bytes) > 64:
            raise ValueError(f"vocabulary lacks {len(self._missing_bytes)} of the 256 byte tokens; not byte-level")
        self.special_tokens = dict(special_tokens or {})
        clash = set(self.special_tokens.values()) & set(self.tokens)
        if clash:
            raise ValueError(f"special token ids {sorted(clash)[:8]} are also ordinary token ids")
        self.mode, self.pattern, self.normalization = mode, resolve_pattern(pattern), normalization
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template, self.add_bos_token = chat_template, add_bos_token
        for name in (bos_token, eos_token, pad_token):
            if name is not None and name not in self.special_tokens:
                raise ValueError(f"bos/eos/pad token {name!r} is not among the special tokens")
        self._merges = None if merges is None else [tuple(p) for p in merges]
        self._byte_ids = [self.encoder.get(bytes([b]), -1) for b in range(256)]
        self._single = [bytes([b]) for b in range(256)]
        if self._merges is not None:
            # pair (a, b) -> rank as one int key a << 24 | b; the token a merge creates, by rank
            self._rank = {a << _SHIFT | b: r for r, (a, b) in enumerate(self._merges)}
            self._merged = [self.encoder[self.tokens[a] + self.tokens[b]] for a, b in self._merges]
            self._unsafe = _partial_char_fragments(self.tokens, self._merges, self._merged)
            self._char_parts = _CharParts(self)
        self._decoder = {**self.tokens, **{i: s.encode("utf-8") for s, i in self.special_tokens.items()}}
        self._rx = compile_pattern(self.pattern)
        self._chunk_ids = functools.lru_cache(maxsize=cache_size)(self._bpe)

    # --- interface -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: one past the largest id (ordinary or special)."""
        return max([*self.tokens, *self.special_tokens.values()]) + 1

    def _special_id(self, name: str | None) -> int | None:
        return None if name is None else self.special_tokens[name]

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id(self.pad_token)

    @property
    def merges(self) -> list[Pair]:
        """Merge list in rank order; for a tiktoken vocabulary, derived (as HF's converter does) on first use."""
        if self._merges is None:
            from tinyllm.tokenizer.bpe_io import merges_from_ranks

            self._merges = merges_from_ranks(self.encoder)
        return self._merges

    # --- encoding ------------------------------------------------------------------------------------------
    def _bpe(self, chunk: str) -> tuple[int, ...]:
        data = chunk.encode("utf-8")
        if self._missing_bytes:
            self._check_bytes(data)
        if self.mode == "ranks":
            whole = self.encoder.get(data)
            if whole is not None:
                return (whole,)
            return tuple(self.encoder[p] for p in _rank_merge([self._single[b] for b in data], self.encoder))
        if self._unsafe is None:
            parts = [self._byte_ids[b] for b in data]
        else:  # start from each character's own merges (exact, see _partial_char_fragments)
            table = self._char_parts
            parts = [t for ch in chunk for t in table[ch]]
        return self._merge_ranked(parts)

    def _merge_ranked(self, parts: list[int]) -> tuple[int, ...]:
        rank, merged, inf = self._rank, self._merged, _INF
        ranks = [rank.get(x << _SHIFT | y, inf) for x, y in pairwise(parts)]
        # merge the lowest-rank adjacent pair (leftmost on ties) and re-rank only its two neighbours
        while ranks:
            best = min(ranks)
            if best == inf:
                break
            i = ranks.index(best)
            parts[i] = merged[best]
            del parts[i + 1], ranks[i]
            if i < len(ranks):
                ranks[i] = rank.get(parts[i] << _SHIFT | parts[i + 1], inf)
            if i > 0:
                ranks[i - 1] = rank.get(parts[i - 1] << _SHIFT | parts[i], inf)
        return tuple(parts)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating every character as text (special-token spellings are split like any text)."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        ids: list[int] = []
        for chunk in self._rx.findall(text):
            ids.extend(self._chunk_ids(chunk))
        return ids

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = (),
               add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens are recognised only when listed in `allowed_special` (or "all");
        otherwise their spelling is encoded as ordinary text. `add_special_tokens` prepends BOS when the
        vocabulary asks for it (`add_bos_token`, as transformers does)."""
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        for piece, special in split_special(text, allowed_special, self.special_tokens):
            if special is None:
                ids += self.encode_ordinary(piece)
            else:
                ids.append(special)
        return ids

    def _check_bytes(self, data: bytes) -> None:
        bad = self._missing_bytes.intersection(data)
        if bad:
            raise ValueError(f"bytes {sorted(bad)} have no token in this vocabulary")

    def ids_of_bytes(self, data: bytes) -> list[int]:
        """One byte token per byte, no merges: every byte string is representable (in a full byte alphabet)."""
        if self._missing_bytes:
            self._check_bytes(data)
        return [self._byte_ids[b] for b in data]

    def encode_longest_first(self, word: str) -> list[int]:
        """The note's encoder: greedily take the longest vocabulary token at each position. Differs from
        rank-based BPE in general (kept to show the difference, not used by `encode`)."""
        data, out, i = word.encode("utf-8"), [], 0
        longest = max(len(t) for t in self.tokens.values())
        while i < len(data):
            for n in range(min(longest, len(data) - i), 0, -1):
                tid = self.encoder.get(data[i : i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
        return out

    # --- decoding ------------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self._decoder[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"unknown token id {e.args[0]!r}") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Bytes of all tokens joined, then UTF-8 decoded; a sequence cut inside a character gives U+FFFD."""
        if skip_special_tokens:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- files (bpe_io.py) ---------------------------------------------------------------------------------
    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, pattern: str, special_tokens: Mapping[str, int] | None = None,
                      **kwargs: Any) -> BPETokenizer:
        """Load a tiktoken rank file (one `base64(token) rank` per line); ranks are the ids."""
        from tinyllm.tokenizer import bpe_io

        return bpe_io.from_tiktoken(cls, path, pattern, special_tokens, **kwargs)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> BPETokenizer:
        """The GPT-2-style vocabulary and merges a GGUF file carries (`tokenizer.ggml.model == "gpt2"`)."""
        from tinyllm.tokenizer import bpe_io

        return bpe_io.from_gguf(cls, path)

    def to_hf_json(self) -> dict[str, Any]:
        """The HF `tokenizers` serialization: Split(our regex) + ByteLevel pre-tokenizer, BPE model, ByteLevel
        decoder. Tiktoken semantics map to `ignore_merges` (a chunk that is a token is emitted whole)."""
        from tinyllm.tokenizer import bpe_io

        return bpe_io.to_hf_json(self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` (loadable by HF `tokenizers` and transformers'
        AutoTokenizer, and by `BPETokenizer.load`). The files change together (`tinyllm.atomic`)."""
        from tinyllm.tokenizer import bpe_io

        return bpe_io.save(self, directory)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a ByteLevel-BPE `tokenizer.json` (a directory holding it, or the file) with the
        `tokenizer_config.json` beside it; raises ValueError for anything else (WordPiece, SentencePiece...)."""
        from tinyllm.tokenizer import bpe_io

        return bpe_io.load(cls, path)


def _rank_merge(parts: list[bytes], ranks: Mapping[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """tiktoken's merge rule on byte strings: merge the adjacent pair whose concatenation has the lowest rank
    (below `max_rank` when given), leftmost on ties, until no pair is a token."""
    inf = 1 << 62
    limit = inf if max_rank is None else max_rank
    get = ranks.get
    # a rank at or above the limit counts as "not a token"; min() then sees it as no better than inf
    pair_ranks = [get(x + y, inf) for x, y in pairwise(parts)]
    while pair_ranks:
        best = min(pair_ranks)
        if best >= limit:
            break
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], inf)
        if i > 0:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], inf)
    return parts


@functools.lru_cache(maxsize=64)
def _special_splitter(names: frozenset[str]) -> regex.Pattern:
    # longest first, so "<|im_start|>" wins over a special that is its prefix
    return regex.compile("|".join(regex.escape(s) for s in sorted(names, key=len, reverse=True)))


def split_special(text: str, allowed: Collection[str] | Literal["all"],
                  special_tokens: Mapping[str, int]) -> list[tuple[str, int | None]]:
    """Cut `text` at the allowed special tokens: [(piece, None) for ordinary text, (name, id) for a special]."""
    names = frozenset(special_tokens) if allowed == "all" else frozenset(allowed)
    if not names:
        return [(text, None)]
    unknown = names - special_tokens.keys()
    if unknown:
        raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)!r}")
    out: list[tuple[str, int | None]] = []
    start = 0
    for m in _special_splitter(names).finditer(text):
        if m.start() > start:
            out.append((text[start : m.start()], None))
        out.append((m.group(), special_tokens[m.group()]))
        start = m.end()
    if start < len(text):
        out.append((text[start:], None))
    return out


def _partial_char_fragments(tokens: Mapping[int, bytes], merges: Sequence[Pair],
                            merged: Sequence[int]) -> tuple[dict[bytes, list[int]], dict[bytes, list[int]]] | None:
    """The merges that join a piece of an unfinished UTF-8 character with something outside that character.

    Encoding may start from each character's own BPE result (its bytes merged alone) instead of its bytes when
    no piece of it ever merges across its border: then its pieces evolve exactly as in the character alone, and
    merges of whole characters come later in rank order anyway. The first merge that would cross a character's
    border joins its last piece, a bare suffix of continuation bytes (left part, e.g. "\\x87" + "事"), or its first
    piece, an unfinished prefix (right part, e.g. "，" + the first two bytes of "你"). Returns
    (suffix piece -> ranks, prefix piece -> ranks) of those merges; `_CharParts` replays a character's own merges
    and keeps its bytes when one of its pieces is that piece at that rank. Needs every merge's parts to be made
    by earlier merges (true of trained merge lists); otherwise None: no shortcut."""
    made = {i for i, t in tokens.items() if len(t) == 1}
    for (a, b), new in zip(merges, merged):
        if a not in made or b not in made:
            return None
        made.add(new)
    suffixes: dict[bytes, list[int]] = {}
    prefixes: dict[bytes, list[int]] = {}
    for r, (a, b) in enumerate(merges):
        left, right = tokens[a], tokens[b]
        if (_whole(left) and _whole(right)) or _inside_one_char(left + right):
            continue
        if all(x & 0xC0 == 0x80 for x in left):
            suffixes.setdefault(left, []).append(r)
        if right[0] & 0xC0 != 0x80 and _inside_one_char(right) and not _whole(right):
            prefixes.setdefault(right, []).append(r)
    return suffixes, prefixes


def _whole(t: bytes) -> bool:
    try:
        t.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _inside_one_char(t: bytes) -> bool:
    """t is a piece of one UTF-8 character: no lead byte except possibly the first, no longer than it needs."""
    leads = [k for k, x in enumerate(t) if x & 0xC0 != 0x80]
    if not leads:
        return len(t) <= 3
    if leads != [0]:
        return False
    x = t[0]
    return len(t) <= (1 if x < 0x80 else 2 if x < 0xE0 else 3 if x < 0xF0 else 4)


class _CharParts(dict):
    """character -> its ids after BPE on the character alone (bytes when it holds an unsafe fragment)."""

    def __init__(self, tok: BPETokenizer) -> None:
        super().__init__()
        self.tok = tok

    def __missing__(self, ch: str) -> tuple[int, ...]:
        tok = self.tok
        data = ch.encode("utf-8")
        parts = [tok._byte_ids[b] for b in data]
        self[ch] = out = tuple(parts) if len(data) == 1 or self._crosses(data) else tok._merge_ranked(parts)
        return out

    def _crosses(self, data: bytes) -> bool:
        """Replay the character's own merges: is its last (first) piece ever a crossing merge's left (right) part
        at that merge's rank?"""
        tok = self.tok
        suffixes, prefixes = tok._unsafe
        checks = [(r, -1, p) for p, rs in suffixes.items() if data.endswith(p) for r in rs]
        checks += [(r, 0, p) for p, rs in prefixes.items() if data.startswith(p) for r in rs]
        if not checks:
            return False
        parts = [tok._byte_ids[b] for b in data]
        history = [(-1, list(parts))]  # (rank of the merge, pieces after it)
        while len(parts) > 1:
            ranks = [tok._rank.get(x << _SHIFT | y, _INF) for x, y in pairwise(parts)]
            best = min(ranks)
            if best == _INF:
                break
            i = ranks.index(best)
            parts[i : i + 2] = [tok._merged[best]]
            history.append((best, list(parts)))
        for r, end, piece in checks:
            state = next(ps for rank, ps in reversed(history) if rank < r)
            if tok.tokens[state[end]] == piece:
                return True
        return False


# the trainers live in bpe_train.py; re-exported here for `from tinyllm.tokenizer.bpe import train_bpe`
from tinyllm.tokenizer.bpe_train import pair_counts, train_bpe  # noqa: E402

__all__ = ["BPETokenizer", "bytes_to_unicode", "pair_counts", "split_special", "train_bpe"]
