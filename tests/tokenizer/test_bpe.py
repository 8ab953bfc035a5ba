"""Byte-level BPE: the note's toy pair counts, incremental trainer == naive oracle, exact round trips, special
tokens, and HF `tokenizers`/transformers parity of the exported tokenizer.json."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.tokenizer.bpe import BPETokenizer, bytes_to_unicode
from tinyllm.tokenizer.bpe_train import pair_counts, train_bpe
from tinyllm.tokenizer.pretokenize import PATTERNS, pretokenize, to_oniguruma

MIXED = [
    "大语言模型的分词器把文本切成token。今天天气很好，我们去公园散步吧！",
    "The quick brown fox jumps over the lazy dog. It's 2024 and we've got 12345 tokens.",
    "def add(x, y):\n    return x + y  # sum\n\nprint(add(3, 4))\n",
    "混合 text 和 English，还有表情😀🎉以及数字3.14159。  \n\t 结尾有空格  ",
]
CORPUS = [
    "自然语言处理是人工智能的一个重要方向。分词是中文处理的第一步，词表的大小影响模型的效率。",
    "Byte pair encoding merges the most frequent pair of adjacent symbols, again and again.",
    "for i in range(10):\n    total += i * i\nreturn total\n",
    "low lower newest newest widest widest widest widest nice 😀😀 🎉",
] * 8


@pytest.fixture(scope="module")
def trained() -> BPETokenizer:
    return train_bpe(CORPUS, 420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     show_progress=False, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template="{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")


def test_toy_corpus_pair_counts_match_the_note() -> None:
    # the note's corpus: low, lower, newest x2, widest x4, nice; characters plus an end-of-word marker
    words = {("l", "o", "w", "</w>"): 1, ("l", "o", "w", "e", "r", "</w>"): 1,
             ("n", "e", "w", "e", "s", "t", "</w>"): 2, ("w", "i", "d", "e", "s", "t", "</w>"): 4,
             ("n", "i", "c", "e", "</w>"): 1}
    top = [("".join(p), c) for p, c in pair_counts(words).most_common(11)]
    assert top == [("es", 6), ("st", 6), ("t</w>", 6), ("wi", 4), ("id", 4), ("de", 4), ("we", 3),
                   ("lo", 2), ("ow", 2), ("ne", 2), ("ew", 2)]
    assert all(c == 1 for _, c in pair_counts(words).most_common()[11:])


def test_first_merges_on_toy_corpus_follow_the_tie_break() -> None:
    text = "low lower newest newest widest widest widest widest nice"
    tok = train_bpe([text], 259, pattern=r"\S+", show_progress=False)
    # es, st (6 each) tie: the smaller byte pair (e, s) wins; then (es, t) 6; then d+est, id, wi tie at 4
    # and the byte-smallest (d, est) wins
    assert [(tok.tokens[a], tok.tokens[b]) for a, b in tok.merges] == [(b"e", b"s"), (b"es", b"t"), (b"d", b"est")]


def test_pretokenize_patterns() -> None:
    assert pretokenize("12345", "qwen") == ["1", "2", "3", "4", "5"]
    assert pretokenize("12345", "gpt4") == ["123", "45"]
    assert pretokenize("12345", "gpt2") == ["12345"]
    # a run of Han characters (and Latin touching it) is one chunk; one punctuation mark may lead a letter run
    assert pretokenize("今天天气很好，用Python写代码。", "qwen") == ["今天天气很好", "，用Python写代码", "。"]
    for name in PATTERNS:
        assert "".join(pretokenize(MIXED[3], name)) == MIXED[3]
    with pytest.raises(ValueError, match="bad pre-tokenizer pattern"):
        pretokenize("x", "(unclosed")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=" \n\t1234567890aé中文😀.,'", max_size=40))
def test_oniguruma_rewrite_splits_like_the_original(text: str) -> None:
    from tokenizers import Regex, pre_tokenizers

    for name in PATTERNS:
        split = pre_tokenizers.Split(Regex(to_oniguruma(name)), behavior="isolated")
        assert [s for s, _ in split.pre_tokenize_str(text)] == pretokenize(text, name)


@settings(max_examples=30, deadline=None)
@given(words=st.lists(st.text(alphabet="abcab é中", min_size=1, max_size=8), min_size=1, max_size=12),
       vocab_size=st.integers(257, 300), min_frequency=st.integers(1, 3))
def test_incremental_trainer_equals_naive_oracle(words: list[str], vocab_size: int, min_frequency: int) -> None:
    kw = dict(pattern="gpt2", special_tokens=["<s>"], min_frequency=min_frequency, show_progress=False)
    fast = train_bpe(words, vocab_size, algorithm="incremental", **kw)
    slow = train_bpe(words, vocab_size, algorithm="naive", **kw)
    assert fast.merges == slow.merges
    assert fast.tokens == slow.tokens and fast.special_tokens == slow.special_tokens


def test_trained_layout(trained: BPETokenizer) -> None:
    assert trained.vocab_size == 420
    assert all(trained.tokens[b] == bytes([b]) for b in range(256))
    assert trained.special_tokens == {"<|endoftext|>": 417, "<|im_start|>": 418, "<|im_end|>": 419}
    assert (trained.bos_token_id, trained.eos_token_id, trained.pad_token_id) == (None, 419, 417)
    for a, b in trained.merges:  # every merge creates the token its two parts spell
        assert trained.tokens[a] + trained.tokens[b] in trained.encoder


@settings(max_examples=80, deadline=None)
@given(st.text() | st.text(alphabet="中文分词器😀🎉👍🏽 \n\tabc123，。!", max_size=60))
def test_round_trip_any_string(trained: BPETokenizer, text: str) -> None:
    assert trained.decode(trained.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64))
def test_round_trip_any_bytes(trained: BPETokenizer, data: bytes) -> None:
    assert trained.decode_bytes(trained.ids_of_bytes(data)) == data


def test_merges_compress(trained: BPETokenizer) -> None:
    ids = trained.encode(CORPUS[0])
    assert len(ids) < len(CORPUS[0].encode("utf-8")) / 2


def test_special_tokens_only_when_allowed(trained: BPETokenizer) -> None:
    text = "<|im_start|>你好<|im_end|>"
    plain = trained.encode(text)
    assert 418 not in plain and trained.decode(plain) == text
    ids = trained.encode(text, allowed_special="all")
    assert ids[0] == 418 and ids[-1] == 419 and trained.decode(ids) == text
    assert trained.decode(ids, skip_special_tokens=True) == "你好"
    assert trained.encode(text, allowed_special={"<|im_end|>"})[-1] == 419
    with pytest.raises(ValueError, match="<bogus>"):
        trained.encode(text, allowed_special={"<bogus>"})


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["abc"], 100, show_progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        train_bpe(["abc"], 300, special_tokens=["<s>", "<s>"], show_progress=False)
    tok = train_bpe(["abc"], 260, show_progress=False)
    with pytest.raises(ValueError, match="99999"):
        tok.decode([1, 99999])


def test_longest_first_differs_from_rank_order() -> None:
    # merges: (b,c) first, then (a,b), then (ab,c): rank order gives a+bc, longest-first gives abc
    tokens = {**{i: bytes([i]) for i in range(256)}, 256: b"bc", 257: b"ab", 258: b"abc"}
    tok = BPETokenizer(tokens, [(98, 99), (97, 98), (257, 99)])
    assert tok.encode("abc") == [97, 256]
    assert tok.encode_longest_first("abc") == [258]


def test_export_loads_in_hf_with_identical_ids(trained: BPETokenizer, tmp_path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    trained.save(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in MIXED:
        ids = trained.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert auto.encode(text, add_special_tokens=False) == ids
        assert auto.decode(ids) == text
    assert auto.eos_token_id == trained.eos_token_id and auto.pad_token_id == trained.pad_token_id
    assert auto.chat_template == trained.chat_template
    # HF matches special tokens in text always; ours when allowed
    chat = "<|im_start|>你好<|im_end|>"
    assert hf.encode(chat, add_special_tokens=False).ids == trained.encode(chat, allowed_special="all")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and "chat_template" in config
    back = BPETokenizer.load(tmp_path)
    assert back.merges == trained.merges and back.tokens == trained.tokens
    assert back.special_tokens == trained.special_tokens and back.eos_token_id == trained.eos_token_id
    assert [back.encode(t) for t in MIXED] == [trained.encode(t) for t in MIXED]
    assert not list(tmp_path.glob(".*.tmp"))


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40) | st.text(alphabet="中文分词😀 \n123abc，", max_size=40))
def test_export_matches_hf_on_random_text(trained: BPETokenizer, text: str) -> None:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(json.dumps(trained.to_hf_json()))
    assert hf.encode(text, add_special_tokens=False).ids == trained.encode(text)


def test_byte_alphabet_is_a_bijection() -> None:
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "Ġ"


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.text(alphabet="aab 中", min_size=1, max_size=24), min_size=1, max_size=10),
       vocab_size=st.integers(257, 320))
def test_trainer_equals_oracle_on_runs_of_one_symbol(words: list[str], vocab_size: int) -> None:
    # "aaaa" merges (a, a) twice, left to right; neighbouring occurrences turn the pair between them into (new, new)
    kw = dict(pattern=r"\S+|\s+", min_frequency=1, show_progress=False)
    fast, slow = train_bpe(words, vocab_size, **kw), train_bpe(words, vocab_size, algorithm="naive", **kw)
    assert fast.merges == slow.merges and fast.tokens == slow.tokens


ZH = ("自然语言处理是人工智能的一个重要方向，分词是中文处理的第一步。大语言模型的分词器把文本切成token，"
      "词表的大小影响模型的效率与压缩率。今天天气很好，我们去公园散步吧！机器学习、深度学习和强化学习。") * 3


@pytest.fixture(scope="module")
def zh_trained() -> BPETokenizer:
    return train_bpe([ZH, *CORPUS], 900, show_progress=False)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="自然语言处理是人工智能的一个重要方向分词中文第步，。！ a1😀", max_size=80) | st.text(max_size=40))
def test_character_shortcut_equals_plain_bpe(zh_trained: BPETokenizer, text: str) -> None:
    # encoding may start from whole characters (bpe._partial_char_fragments); it must change no id
    plain = BPETokenizer(zh_trained.tokens, zh_trained.merges, pattern=zh_trained.pattern)
    plain._unsafe = None
    assert zh_trained._unsafe is not None
    assert zh_trained.encode(text) == plain.encode(text)


def test_trained_on_chinese_matches_hf_tokenizers(zh_trained: BPETokenizer) -> None:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(json.dumps(zh_trained.to_hf_json()))
    for text in [ZH, *MIXED]:
        assert hf.encode(text, add_special_tokens=False).ids == zh_trained.encode(text)
