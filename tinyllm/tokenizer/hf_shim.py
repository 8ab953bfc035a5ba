"""Checkpoint tokenizers through the `tokenizers` library — a temporary shim (notes ch.01 tokenization,
ch.02.13; byte-level BPE: Radford et al. 2019 "GPT-2", Sennrich et al. 2016 "BPE").

Until tinyllm's own byte-level BPE (`tinyllm/tokenizer/bpe.py`) lands, text ↔ ids for real checkpoints goes
through Hugging Face's `tokenizers` library, wrapped in one small interface (`CheckpointTokenizer`):
`encode`, `decode`, special ids, `chat_template`, `save`. `load_tokenizer` accepts

- an HF checkpoint directory (`tokenizer.json` + `tokenizer_config.json` with `chat_template` and the special
  tokens);
- a `.gguf` file: a byte-level BPE is rebuilt from `tokenizer.ggml.tokens` / `merges` / `token_type` — tokens
  are respelled in GPT-2's byte alphabet, CONTROL tokens (type 3) become special added tokens and
  USER_DEFINED (type 4) plain added tokens, the pre-tokenizer split follows `tokenizer.ggml.pre`, exactly as
  transformers converts GGUF vocabularies;
- a short name (`smollm2`) resolved by `tinyllm.model.hf.resolve_model_path`.

Not covered: SentencePiece / Unigram GGUF vocabularies (`tokenizer.ggml.model` = "llama", "t5"), slow
(Python) tokenizers, `tokenizer.model` files.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers


def _checkpoint_error(message: str) -> Exception:
    """`tinyllm.model.hf.CheckpointError`, imported late: the tokenizer layer sits below the model layer."""
    from tinyllm.model.hf import CheckpointError as error

    return error(message)

# split patterns of a few GGUF pre-tokenizer names (the regexes of the published tokenizers); anything else
# uses GPT-2's split, as transformers does
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "qwen2": _QWEN2,
               "deepseek-r1-qwen": _QWEN2}
CONTROL, USER_DEFINED = 3, 4


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class CheckpointTokenizer:
    """A checkpoint's tokenizer: a `tokenizers.Tokenizer` plus its special tokens and chat template."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False) -> None:
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and tokenizer.token_to_id(tok) is None:
                raise _checkpoint_error(f"{name}={tok!r} is not in the vocabulary")

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) stay whole.
        add_special_tokens prepends BOS when the checkpoint asks for it (`add_bos_token`)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (loadable by transformers' AutoTokenizer)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token, "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        for name, payload in (("tokenizer.json", self.tokenizer.to_str(pretty=True)),
                              ("tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))):
            tmp = out / f".{name}.tmp"
            tmp.write_text(payload + "\n", encoding="utf-8")
            os.replace(tmp, out / name)  # never leave a half-written file under the real name
        return out


class IncrementalDecoder:
    """Text of a growing id sequence, piece by piece: a piece is released only once it no longer ends in an
    incomplete UTF-8 sequence (U+FFFD), so a Chinese character split over several byte tokens prints whole."""

    def __init__(self, tokenizer: CheckpointTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


# ------------------------------------------------------------------ loading
def load_tokenizer(path: str | os.PathLike) -> CheckpointTokenizer:
    """The tokenizer of an HF checkpoint directory, a .gguf file or a known short name."""
    from tinyllm.model.hf import resolve_model_path  # short names live with the checkpoints

    resolved = resolve_model_path(path)
    if resolved.is_dir():
        return _from_hf_dir(resolved)
    if resolved.is_file() and resolved.suffix == ".gguf":
        return _from_gguf(resolved)
    if not resolved.exists():
        raise _checkpoint_error(f"{path}: no such file or directory")
    raise _checkpoint_error(f"{path}: expected an HF checkpoint directory or a .gguf file")


def _from_hf_dir(directory: Path) -> CheckpointTokenizer:
    tj = directory / "tokenizer.json"
    if not tj.exists():
        raise _checkpoint_error(f"{directory}: no tokenizer.json (only fast tokenizers are supported)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:
        raise _checkpoint_error(f"{tj}: cannot read ({e})") from None
    cfg: dict[str, Any] = {}
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise _checkpoint_error(f"{cfg_path}: not valid JSON ({e})") from None
    template = cfg.get("chat_template")
    if template is None and (directory / "chat_template.jinja").exists():  # newer transformers layout
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    eos = _token_text(cfg.get("eos_token"))
    if eos is None:
        eos = _eos_from_model_config(directory, tok)
    return CheckpointTokenizer(tok, _token_text(cfg.get("bos_token")), eos, _token_text(cfg.get("pad_token")),
                               template, bool(cfg.get("add_bos_token", False)))


def _eos_from_model_config(directory: Path, tok: Tokenizer) -> str | None:
    for name in ("generation_config.json", "config.json"):
        f = directory / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
            if isinstance(eos, int):
                return tok.id_to_token(eos)
    return None


def _gguf_metadata(path: Path) -> dict[str, Any]:
    try:
        from tinyllm.model.gguf import read_gguf_metadata
    except ImportError:  # the GGUF weight loader is optional; read the metadata with the gguf package
        read_gguf_metadata = None
    if read_gguf_metadata is not None:
        return read_gguf_metadata(path)
    try:
        import gguf
    except ImportError:
        raise _checkpoint_error(f"{path}: reading GGUF needs the 'gguf' package (pip install tinyllm[gguf])") from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:
        raise _checkpoint_error(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _from_gguf(path: Path) -> CheckpointTokenizer:
    meta = _gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise _checkpoint_error(f"{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    # a token outside the byte alphabet is stored as raw text: respell its UTF-8 bytes
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    split = GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # a CONTROL token spelled outside the byte alphabet is a converter mislabel; it stays an ordinary token
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(spelled, types) if ty == CONTROL and set(t) <= letters]
    tok.add_special_tokens(control)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(spelled, types) if ty == USER_DEFINED])

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return spelled[int(i)] if i is not None and 0 <= int(i) < len(spelled) else None

    return CheckpointTokenizer(tok, special("bos"), special("eos"), special("padding"),
                               meta.get("tokenizer.chat_template"),
                               bool(meta.get("tokenizer.ggml.add_bos_token", False)))
