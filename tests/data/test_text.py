"""Corpus → token shards → packed batches (tinyllm/data/text.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllm.data.text import PackedBatches, TokenShards, write_shards, write_token_shards


class CharTokenizer:
    """Bytes as ids 0..255, EOS = 256."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def test_documents_are_eos_separated_and_split_by_fraction(tmp_path: Path) -> None:
    texts = [f"doc {i} " * (i % 5 + 1) for i in range(40)]
    idx = write_shards(texts, CharTokenizer(), tmp_path, shard_tokens=64, val_fraction=0.1, progress=False)
    assert idx["dtype"] == "uint16" and idx["vocab_size"] == 257 and idx["eos_token_id"] == 256
    # exactly ⌊40·0.1⌋ = 4 evenly spaced val documents: 9, 19, 29, 39
    assert idx["splits"]["val"]["documents"] == 4 and idx["splits"]["train"]["documents"] == 36
    val_docs = [texts[i] for i in (9, 19, 29, 39)]
    train_docs = [t for i, t in enumerate(texts) if i not in (9, 19, 29, 39)]
    for split, docs in (("train", train_docs), ("val", val_docs)):
        shards = TokenShards(tmp_path, split)
        expected = [t for d in docs for t in [*d.encode(), 256]]
        assert len(shards) == len(expected)
        assert shards.read(0, len(shards)).tolist() == expected  # reads across 64-token shard files
    assert all(c <= 64 for c in idx["splits"]["train"]["tokens"]) and len(idx["splits"]["train"]["files"]) > 3
    assert json.loads((tmp_path / "index.json").read_text()) == idx
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary files left behind


def test_large_vocab_uses_uint32_and_tokenizer_encodings_with_ids(tmp_path: Path) -> None:
    class Enc:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    class BigTok:  # like tokenizers.Tokenizer: encode returns an object with .ids
        eos_token_id = 69999

        def get_vocab_size(self) -> int:
            return 70000

        def encode(self, text: str) -> Enc:
            return Enc([65536 + len(text), 7])

    idx = write_shards(["ab", "abc"], BigTok(), tmp_path, val_fraction=0.0, progress=False)
    assert idx["dtype"] == "uint32"
    assert TokenShards(tmp_path).read(0, 6).tolist() == [65538, 7, 69999, 65539, 7, 69999]


def test_bad_inputs_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token id 300"):
        write_token_shards([[1, 300]], tmp_path / "a", vocab_size=256, eos_token_id=0, progress=False)
    assert not (tmp_path / "a" / "index.json").exists()
    with pytest.raises(ValueError, match=r"val_fraction=1\.5"):
        write_token_shards([[1]], tmp_path / "b", vocab_size=256, eos_token_id=0, val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        TokenShards(tmp_path / "b")
    write_token_shards([[1, 2, 3]] * 10, tmp_path / "c", vocab_size=256, eos_token_id=0, val_fraction=0.0,
                       progress=False)
    shard = tmp_path / "c" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        TokenShards(tmp_path / "c")
    write_token_shards([[1, 2]], tmp_path / "d", vocab_size=256, eos_token_id=0, val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="need at least seq_len"):
        PackedBatches(TokenShards(tmp_path / "d"), 1, 8)


@pytest.fixture
def shards(tmp_path: Path) -> TokenShards:
    # a counting stream makes "labels = inputs shifted by one" checkable on every element
    write_token_shards([list(range(1000))], tmp_path, vocab_size=1001, eos_token_id=1000, shard_tokens=97,
                       val_fraction=0.0, progress=False)
    return TokenShards(tmp_path)


def test_packed_windows_are_shifted_and_cover_an_epoch(shards: TokenShards) -> None:
    it = PackedBatches(shards, batch_size=4, seq_len=10, seed=0)
    assert it.num_windows == (1001 - 1) // 10
    starts = []
    for _ in range(25):  # 25 batches × 4 = 100 windows = one epoch
        x, y = next(it)
        assert x.dtype == torch.long and x.shape == y.shape == (4, 10)
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, -1], x[:, -1] + 1)
        starts += x[:, 0].tolist()
    assert sorted(starts) == list(range(0, 1000, 10))  # every window exactly once per epoch
    assert it.epoch == 0 and it.cursor == 100
    next(it)
    assert it.epoch == 1


def test_order_is_deterministic_from_the_seed(shards: TokenShards) -> None:
    a, b, c = (PackedBatches(shards, 3, 10, seed=s) for s in (1, 1, 2))
    xa, xb, xc = (torch.cat([next(i)[0] for _ in range(5)]) for i in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    plain = next(PackedBatches(shards, 2, 10, shuffle=False))[0]
    assert plain[:, 0].tolist() == [0, 10]


def test_state_dict_resumes_at_the_exact_batch(shards: TokenShards) -> None:
    ref = PackedBatches(shards, 3, 7, seed=5)
    stream = [next(ref)[0] for _ in range(60)]  # crosses two epoch boundaries
    first = PackedBatches(shards, 3, 7, seed=5)
    for _ in range(41):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = PackedBatches(shards, 3, 7, seed=5)
    resumed.load_state_dict(state)
    for k in range(41, 60):
        assert torch.equal(next(resumed)[0], stream[k])
    with pytest.raises(ValueError, match="seed=5"):
        PackedBatches(shards, 3, 7, seed=6).load_state_dict(state)


def test_memmap_dtype_matches_index(shards: TokenShards) -> None:
    assert shards.dtype == np.uint16 and all(isinstance(a, np.memmap) for a in shards.arrays)
