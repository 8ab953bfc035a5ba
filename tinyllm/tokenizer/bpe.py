"""Byte-level BPE: training, encoding, decoding, vocabulary import and HF export (notes ch.02.4 a/b).

Byte pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units") starts
from single symbols and repeatedly merges the most frequent adjacent pair. Byte-level BPE (GPT-2, Radford et al.
2019) starts from the 256 byte values, so any string -- Chinese, emoji, binary junk -- encodes without an unknown
token and decodes back exactly. Text is first cut into chunks by a regex (`pretokenize.py`); merges never cross
a chunk.

Training (`train_bpe`) is incremental: a table of chunk types with their frequencies, pair counts weighted by
frequency, and an index pair -> chunk types containing it. A merge rewrites only the chunk types in its index
entry and adjusts the counts of the pairs they lose and gain; the best pair comes from a max-heap with lazy
invalidation (an entry whose count is stale is re-pushed with the true count when it surfaces). Tie-break, in
both trainers: highest count, then the lexicographically smallest (left bytes, right bytes). `train_bpe_naive`
recounts every pair each step and is kept as the oracle the tests compare against.

Encoding applies merges by rank inside each chunk: merge the adjacent pair with the lowest rank, leftmost first,
until none applies (the note's longest-token-first replacement differs -- see `encode_longest_first`). Two rank
semantics exist and both are implemented:
- "merges" (GPT-2, HF `tokenizers`, our trainer): a pair may merge only if it is in the merge list; rank = position.
- "ranks" (tiktoken: cl100k, Qwen): any pair whose concatenated bytes is a token may merge; rank = that token's id,
  and a chunk that is itself a token is emitted whole.

Covered: training, encode/decode with special tokens, tiktoken rank files, the GPT-2-style vocab inside GGUF files,
HF `tokenizer.json` export and import (ByteLevel BPE only). Not covered: BPE-dropout, SentencePiece BPE (▁ and
byte fallback), WordPiece/Unigram (separate modules).
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import regex

from tinyllm.tokenizer.pretokenize import (
    DEFAULT_PATTERN,
    LLAMA3_PATTERN,
    compile_pattern,
    resolve_pattern,
    to_oniguruma,
)

Pair = tuple[int, int]


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


def pair_counts(words: Mapping[tuple[Hashable, ...], int] | Iterable[Sequence[Hashable]]) -> Counter:
    """Adjacent-pair counts weighted by word frequency, in first-seen order (so `most_common` breaks ties the
    way the note's `collections.Counter` code does). `words` maps symbol tuples to frequencies, or is a
    sequence of symbol sequences (each occurrence counts once)."""
    items = words.items() if isinstance(words, Mapping) else ((tuple(w), 1) for w in words)
    counts: Counter = Counter()
    for symbols, freq in items:
        for pair in pairwise(symbols):
            counts[pair] += freq
    return counts


def _merge_word(symbols: tuple[int, ...], a: int, b: int, new: int) -> tuple[int, ...]:
    """Replace each non-overlapping occurrence of (a, b), left to right, with `new`."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == a and symbols[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _merge_with_deltas(symbols: list[int], a: int, b: int, new: int) -> tuple[list[int], list[tuple[Pair, int]]]:
    """`_merge_word` plus the pair-count changes it causes, found only around the merged positions: each
    occurrence removes (left, a), (a, b), (b, right) and adds (left, new), (new, right); two adjacent
    occurrences share one neighbour, which becomes (new, new). `list.index` skips to candidates at C speed."""
    out: list[int] = []
    deltas: list[tuple[Pair, int]] = []
    n, i, start, prev_end = len(symbols), 0, 0, -1
    while True:
        try:
            i = symbols.index(a, i)
        except ValueError:
            break
        if i + 1 >= n:
            break
        if symbols[i + 1] != b:
            i += 1
            continue
        out.extend(symbols[start:i])
        if i > 0:
            if prev_end == i:  # (b, a) between the two occurrences was already removed
                deltas.append(((new, new), 1))
            else:
                deltas += [((symbols[i - 1], a), -1), ((symbols[i - 1], new), 1)]
        deltas.append(((a, b), -1))
        if i + 2 < n:
            right = symbols[i + 2]
            if right == a and i + 3 < n and symbols[i + 3] == b:
                deltas.append(((b, a), -1))
            else:
                deltas += [((b, right), -1), ((new, right), 1)]
        out.append(new)
        i = start = prev_end = i + 2
    out.extend(symbols[start:])
    return out, deltas


class _Vocab:
    """Growing id <-> bytes table for the trainers; a merge whose bytes already exist reuses that id."""

    def __init__(self) -> None:
        self.tokens: list[bytes] = [bytes([b]) for b in range(256)]
        self.index: dict[bytes, int] = {t: i for i, t in enumerate(self.tokens)}

    def add(self, data: bytes) -> int:
        if data not in self.index:
            self.index[data] = len(self.tokens)
            self.tokens.append(data)
        return self.index[data]


def _chunk_types(texts: Iterable[str], pattern: str) -> Counter:
    rx = compile_pattern(pattern)
    types: Counter = Counter()
    for text in texts:
        types.update(rx.findall(text))
    return types


def train_merges(types: Mapping[bytes, int], num_tokens: int, min_frequency: int = 2,
                 show_progress: bool = False) -> tuple[list[bytes], list[Pair]]:
    """Incremental BPE on chunk types (bytes -> frequency) until the vocab holds `num_tokens` tokens or no pair
    occurs `min_frequency` times. Returns (tokens by id, merges in order)."""
    from tqdm.auto import tqdm

    vocab = _Vocab()
    tok = vocab.tokens
    words = [list(w) for w in types]
    freqs = list(types.values())
    counts: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = {}
    for w, symbols in enumerate(words):
        for p in pairwise(symbols):
            counts[p] = counts.get(p, 0) + freqs[w]
            where.setdefault(p, set()).add(w)
    # heap entries are upper bounds of the true count; the key orders by count desc, then bytes asc
    heap = [(-c, tok[a], tok[b], a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    bar = tqdm(total=max(num_tokens - len(tok), 0), disable=not show_progress, desc="bpe merges")
    while len(tok) < num_tokens and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        c = counts.get((a, b), 0)
        if c != -neg:  # stale: the pair lost occurrences since this entry was pushed
            if c > 0:
                heapq.heappush(heap, (-c, tok[a], tok[b], a, b))
            continue
        if c < min_frequency:
            break
        size = len(tok)
        new = vocab.add(tok[a] + tok[b])
        merges.append((a, b))
        gained: set[Pair] = set()
        # the index may list words that lost the pair already (entries are never removed): they yield no deltas
        for w in where.pop((a, b)):
            merged, deltas = _merge_with_deltas(words[w], a, b, new)
            if not deltas:
                continue
            f = freqs[w]
            for p, d in deltas:
                counts[p] = counts.get(p, 0) + d * f
                if d > 0:  # only pairs touching the new symbol gain occurrences
                    where.setdefault(p, set()).add(w)
                    gained.add(p)
            words[w] = merged
        del counts[(a, b)]
        for p in gained:
            heapq.heappush(heap, (-counts[p], tok[p[0]], tok[p[1]], p[0], p[1]))
        bar.update(len(tok) - size)
    bar.close()
    return tok, merges


def train_merges_naive(types: Mapping[bytes, int], num_tokens: int,
                       min_frequency: int = 2) -> tuple[list[bytes], list[Pair]]:
    """The oracle: recount every pair after every merge. Same contract and tie-break as `train_merges`."""
    vocab = _Vocab()
    tok = vocab.tokens
    words = {tuple(w): f for w, f in types.items()}
    merges: list[Pair] = []
    while len(tok) < num_tokens:
        counts = pair_counts(words)
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], tok[p[0]], tok[p[1]]))
        if counts[(a, b)] < min_frequency:
            break
        new = vocab.add(tok[a] + tok[b])
        merges.append((a, b))
        merged: dict[tuple[int, ...], int] = {}
        for w, f in words.items():
            m = _merge_word(w, a, b, new)
            merged[m] = merged.get(m, 0) + f
        words = merged
    return tok, merges


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = DEFAULT_PATTERN,
              special_tokens: Sequence[str] = (), min_frequency: int = 2, show_progress: bool = True,
              algorithm: Literal["incremental", "naive"] = "incremental", **tokenizer_kwargs: Any) -> BPETokenizer:
    """Train a byte-level BPE tokenizer.

    Ids: 0..255 are the bytes, then merged tokens in merge order, then `special_tokens` in the given order.
    `vocab_size` counts all three; training stops earlier when no pair reaches `min_frequency`.
    `tokenizer_kwargs` go to `BPETokenizer` (bos_token, eos_token, pad_token, chat_template).
    """
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"duplicate special tokens in {list(special_tokens)!r}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for 256 bytes + {len(special_tokens)} specials")
    if algorithm not in ("incremental", "naive"):
        raise ValueError(f"unknown algorithm {algorithm!r}; use 'incremental' or 'naive'")
    types = _chunk_types(texts, pattern)
    byte_types: Counter = Counter()
    for chunk, f in types.items():
        byte_types[chunk.encode("utf-8")] += f
    num_tokens = vocab_size - len(special_tokens)
    if algorithm == "naive":
        tokens, merges = train_merges_naive(byte_types, num_tokens, min_frequency)
    else:
        tokens, merges = train_merges(byte_types, num_tokens, min_frequency, show_progress)
    specials = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
    return BPETokenizer(dict(enumerate(tokens)), merges, specials, pattern=pattern, **tokenizer_kwargs)


class BPETokenizer:
    """A byte-level BPE vocabulary with its merge rule, pre-tokenizer and special tokens.

    `tokens` maps id -> bytes for ordinary tokens; `merges` lists (left id, right id) in rank order (mode
    "merges"), or is None in mode "ranks" (tiktoken semantics, rank = id; merges are derived when exporting).
    """

    def __init__(self, tokens: Mapping[int, bytes], merges: Sequence[Pair] | None,
                 special_tokens: Mapping[str, int] | None = None, pattern: str = DEFAULT_PATTERN,
                 mode: Literal["merges", "ranks"] = "merges", normalization: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, cache_size: int = 1 << 16) -> None:
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
        self.chat_template = chat_template
        for name in (bos_token, eos_token, pad_token):
            if name is not None and name not in self.special_tokens:
                raise ValueError(f"bos/eos/pad token {name!r} is not among the special tokens")
        self._merges = None if merges is None else [tuple(p) for p in merges]
        self._byte_ids = [self.encoder.get(bytes([b]), -1) for b in range(256)]
        self._single = [bytes([b]) for b in range(256)]
        if self._merges is not None:
            self._rank = {p: r for r, p in enumerate(self._merges)}
            self._merged = {p: self.encoder[self.tokens[p[0]] + self.tokens[p[1]]] for p in self._merges}
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
            self._merges = _merges_from_ranks(self.encoder)
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
        parts = [self._byte_ids[b] for b in data]
        rank, merged, inf = self._rank, self._merged, 1 << 62
        ranks = [rank.get(p, inf) for p in pairwise(parts)]
        # merge the lowest-rank adjacent pair (leftmost on ties) and re-rank only its two neighbours
        while ranks:
            best = min(ranks)
            if best == inf:
                break
            i = ranks.index(best)
            parts[i : i + 2] = [merged[(parts[i], parts[i + 1])]]
            del ranks[i]
            if i < len(ranks):
                ranks[i] = rank.get((parts[i], parts[i + 1]), inf)
            if i > 0:
                ranks[i - 1] = rank.get((parts[i - 1], parts[i]), inf)
        return tuple(parts)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating every character as text (special-token spellings are split like any text)."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        ids: list[int] = []
        for chunk in self._rx.findall(text):
            ids.extend(self._chunk_ids(chunk))
        return ids

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        """Token ids of `text`. Special tokens are recognised only when listed in `allowed_special` (or "all");
        otherwise their spelling is encoded as ordinary text."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)!r}")
        if not allowed:
            return self.encode_ordinary(text)
        splitter = regex.compile("|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for m in splitter.finditer(text):
            ids.extend(self.encode_ordinary(text[start : m.start()]))
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids.extend(self.encode_ordinary(text[start:]))
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

    # --- import --------------------------------------------------------------------------------------------
    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, pattern: str, special_tokens: Mapping[str, int] | None = None,
                      **kwargs: Any) -> BPETokenizer:
        """Load a tiktoken rank file (one `base64(token) rank` per line); ranks are the ids."""
        tokens: dict[int, bytes] = {}
        for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                b64, rank = line.split()
                tokens[int(rank)] = base64.b64decode(b64, validate=True)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a tiktoken rank line: {line[:60]!r}") from e
        return cls(tokens, None, special_tokens, pattern=pattern, mode="ranks", **kwargs)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> BPETokenizer:
        """The GPT-2-style vocabulary and merges a GGUF file carries (`tokenizer.ggml.model == "gpt2"`)."""
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields

        def get(key: str, default: Any = None) -> Any:
            return fields[key].contents() if key in fields else default

        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {get('tokenizer.ggml.model')!r}, not a byte-level "
                             "BPE ('gpt2')")
        names, kinds = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type") or []
        tokens, specials = {}, {}
        for i, (name, kind) in enumerate(zip(names, kinds or [1] * len(names))):
            if kind in (3, 4):  # control / user-defined: matched whole in text
                specials[name] = i
            else:
                tokens[i] = _unspell(name)
        encoder = {t: i for i, t in tokens.items()}
        merges = []
        for line in get("tokenizer.ggml.merges"):
            left, right = line.split(" ")
            merges.append((encoder[_unspell(left)], encoder[_unspell(right)]))
        pre = get("tokenizer.ggml.pre")
        pattern = {"qwen2": "qwen", "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN}.get(pre, "gpt2")

        def special(key: str) -> str | None:
            tid = get(f"tokenizer.ggml.{key}_token_id")
            return names[tid] if tid is not None and names[tid] in specials else None

        return cls(tokens, merges, specials, pattern=pattern, bos_token=special("bos"),
                   eos_token=special("eos"), pad_token=special("padding"),
                   chat_template=get("tokenizer.chat_template"))

    # --- export --------------------------------------------------------------------------------------------
    def to_hf_json(self) -> dict[str, Any]:
        """The HF `tokenizers` serialization: Split(our regex) + ByteLevel pre-tokenizer, BPE model, ByteLevel
        decoder. Tiktoken semantics map to `ignore_merges` (a chunk that is a token is emitted whole)."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}
                             for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])],
            "normalizer": {"type": self.normalization} if self.normalization else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": to_oniguruma(self.pattern)}, "behavior": "Isolated",
                 "invert": False}, byte_level]},
            "post_processor": None,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.mode == "ranks",
                      "vocab": {_spell(t): i for i, t in sorted(self.tokens.items())},
                      "merges": [[_spell(self.tokens[a]), _spell(self.tokens[b])] for a, b in self.merges]},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` (loadable by HF `tokenizers` and transformers'
        AutoTokenizer, and by `BPETokenizer.load`). Each file is written to a temp name, then renamed."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": None,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": 1 << 30}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        for name, obj in (("tokenizer.json", self.to_hf_json()), ("tokenizer_config.json", config)):
            tmp = out / f".{name}.tmp"
            tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
            tmp.replace(out / name)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BPETokenizer:
        """Read a ByteLevel-BPE `tokenizer.json` (ours, or an HF one with a Split and/or ByteLevel pre-tokenizer)
        and its `tokenizer_config.json` when present."""
        path = Path(directory)
        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE")
        tokens = {i: _unspell(t) for t, i in model["vocab"].items()}
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["id"] not in tokens}
        pattern = _pattern_of(spec.get("pre_tokenizer"), path)
        norm = (spec.get("normalizer") or {}).get("type")
        if norm not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise ValueError(f"{path}: normalizer {norm!r} is not supported")
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}

        def special(key: str) -> str | None:
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return value if value in specials else None

        kwargs = dict(pattern=pattern, normalization=norm, bos_token=special("bos_token"),
                      eos_token=special("eos_token"), pad_token=special("pad_token"),
                      chat_template=cfg.get("chat_template"))
        if model.get("ignore_merges"):  # a tiktoken vocabulary exported by us or by HF's converter
            return cls(tokens, None, specials, mode="ranks", **kwargs)
        encoder = {t: i for i, t in tokens.items()}
        merges = []
        for m in model["merges"]:
            left, right = m.split(" ") if isinstance(m, str) else m
            merges.append((encoder[_unspell(left)], encoder[_unspell(right)]))
        return cls(tokens, merges, specials, **kwargs)


def _pattern_of(pre: Mapping[str, Any] | None, path: Path) -> str:
    """The chunking regex an HF pre-tokenizer spec stands for (Split with a regex, or ByteLevel's GPT-2 regex)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    split = [s for s in steps if s.get("type") == "Split"]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    other = [s["type"] for s in steps if s.get("type") not in ("Split", "ByteLevel")]
    if other or len(levels) != 1 or len(split) > 1 or levels[0].get("add_prefix_space"):
        raise ValueError(f"{path}: pre-tokenizer {[s.get('type') for s in steps]} is not a ByteLevel BPE we read")
    if split:
        if "Regex" not in split[0]["pattern"] or split[0].get("invert") or split[0].get("behavior") != "Isolated":
            raise ValueError(f"{path}: Split pre-tokenizer {split[0]!r} is not an isolated regex split")
        return split[0]["pattern"]["Regex"]
    if not levels[0].get("use_regex", True):
        raise ValueError(f"{path}: ByteLevel without a regex has no chunking rule we read")
    return "gpt2"


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


def _merges_from_ranks(encoder: Mapping[bytes, int]) -> list[Pair]:
    """Recover the merge list of a tiktoken vocabulary: the merge that creates token t (rank r) is the last step
    of BPE on t's bytes restricted to ranks < r, which must leave exactly two parts. When only one split of t
    into two lower-ranked tokens exists, that split is the answer without running BPE."""
    merges: list[tuple[int, Pair]] = []
    get = encoder.get
    for token, r in encoder.items():
        if len(token) < 2:
            continue
        splits = [(token[:k], token[k:]) for k in range(1, len(token))
                  if get(token[:k], r) < r and get(token[k:], r) < r]
        if len(splits) != 1:
            parts = _rank_merge([bytes([b]) for b in token], encoder, max_rank=r)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {r}) is not reachable by merging two lower-ranked tokens")
            splits = [tuple(parts)]
        left, right = splits[0]
        merges.append((r, (encoder[left], encoder[right])))
    merges.sort()
    return [p for _, p in merges]
