"""The extractive title tagger: LCS labels, character ↔ token mapping over split UTF-8 characters, training that
lowers the loss, extraction that returns the article's characters in order, and a save/load round trip."""

from __future__ import annotations

import random

import pytest
import torch

from tinyllm.eval.metrics import lcs_length, mean_rouge_l
from tinyllm.recipes.tiny_zh_titles import (
    TitleTagger,
    char_tokens,
    extract_titles,
    keep_mask,
    load_title_tagger,
    save_title_tagger,
    tagging_examples,
    train_title_tagger,
)


def _is_subsequence(part: str, whole: str) -> bool:
    it = iter(whole)
    return all(c in it for c in part)


@pytest.mark.parametrize("seed", range(20))
def test_keep_mask_marks_one_longest_common_subsequence(seed) -> None:
    rng = random.Random(seed)
    a = "".join(rng.choice("新闻北京大雪路") for _ in range(rng.randrange(0, 30)))
    b = "".join(rng.choice("新闻北京大雪车") for _ in range(rng.randrange(0, 15)))
    keep = keep_mask(a, b)
    kept = "".join(c for c, k in zip(a, keep) if k)
    assert len(keep) == len(a) and len(kept) == lcs_length(a, b) and _is_subsequence(kept, b)


def test_keep_mask_worked_example() -> None:
    article = "12月1日，滦南县大巴车与小汽车在雪天相撞。"
    title = "大巴车与汽车在雪天相撞"
    kept = "".join(c for c, k in zip(article, keep_mask(article, title)) if k)
    assert kept == title


@pytest.fixture(scope="module")
def tok():
    from tinyllm.tokenizer.bpe import train_bpe

    texts = ["北京今天下大雪，道路结冰。", "上海的天气很好，市民出游。", "大巴车与小汽车在雪天相撞。"] * 20
    return train_bpe(texts, 300, special_tokens=["<|endoftext|>"])


def test_char_tokens_follow_split_characters(tok) -> None:
    text = "滦南县大巴车，ok。"  # rare characters fall back to bytes: one character over several tokens
    ids = tok.encode(text)
    owners = char_tokens(tok, text, ids)
    assert len(owners) == len(text) and owners == sorted(owners) and owners[0] == 0
    for c, t in zip(text, owners):  # each character's first byte opens inside the token named for it
        assert tok.decode_bytes([ids[t]]) and c.encode()[:1] in b"".join(tok.decode_bytes([i]) for i in ids[t:])
    assert len(set(owners)) <= len(ids)
    with pytest.raises(ValueError, match="bytes"):
        char_tokens(tok, text + "多", ids)


def _tagger(tok):
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.transformer import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return TitleTagger(CausalLM(cfg))


def test_train_extract_save_load(tok, tmp_path) -> None:
    records = [{"input": "北京今天下大雪，道路结冰。", "output": "北京下大雪"},
               {"input": "上海的天气很好，市民出游。", "output": "上海天气好"}] * 8 + [{"input": "", "output": "x"}]
    examples = tagging_examples(tok, records)
    assert len(examples) == 16 and all(len(ids) == len(lab) for ids, lab in examples)
    assert all(set(lab) <= {0.0, 1.0} and 0 < sum(lab) < len(lab) for _, lab in examples)
    tagger, start = _tagger(tok), tok.special_tokens["<|endoftext|>"]
    losses = train_title_tagger(tagger, examples, start, steps=60, batch_size=4, lr=3e-3, seed=0)
    assert len(losses) == 60 and sum(losses[-10:]) < 0.5 * sum(losses[:10])
    articles = [r["input"] for r in records[:2]]
    with torch.no_grad():  # learned: the tokens it marks are the labelled ones
        for (ids, lab) in examples[:2]:
            assert (tagger(torch.tensor([[start, *ids]]))[0, 1:] > 0).float().tolist() == lab
    titles = extract_titles(tagger, tok, articles, 5, start)
    assert [len(t) for t in titles] == [5, 5] and mean_rouge_l(titles, ["北京下大雪", "上海天气好"]) >= 0.6
    assert all(_is_subsequence(t, a) for t, a in zip(extract_titles(tagger, tok, articles, 9, start), articles))
    save_title_tagger(tagger, tmp_path / "tagger", 5, tok)
    again, chars = load_title_tagger(tmp_path / "tagger")
    assert chars == 5 and extract_titles(again, tok, articles, chars, start) == titles
    ids = torch.tensor([[start, *tok.encode(articles[0])]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), tagger.eval()(ids), rtol=0, atol=0)


def test_bad_input_is_named(tok, tmp_path) -> None:
    tagger, start = _tagger(tok), tok.special_tokens["<|endoftext|>"]
    with pytest.raises(ValueError, match="steps=0"):
        train_title_tagger(tagger, [([1, 2], [0.0, 1.0])], start, steps=0)
    with pytest.raises(ValueError, match="no title examples"):
        train_title_tagger(tagger, [], start, steps=1)
    with pytest.raises(ValueError, match="title_chars=0"):
        extract_titles(tagger, tok, ["北京"], 0, start)
    from tinyllm.model.hf import CheckpointError

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"title_head\.safetensors"):
        load_title_tagger(tmp_path / "empty")


def test_bf16_autocast_trains(tok) -> None:
    """The plan trains in bf16 where the CPU or GPU runs it fast; the tagger follows it."""
    examples = tagging_examples(tok, [{"input": "北京今天下大雪，道路结冰。", "output": "北京下大雪"}])
    losses = train_title_tagger(_tagger(tok), examples, tok.special_tokens["<|endoftext|>"], steps=3, batch_size=2,
                                precision="bf16")
    assert len(losses) == 3 and all(0 < x < 2 for x in losses)


def test_time_budget_shortens_the_tagger_run(tok, monkeypatch) -> None:
    """A budget the planned steps overrun: the run is re-planned from its measured step time (fake clock: each
    step 0.1 s) and its learning rate still decays to the end of the shortened plan."""
    import types

    import tinyllm.recipes.tiny_zh_titles as titles

    now = [0.0]

    def clock() -> float:
        now[0] += 0.1  # read once a step, after it
        return now[0]

    monkeypatch.setattr(titles, "time", types.SimpleNamespace(perf_counter=clock))
    examples = tagging_examples(tok, [{"input": "北京今天下大雪，道路结冰。", "output": "北京下大雪"}])
    losses = train_title_tagger(_tagger(tok), examples, tok.special_tokens["<|endoftext|>"], steps=500, batch_size=2,
                                time_budget_s=3.0)
    assert 27 <= len(losses) <= 31
    free = train_title_tagger(_tagger(tok), examples, tok.special_tokens["<|endoftext|>"], steps=12, batch_size=2,
                              time_budget_s=1e6)
    assert len(free) == 12
