"""Bits per character: windowed LM scoring equals a per-token oracle, the n-gram baseline charges unseen
characters and caches its result, and both divide by the same characters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tinyllm.eval.bpc import (
    _windows,
    encode_documents,
    kneser_ney_bits,
    lm_bits,
    normalize_texts,
    select_documents,
    text_units,
    texts_sha256,
)
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model
from tinyllm.nlp.ngram import KneserNeyLM

BOUNDARY = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; 256 is the document boundary."""

    normalization = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64)).eval()


TEXTS = ["今天天气很好", "ab", "新闻标题\n正文内容很长很长，还有更多的字。", "x"]


@pytest.mark.parametrize("n,context,stride", [(1, 4, 2), (5, 4, 4), (17, 8, 3), (8, 8, 1), (30, 5, 5)])
def test_windows_score_every_target_once_with_enough_context(n, context, stride) -> None:
    ids = list(range(n + 1))
    wins = _windows(ids, context, stride)
    scored = []
    for toks, k in wins:
        assert 1 <= len(toks) - 1 <= context and k >= 1
        first = toks[0]
        for t in toks[len(toks) - k:]:
            scored.append(t)
            assert t - first >= min(t, context - stride + 1)  # inputs before the target inside its window
    assert scored == ids[1:]


def test_lm_bits_equal_a_per_token_oracle() -> None:
    model, tok = _model(), ByteTokenizer()
    docs = encode_documents(tok, TEXTS)
    context, stride = 8, 3
    got = lm_bits(model, docs, TEXTS, BOUNDARY, context, stride, batch_tokens=20)
    want = 0.0
    with torch.no_grad():
        for ids in docs:
            seq = [BOUNDARY, *ids, BOUNDARY]
            for j in range(1, len(seq)):
                k = max(0, math.ceil((j - context) / stride))  # the first window that reaches target j
                logits = model(torch.tensor([seq[k * stride : j]]))[0, -1]
                want -= float(torch.log_softmax(logits.float(), -1)[seq[j]]) / math.log(2)
    assert got.bits == pytest.approx(want, rel=1e-5)
    assert got.predictions == sum(len(d) + 1 for d in docs)
    chars, nbytes = text_units(TEXTS)
    assert (got.chars, got.bytes) == (chars, nbytes) == (sum(map(len, TEXTS)) + 4,
                                                         sum(len(t.encode()) for t in TEXTS) + 4)
    assert got.bits_per_char == pytest.approx(want / chars)
    # batching is an implementation detail
    again = lm_bits(model, docs, TEXTS, BOUNDARY, context, stride, batch_tokens=10_000)
    assert again.bits == pytest.approx(got.bits, rel=1e-5)


def test_uniform_model_costs_log2_vocab_per_token() -> None:
    class Uniform(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            self.grad_enabled = torch.is_grad_enabled()
            return torch.zeros(*ids.shape, 257) + self.w

    docs = encode_documents(ByteTokenizer(), TEXTS)
    model = Uniform()
    got = lm_bits(model, docs, TEXTS, BOUNDARY, context=4)
    assert model.grad_enabled is False  # scoring builds no autograd graph
    n = sum(len(d) + 1 for d in docs)
    assert got.bits == pytest.approx(n * math.log2(257))
    # the byte-level model predicts every byte and each boundary: bits/byte is exactly log2(257)
    assert got.bits_per_byte == pytest.approx(math.log2(257))


def test_bad_arguments_are_named() -> None:
    model, docs = _model(), encode_documents(ByteTokenizer(), TEXTS)
    with pytest.raises(ValueError, match="stride=9"):
        lm_bits(model, docs, TEXTS, BOUNDARY, context=8, stride=9)
    with pytest.raises(ValueError, match="3 token documents for 4 texts"):
        lm_bits(model, docs[:3], TEXTS, BOUNDARY, context=8)

    class Lossy(ByteTokenizer):
        def decode(self, ids: list[int]) -> str:
            return super().decode(ids).upper()

    with pytest.raises(ValueError, match=r"document 1 .*round-trip"):
        encode_documents(Lossy(), ["今天", "ab"])
    with pytest.raises(ValueError, match="char_budget=0"):
        select_documents(TEXTS, 0)


def test_select_documents_budget_duplicates_and_exclusions() -> None:
    pool = ["aaaa", "bb", "aaaa", "seen", "cccccccccc", "d"]
    got = select_documents(pool, char_budget=10, exclude=["seen"])
    assert got == ["aaaa", "bb", "d"]  # the duplicate and the excluded are dropped, the 10-char doc overflows
    assert text_units(got)[0] <= 10
    assert normalize_texts(["ｆｕｌｌ"], "NFKC") == ["full"] and normalize_texts(["ｆ"], None) == ["ｆ"]


TRAIN = ["今天天气很好", "今天下雨了", "明天天气很好", "今天很好"] * 3


def test_kneser_ney_bits_match_the_model_and_charge_unseen_characters(tmp_path) -> None:
    held = ["今天天气好", "明天下雨"]
    got = kneser_ney_bits(TRAIN, held, 3)
    ref = KneserNeyLM(3, backend="numpy").fit(list(t) for t in TRAIN).evaluate([list(t) for t in held])
    assert got["oov_chars"] == 0 and got["cached"] is False
    assert got["bits"] == pytest.approx(ref["bits_per_token"] * ref["tokens"])
    assert (got["chars"], got["bytes"]) == text_units(held) and got["sha256"] == texts_sha256(held)
    # one unseen 3-byte character: its <unk> probability plus 2 + 8·3 bits of spelling
    unseen = kneser_ney_bits(TRAIN, ["今天雪"], 3)
    unk = KneserNeyLM(3, backend="numpy").fit(list(t) for t in TRAIN).evaluate([list("今天雪")])
    assert unseen["oov_chars"] == 1 and unseen["oov_spelling_bits"] == 26
    assert unseen["bits"] == pytest.approx(unk["bits_per_token"] * unk["tokens"] + 26)


def test_kneser_ney_cache_is_keyed_by_texts_and_order(tmp_path) -> None:
    held = ["今天天气好"]
    first = kneser_ney_bits(TRAIN, held, 3, cache_dir=tmp_path)
    second = kneser_ney_bits(TRAIN, held, 3, cache_dir=tmp_path)
    assert first["cached"] is False and second["cached"] is True
    assert second["bits"] == first["bits"]
    assert kneser_ney_bits(TRAIN, held, 4, cache_dir=tmp_path)["cached"] is False
    assert kneser_ney_bits(TRAIN, ["明天天气好"], 3, cache_dir=tmp_path)["cached"] is False
    assert kneser_ney_bits(TRAIN[:-1], held, 3, cache_dir=tmp_path)["cached"] is False
    assert len(list(tmp_path.glob("kn*.json"))) == 4
    # a damaged entry is recomputed, not trusted
    for p in tmp_path.glob("kn3-*.json"):
        p.write_text("{not json")
    assert kneser_ney_bits(TRAIN, held, 3, cache_dir=tmp_path)["bits"] == first["bits"]
