"""Byte-level BPE vocabularies in and out of files (notes ch.02.4 b; formats: tiktoken rank files, the GGUF
`tokenizer.ggml.*` metadata of llama.cpp, HF `tokenizers`' tokenizer.json).

- tiktoken rank files: one `base64(token) rank` per line; the rank is the id and the merge rule is "ranks"
  (any pair whose concatenation is a token may merge, lowest rank first).
- GGUF: the tokens spelled in GPT-2's byte alphabet, their types (3 = control, 4 = user-defined: matched whole,
  our special tokens) and the merge list. The key/value section is read by a small parser of our own (header,
  then typed key/values; strings are a uint64 length plus UTF-8 bytes), which is much faster than the `gguf`
  package on a 49k-token vocabulary, and the parsed vocabulary is cached per (path, mtime, size).
- tokenizer.json: a Split(regex, isolated) + ByteLevel pre-tokenizer, a BPE model and added tokens, plus
  tokenizer_config.json (special tokens, chat template, add_bos_token). Tiktoken semantics map to the BPE
  model's `ignore_merges`; their merge list is recovered from the ranks as HF's converter does.

Not covered: SentencePiece/Unigram/WordPiece files (`load` raises ValueError; `load_tokenizer` then falls back to
the `tokenizers` shim), big-endian or version-1 GGUF files, post-processor templates (BOS comes from
`add_bos_token`).
"""

from __future__ import annotations

import base64
import functools
import json
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyllm.atomic import atomic_write_files
from tinyllm.tokenizer.bpe import Pair, _rank_merge, _spell, _unspell
from tinyllm.tokenizer.pretokenize import LLAMA3_PATTERN, to_oniguruma

if TYPE_CHECKING:
    from tinyllm.tokenizer.bpe import BPETokenizer

# GGUF value types -> struct codes (GGUFValueType: 8 = string, 9 = array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_PRE = {"qwen2": "qwen", "deepseek-r1-qwen": "qwen", "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN,
             "llama-v3": LLAMA3_PATTERN}


# ------------------------------------------------------------------ tiktoken
def from_tiktoken(cls: type[BPETokenizer], path: str | os.PathLike, pattern: str,
                  special_tokens: Mapping[str, int] | None = None, **kwargs: Any) -> BPETokenizer:
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


def merges_from_ranks(encoder: Mapping[bytes, int]) -> list[Pair]:
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


# ------------------------------------------------------------------ GGUF
def read_gguf_kv(path: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """The key/value metadata of a GGUF file (version 2 or 3, little-endian) whose keys start with `prefix`.
    Strings decode as UTF-8, numeric arrays come back as lists, like `gguf.GGUFReader` field contents."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        pos = 24
        unpack = struct.unpack_from

        def string() -> str:
            nonlocal pos
            (n,) = unpack("<Q", buf, pos)
            pos += 8 + n
            return buf[pos - n : pos].decode("utf-8")

        def value(kind: int, keep: bool) -> Any:
            nonlocal pos
            if kind == 8:
                return string()
            if kind in _SCALAR:
                code = "<" + _SCALAR[kind]
                pos += struct.calcsize(code)
                return unpack(code, buf, pos - struct.calcsize(code))[0]
            if kind != 9:
                raise ValueError(f"{path}: unknown GGUF value type {kind} at byte {pos}")
            inner, count = unpack("<IQ", buf, pos)
            pos += 12
            if inner == 8:
                out = []
                for _ in range(count):  # length-prefixed strings: walk them (only ~0.1 s for 50k)
                    (n,) = unpack("<Q", buf, pos)
                    if keep:
                        out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8"))
                    pos += 8 + n
                return out
            if inner in _SCALAR:
                code = _SCALAR[inner]
                size = struct.calcsize(code) * count
                pos += size
                return list(struct.unpack_from(f"<{count}{code}", buf, pos - size)) if keep else None
            return [value(inner, keep) for _ in range(count)]

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = unpack("<I", buf, pos)
            pos += 4
            keep = key.startswith(prefix)
            v = value(kind, keep)
            if keep:
                meta[key] = v
        return meta


@functools.lru_cache(maxsize=4)
def _gguf_vocab(path: str, mtime_ns: int, size: int) -> tuple[dict[int, bytes], list[Pair], dict[str, int], dict]:
    """Parsed once per file version: (tokens, merges, specials, constructor keywords)."""
    meta = read_gguf_kv(path, "tokenizer.")
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}, not a byte-level "
                         "BPE ('gpt2')")
    names = meta["tokenizer.ggml.tokens"]
    kinds = meta.get("tokenizer.ggml.token_type") or [1] * len(names)
    tokens, specials = {}, {}
    for i, (name, kind) in enumerate(zip(names, kinds)):
        if kind in (3, 4):  # control / user-defined: matched whole in text
            specials[name] = i
        else:
            tokens[i] = _unspell(name)
    encoder = {t: i for i, t in tokens.items()}
    merges = []
    for line in meta.get("tokenizer.ggml.merges", []):
        left, right = line.split(" ")
        merges.append((encoder[_unspell(left)], encoder[_unspell(right)]))

    def special(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        return names[tid] if tid is not None and names[tid] in specials else None

    kwargs = dict(pattern=_GGUF_PRE.get(meta.get("tokenizer.ggml.pre"), "gpt2"), bos_token=special("bos"),
                  eos_token=special("eos"), pad_token=special("padding"),
                  chat_template=meta.get("tokenizer.chat_template"),
                  add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)))
    return tokens, merges, specials, kwargs


def from_gguf(cls: type[BPETokenizer], path: str | os.PathLike) -> BPETokenizer:
    st = os.stat(path)
    tokens, merges, specials, kwargs = _gguf_vocab(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    return cls(tokens, merges, specials, **kwargs)


# ------------------------------------------------------------------ tokenizer.json
def to_hf_json(tok: BPETokenizer) -> dict[str, Any]:
    # an ordinary token spelled like a special one (SmolLM2 has both) cannot be told apart in tokenizer.json,
    # where `tokenizers` matches special tokens in text always: export only the special one
    clash = {i for i, t in tok.tokens.items() if _spell(t) in tok.special_tokens}
    vocab = {_spell(t): i for i, t in sorted(tok.tokens.items()) if i not in clash}
    # special tokens are listed in the model vocabulary too, as HF files do: `tokenizers` otherwise renumbers an
    # added token whose id is below the vocabulary's end (SmolLM2's specials are ids 0-16)
    vocab.update(sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
    merges = [[_spell(tok.tokens[a]), _spell(tok.tokens[b])] for a, b in tok.merges
              if not clash & {a, b, tok.encoder[tok.tokens[a] + tok.tokens[b]]}]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": {"type": tok.normalization} if tok.normalization else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": to_oniguruma(tok.pattern)}, "behavior": "Isolated",
             "invert": False}, byte_level]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tok.mode == "ranks",
                  "vocab": vocab, "merges": merges},
    }


def save(tok: BPETokenizer, directory: str | os.PathLike) -> Path:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token,
              "eos_token": tok.eos_token, "pad_token": tok.pad_token, "unk_token": None,
              "add_bos_token": tok.add_bos_token, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30}
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    # both files change together, and other files in the directory (a checkpoint's weights) are kept
    return atomic_write_files(directory, {"tokenizer.json": json.dumps(to_hf_json(tok), ensure_ascii=False),
                                          "tokenizer_config.json": json.dumps(config, ensure_ascii=False)})


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json (or {}), with `chat_template` resolved from a named-template list or from a
    separate chat_template.jinja, and `eos_token_id` from generation_config.json / config.json when the
    tokenizer config names no eos_token."""
    path = directory / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    template = cfg.get("chat_template")
    if template is None and (directory / "chat_template.jinja").exists():  # newer transformers layout
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    cfg["chat_template"] = template
    if token_text(cfg.get("eos_token")) is None:
        for name in ("generation_config.json", "config.json"):
            f = directory / name
            if f.exists():
                eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
                eos = eos[0] if isinstance(eos, list) and eos else eos
                if isinstance(eos, int):
                    cfg["eos_token_id"] = eos
                    break
    return cfg


def load(cls: type[BPETokenizer], path: str | os.PathLike) -> BPETokenizer:
    """A directory holding tokenizer.json (+ tokenizer_config.json), or a tokenizer.json file itself."""
    path = Path(path)
    file, directory = (path, path.parent) if path.is_file() else (path / "tokenizer.json", path)
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{file}: model type {model.get('type')!r} is not BPE")
    vocab = dict(model["vocab"])
    # added tokens become our special tokens (matched whole only when allowed); HF's trainer also lists them in
    # the model vocabulary, where their spelling is not a byte-level token
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    for name, i in specials.items():
        if vocab.get(name) == i:
            del vocab[name]
    tokens = {i: _unspell(t) for t, i in vocab.items()}
    pattern = _pattern_of(spec.get("pre_tokenizer"), file)
    norm = (spec.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC", "NFD", "NFKC", "NFKD"):
        raise ValueError(f"{file}: normalizer {norm!r} is not supported")
    cfg = read_tokenizer_config(directory)

    def special(key: str) -> str | None:
        value = token_text(cfg.get(key))
        return value if value in specials else None

    eos = special("eos_token")
    if eos is None and "eos_token_id" in cfg:
        eos = {i: s for s, i in specials.items()}.get(cfg["eos_token_id"])
    kwargs = dict(pattern=pattern, normalization=norm, bos_token=special("bos_token"), eos_token=eos,
                  pad_token=special("pad_token"), chat_template=cfg.get("chat_template"),
                  add_bos_token=bool(cfg.get("add_bos_token", False)))
    if model.get("ignore_merges"):  # a tiktoken vocabulary exported by us or by HF's converter
        return cls(tokens, None, specials, mode="ranks", **kwargs)
    encoder = {t: i for i, t in tokens.items()}
    merges = []
    for m in model["merges"]:
        left, right = m.split(" ") if isinstance(m, str) else m
        try:
            merges.append((encoder[_unspell(left)], encoder[_unspell(right)]))
        except KeyError:
            raise ValueError(f"{file}: merge {left!r} {right!r} names a token outside the vocabulary") from None
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
