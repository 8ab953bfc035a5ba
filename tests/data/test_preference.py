"""Preference data: the inews builders are deterministic in the seed and build the pairs they promise (own title
vs another article's, right vs wrong label), JSONL files round-trip and bad lines name themselves, rankings
expand to C(K, 2) pairs, and tokenization renders the chat template's assistant turn."""

from __future__ import annotations

import json

import pytest

from tinyllm.data.corpora import INEWS_LABELS, inews
from tinyllm.data.preference import (
    PreferencePair,
    load_pairs,
    ranking_to_pairs,
    read_pairs_jsonl,
    sentiment_pairs,
    split_pairs,
    title_pairs,
    tokenize_pairs,
    write_pairs_jsonl,
)


def test_title_pairs() -> None:
    pairs = title_pairs("test", seed=0)
    arts = [a for a in inews("test") if a.title and a.content]
    assert len(pairs) == len(arts)
    titles = {a.title for a in arts}
    for p, a in zip(pairs, arts):
        assert p.chosen == a.title and p.rejected != a.title and p.rejected in titles
        assert p.prompt.startswith("为下面的新闻写一个标题。\n\n")
    assert pairs == title_pairs("test", seed=0) and pairs != title_pairs("test", seed=1)


def test_sentiment_pairs() -> None:
    pairs = sentiment_pairs("test", seed=0)
    arts = [a for a in inews("test") if a.content]
    assert len(pairs) == len(arts)
    for p, a in zip(pairs, arts):
        assert p.chosen == INEWS_LABELS[a.label] and p.rejected in INEWS_LABELS and p.rejected != p.chosen
    assert pairs == sentiment_pairs("test", seed=0)


def test_load_pairs_builtin_and_jsonl(tmp_path) -> None:
    mixed = load_pairs("builtin:title,sentiment", "test", seed=0, max_pairs=5)
    assert len(mixed) == 10 and mixed == load_pairs("builtin:title,sentiment", "test", seed=0, max_pairs=5)
    path = write_pairs_jsonl(mixed, tmp_path / "p.jsonl")
    assert read_pairs_jsonl(path) == mixed == load_pairs(str(path))
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="builders must be among"):
        load_pairs("builtin:poems")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" +
                   json.dumps({"prompt": "a", "chosen": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing or non-string field\(s\) \['chosen', 'rejected'\]"):
        read_pairs_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not JSON"):
        read_pairs_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        read_pairs_jsonl(tmp_path / "missing.jsonl")


def test_ranking_to_pairs() -> None:
    pairs = ranking_to_pairs("q", ["A", "B", "C", "D"])
    assert len(pairs) == 6  # C(4, 2): InstructGPT's four ranked answers
    assert PreferencePair("q", "A", "D") in pairs and PreferencePair("q", "D", "A") not in pairs
    with pytest.raises(ValueError, match="at least 2"):
        ranking_to_pairs("q", ["A"])


def test_split_pairs() -> None:
    tr, va = split_pairs(list(range(100)), 0.1, seed=0)
    assert len(va) == 10 and sorted(tr + va) == list(range(100))
    assert split_pairs(list(range(100)), 0.1, seed=0) == (tr, va)
    with pytest.raises(ValueError, match="val_fraction=1"):
        split_pairs([1, 2], 1)


def test_tokenize_pairs_chat_and_plain() -> None:
    from tinyllm.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2")
    pair = PreferencePair("今天天气怎么样？", "晴天。", "不知道")
    (tp,) = tokenize_pairs([pair], tok, chat=True)
    text = tok.decode(tp.prompt + tp.chosen)
    assert text.endswith("<|im_start|>assistant\n晴天。<|im_end|>")
    assert tok.decode(tp.rejected) == "不知道<|im_end|>"
    (plain,) = tokenize_pairs([pair], tok, chat=False)
    assert tok.decode(plain.prompt) == "今天天气怎么样？" and plain.chosen[-1] == tok.eos_token_id
    # a long prompt loses tokens from the left; responses stay whole
    (cut,) = tokenize_pairs([PreferencePair("很长的问题" * 50, "是", "否")], tok, chat=False, max_length=20)
    assert len(cut.prompt) + max(len(cut.chosen), len(cut.rejected)) == 20
    with pytest.raises(ValueError, match="max_length=1"):
        tokenize_pairs([pair], tok, max_length=1)
