"""Pretraining data: a text corpus → binary token shards → packed fixed-length training windows (notes ch.03).

Pretraining reads a corpus once, tokenizes it, and stores the token ids as flat arrays on disk so that training
only memory-maps them (the nanoGPT `train.bin` recipe, split into shards). Documents are concatenated with an
EOS token between them; the model learns document boundaries from that token. Training then cuts the stream
into windows of `seq_len + 1` tokens ("packing": no padding is ever trained on) and feeds
input_ids = window[:-1], labels = window[1:] — labels are *already shifted*, so the loss compares logits[:, t]
with labels[:, t] (tinyllm.train.losses.causal_lm_loss). Hugging Face's `labels=` convention is unshifted.

On disk (`out_dir/`): `train-00000.bin`, `val-00000.bin`, ... (uint16 when the vocabulary fits, else uint32) and
`index.json` (dtype, vocab size, EOS id, token counts per shard and split). The directory is built beside
`out_dir` and swapped in whole (`tinyllm.atomic`), so an interrupted write leaves the previous shards readable;
`index.json` is written last, so a directory without it is incomplete.

The train/val split is by document and deterministic: document i goes to val when ⌊(i+1)·f⌋ > ⌊i·f⌋ for
val_fraction f, i.e. evenly spaced documents, exactly ⌊n·f⌋ of them, without any random state.

Not covered: deduplication, quality filtering, document-aware attention masks inside a packed window
(documents in one window attend to each other across the EOS, as in GPT-2/nanoGPT pretraining).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tinyllm.atomic import atomic_dir, json_text

INDEX = "index.json"
SPLITS = ("train", "val")


class TextTokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> Any:
        """Token ids of `text` (a list of ints, or an object with `.ids`)."""
        ...


def _vocab_size(tokenizer: Any) -> int:
    for attr in ("vocab_size", "get_vocab_size"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v() if callable(v) else v)
    try:
        return len(tokenizer)
    except TypeError:
        raise ValueError("tokenizer has no vocab_size / get_vocab_size() / __len__; pass vocab_size=") from None


class _ShardWriter:
    """Buffers one split's tokens and flushes fixed-size shards to disk."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.files: list[str] = []
        self.counts: list[int] = []

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while len(arr):
            take = min(len(arr), self.shard_tokens - self.fill)
            self.buf[self.fill:self.fill + take] = arr[:take]
            self.fill += take
            arr = arr[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        name = f"{self.split}-{len(self.files):05d}.bin"
        (self.out_dir / name).write_bytes(self.buf[:self.fill].tobytes())  # inside the temp directory
        self.files.append(name)
        self.counts.append(self.fill)
        self.fill = 0


def write_shards(texts: Iterable[str], tokenizer: TextTokenizer, out_dir: str | os.PathLike,
                 shard_tokens: int = 2**24, val_fraction: float = 0.01, vocab_size: int | None = None,
                 progress: bool = True, val_texts: Iterable[str] | None = None) -> dict[str, Any]:
    """Tokenize `texts` (each one document) into token shards under `out_dir`; return the index dict.

    The validation split is every ⌊1/val_fraction⌋-th document, or exactly `val_texts` when given (a corpus
    with its own held-out split; then all of `texts` trains).
    """
    if val_texts is not None:
        from itertools import chain

        texts = chain(((t, "val") for t in val_texts), ((t, "train") for t in texts))
        val_fraction = 0.0
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens} must be > 0")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer.eos_token_id is None; documents need an EOS separator")
    vocab = int(vocab_size) if vocab_size is not None else _vocab_size(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    # the new shards are built beside out_dir and swapped in with their index; other files there are kept
    with atomic_dir(out_dir, keep_existing=True) as out:
        writers = {s: _ShardWriter(out, s, shard_tokens, dtype) for s in SPLITS}
        from tqdm.auto import tqdm

        n_docs = {s: 0 for s in SPLITS}
        n_tokens = 0
        bar = tqdm(texts, desc="tokenizing", unit="doc", disable=not progress)
        for i, item in enumerate(bar):
            text, forced = item if val_texts is not None else (item, None)
            ids = tokenizer.encode(text)
            ids = list(getattr(ids, "ids", ids))
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"document {i}: token id {bad[0]} outside the vocabulary [0, {vocab})")
            split = forced or ("val" if int((i + 1) * val_fraction) > int(i * val_fraction) else "train")
            writers[split].add([*ids, eos])
            n_docs[split] += 1
            n_tokens += len(ids) + 1
            if i % 256 == 0:
                bar.set_postfix(tokens=n_tokens)
        for w in writers.values():
            w.flush()
        index = {
            "format": "tinyllm-token-shards/1", "dtype": dtype.name, "vocab_size": vocab, "eos_token_id": int(eos),
            "splits": {s: {"files": w.files, "tokens": w.counts, "total_tokens": int(sum(w.counts)),
                           "documents": n_docs[s]} for s, w in writers.items()},
        }
        (out / INDEX).write_text(json_text(index, ensure_ascii=True), encoding="utf-8")
    return index


def write_token_shards(token_docs: Iterable[Iterable[int]], out_dir: str | os.PathLike, vocab_size: int,
                       eos_token_id: int, **kw: Any) -> dict[str, Any]:
    """`write_shards` for documents that are already token ids (tests, pre-tokenized corpora)."""

    class _Identity:
        def __init__(self) -> None:
            self.eos_token_id = eos_token_id
            self.vocab_size = vocab_size

        def encode(self, ids: Iterable[int]) -> list[int]:
            return [int(t) for t in ids]

    return write_shards(token_docs, _Identity(), out_dir, **kw)  # type: ignore[arg-type]


class TokenShards:
    """One split of a shard directory as a single read-only token sequence (memory-mapped)."""

    def __init__(self, directory: str | os.PathLike, split: str = "train") -> None:
        self.directory = Path(directory)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        path = self.directory / INDEX
        try:
            self.index = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no index.json (not a shard directory, or writing "
                                    "did not finish)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid shard index ({e})") from None
        self.split = split
        try:
            self.dtype = np.dtype(self.index["dtype"])
            self.vocab_size: int = int(self.index["vocab_size"])
            self.eos_token_id: int = int(self.index["eos_token_id"])
            meta = self.index["splits"][split]
        except (KeyError, TypeError, ValueError) as e:
            what = f"no field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: not a valid shard index ({what})") from None
        self.arrays: list[np.ndarray] = []
        for name, count in zip(meta["files"], meta["tokens"]):
            f = self.directory / name
            if not f.exists() or f.stat().st_size != count * self.dtype.itemsize:
                raise ValueError(f"{f}: missing or truncated (index says {count} tokens of {self.dtype.name})")
            self.arrays.append(np.memmap(f, dtype=self.dtype, mode="r"))
        self.offsets = np.cumsum([0, *[len(a) for a in self.arrays]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = pos - int(self.offsets[shard])
            take = min(length - filled, len(self.arrays[shard]) - local)
            out[filled:filled + take] = self.arrays[shard][local:local + take]
            filled, pos, shard = filled + take, pos + take, shard + 1
        return out


class PackedBatches:
    """Endless iterator of (input_ids, labels) LongTensor pairs [batch_size, seq_len] from packed windows.

    Window w covers tokens [w·T, w·T + T + 1) (consecutive windows share one boundary token, so every token
    is a label exactly once per epoch). With `shuffle`, each epoch visits the windows in the order
    `permutation(seed, epoch)`; the position (epoch, next window) is the whole state, so
    `load_state_dict(state_dict())` resumes at the exact next batch.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be > 0")
        self.shards, self.batch_size, self.seq_len, self.seed, self.shuffle = (
            shards, batch_size, seq_len, seed, shuffle)
        self.num_windows = (len(shards) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"split {shards.split!r} has {len(shards)} tokens; need at least seq_len + 1 = "
                             f"{seq_len + 1} for one window")
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for r in range(self.batch_size):
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
            rows[r] = self.shards.read(int(self._order[self.cursor]) * self.seq_len, self.seq_len + 1)
            self.cursor += 1
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed={state['seed']}, this iterator has seed={self.seed}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()
