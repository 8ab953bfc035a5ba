"""The `tokenizers` fallback for checkpoint tokenizers that are not byte-level BPE (notes ch.01 tokenization;
WordPiece: Wu et al. 2016, SentencePiece/Unigram: Kudo 2018).

tinyllm's own byte-level BPE (`bpe.py`) reads GPT-2-style `tokenizer.json` files, tiktoken rank files and GGUF
vocabularies; its WordPiece (`wordpiece.py`) reads BERT's pipeline. A `tokenizer.json` neither reads -- WordPiece
without BERT's normalizer, a SentencePiece-style BPE with `▁` and byte fallback, a Unigram model -- goes through Hugging Face's `tokenizers` library, wrapped in `CheckpointTokenizer`
with the same interface (`interface.Tokenizer`): `encode` without special tokens unless allowed, `decode`,
special ids, `chat_template`, `save`. `load_tokenizer` (in `interface.py`) picks the implementation.

Not covered: slow (Python) tokenizers and `tokenizer.model` files without a `tokenizer.json`. Non-special added
tokens of a `tokenizers` file are matched in text always (the library's rule).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from tinyllm.atomic import atomic_write_files
from tinyllm.tokenizer.bpe import split_special
from tinyllm.tokenizer.bpe_io import read_tokenizer_config, token_text
from tinyllm.tokenizer.interface import _checkpoint_error


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
    def special_tokens(self) -> Mapping[str, int]:
        return {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

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

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = (),
               add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens are matched whole only when `allowed_special` lists them ("all"
        for rendered chat text). add_special_tokens prepends BOS when the checkpoint asks for it."""
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        # the library matches special tokens anywhere unless told to encode them as text
        self.tokenizer.encode_special_tokens = True
        for piece, special in split_special(text, allowed_special, self.special_tokens):
            ids += [special] if special is not None else self.tokenizer.encode(piece, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (loadable by transformers' AutoTokenizer)."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token, "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return atomic_write_files(directory, {  # both files change together
            "tokenizer.json": self.tokenizer.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"})


def from_tokenizer_json(file: Path) -> CheckpointTokenizer:
    """Any `tokenizer.json` the `tokenizers` library reads, with the tokenizer_config.json beside it."""
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        raise _checkpoint_error(f"{file}: cannot read ({e})") from None
    try:
        cfg = read_tokenizer_config(file.parent)
    except json.JSONDecodeError as e:
        raise _checkpoint_error(f"{file.parent}: a tokenizer config is not valid JSON ({e})") from None
    eos = token_text(cfg.get("eos_token"))
    if eos is None and "eos_token_id" in cfg:
        eos = tok.id_to_token(cfg["eos_token_id"])
    return CheckpointTokenizer(tok, token_text(cfg.get("bos_token")), eos, token_text(cfg.get("pad_token")),
                               cfg.get("chat_template"), bool(cfg.get("add_bos_token", False)))
