"""One tokenizer interface for every checkpoint (notes ch.01 tokenization, ch.02.4; byte-level BPE: Radford et
al. 2019 "GPT-2"), the loader that picks an implementation, and a streaming decoder.

`load_tokenizer(path)` accepts
- a short name (`smollm2`) resolved by `tinyllm.model.hf.resolve_model_path`;
- a `.gguf` file with a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`) -> `BPETokenizer.from_gguf`;
- a checkpoint directory holding `tokenizer.json`, or that file itself -> `BPETokenizer.load` when it is a
  ByteLevel BPE (GPT-2, LLaMA-3, Qwen2, SmolLM2 and our own exports), `WordPieceTokenizer.load` when it is
  BERT's pipeline (BertNormalizer, BertPreTokenizer, WordPiece), otherwise the `tokenizers` shim
  (`hf_shim.CheckpointTokenizer`: other WordPiece set-ups, SentencePiece-style BPE, Unigram);
- a BERT `vocab.txt` (or a directory with vocab.txt and no tokenizer.json) -> `WordPieceTokenizer`;
- a tiktoken rank file (`*.tiktoken`): `qwen*` -> Qwen's regex, NFC and its 208 special tokens; otherwise
  cl100k's regex (and cl100k's special tokens when the name says cl100k).

All implementations satisfy `Tokenizer`: `encode(text)` gives ids without special tokens -- special-token
spellings in the text are plain text unless `allowed_special` lists them ("all" for rendered chat templates);
`decode(ids, skip_special_tokens=False)`; `bos/eos/pad_token(_id)`, `special_tokens`, `vocab_size`,
`chat_template`, `add_bos_token` and `save(dir)` (tokenizer.json + tokenizer_config.json).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from tinyllm.tokenizer.bpe import BPETokenizer

# Qwen's tiktoken specials follow its 151643 ranks: <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0..204|>
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))]
CL100K_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


@runtime_checkable
class Tokenizer(Protocol):
    """What generation, chat and the data pipeline use of a tokenizer."""

    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    add_bos_token: bool

    @property
    def special_tokens(self) -> Mapping[str, int]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def pad_token_id(self) -> int | None: ...

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = (),
               add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def save(self, directory: str | os.PathLike) -> Path: ...


def _checkpoint_error(message: str) -> Exception:
    """`tinyllm.model.hf.CheckpointError`, imported late: the tokenizer layer sits below the model layer."""
    from tinyllm.model.hf import CheckpointError

    return CheckpointError(message)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory, tokenizer.json, tiktoken rank file, GGUF file or short name."""
    from tinyllm.model.hf import resolve_model_path  # short names live with the checkpoints

    resolved = resolve_model_path(path)
    if not resolved.exists():
        raise _checkpoint_error(f"{path}: no such file or directory")
    if resolved.suffix == ".txt" or (resolved.is_dir() and not (resolved / "tokenizer.json").exists()
                                     and (resolved / "vocab.txt").exists()):
        return _from_vocab_txt(resolved)
    if resolved.is_dir() or resolved.suffix == ".json":
        return _from_tokenizer_json(resolved)
    if resolved.suffix == ".gguf":
        try:
            return BPETokenizer.from_gguf(resolved)
        except (ValueError, KeyError, OSError) as e:
            raise _checkpoint_error(f"{resolved}: {e}" if str(resolved) not in str(e) else str(e)) from None
    if resolved.suffix == ".tiktoken":
        return _from_tiktoken(resolved)
    raise _checkpoint_error(f"{path}: expected a checkpoint directory, tokenizer.json, vocab.txt, .tiktoken or "
                            ".gguf file")


def _from_vocab_txt(path: Path) -> Tokenizer:
    from tinyllm.tokenizer.wordpiece import WordPieceTokenizer

    try:
        return WordPieceTokenizer.load(path)
    except (ValueError, OSError) as e:
        raise _checkpoint_error(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


def _from_tokenizer_json(path: Path) -> Tokenizer:
    from tinyllm.tokenizer import hf_shim

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise _checkpoint_error(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
    from tinyllm.tokenizer.wordpiece import WordPieceTokenizer

    try:
        return BPETokenizer.load(path)
    except (ValueError, KeyError, TypeError):
        pass
    try:
        return WordPieceTokenizer.load(path)
    except (ValueError, KeyError, TypeError, AttributeError):
        # neither byte-level BPE nor BERT's WordPiece (SentencePiece BPE, Unigram, a broken file): the shim
        # either reads it through `tokenizers` or raises CheckpointError naming the problem
        return hf_shim.from_tokenizer_json(file)


def _from_tiktoken(path: Path) -> BPETokenizer:
    name = path.name.lower()
    try:
        if "qwen" in name:
            base = sum(1 for line in path.read_bytes().splitlines() if line.strip())
            specials = {s: base + i for i, s in enumerate(QWEN_SPECIALS)}
            return BPETokenizer.from_tiktoken(path, "qwen", specials, normalization="NFC",
                                              eos_token="<|im_end|>", pad_token="<|endoftext|>")
        specials = CL100K_SPECIALS if "cl100k" in name else {}
        return BPETokenizer.from_tiktoken(path, "gpt4", specials,
                                          eos_token="<|endoftext|>" if specials else None)
    except ValueError as e:
        raise _checkpoint_error(str(e)) from None


class IncrementalDecoder:
    """Text of a growing id sequence, piece by piece: a piece is released only once it no longer ends in an
    incomplete UTF-8 sequence (U+FFFD), so a Chinese character split over several byte tokens prints whole."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
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
