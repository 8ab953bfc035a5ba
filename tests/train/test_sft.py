"""Full-parameter SFT with THE loop: assistant-only loss, resumable batches, HF-loadable output."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.data.formats import Conversation, Message
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model, save_pretrained
from tinyllm.tokenizer.bpe import train_bpe
from tinyllm.train.sft import SFTBatches, SFTConfig, build_examples, load_conversations, run_sft

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    texts = ["你好，今天天气很好。", "把下面的中文翻译成英文。", "hello world", "新闻标题：经济增长"] * 10
    tok = train_bpe(texts, 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    show_progress=False, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                    eos_token_id=tok.eos_token_id))
    save_pretrained(model, d)
    tok.save(d)
    return d, tok


def _write_data(path, n=24):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": "把下面的中文翻译成英文。", "input": f"你好{i % 3}",
                                "output": "hello world"}, ensure_ascii=False) + "\n")


def test_examples_learn_only_assistant_tokens(base_dir) -> None:
    _, tok = base_dir
    conv = Conversation([Message("user", "你好"), Message("assistant", "hello world")])
    (ex,) = build_examples([conv], tok, CHATML, 512)
    learned = [i for i, lab in zip(ex.ids, ex.labels) if lab != -100]
    assert tok.decode(learned) == "hello world<|im_end|>\n"


def test_batches_resume_exactly(base_dir) -> None:
    _, tok = base_dir
    convs = [Conversation([Message("user", f"问题{i}"), Message("assistant", "回答" * (i % 4 + 1))])
             for i in range(7)]
    exs = build_examples(convs, tok, CHATML, 512)
    a = SFTBatches(exs, 3, pad_id=0, seed=1)
    for _ in range(3):
        next(a)
    b = SFTBatches(exs, 3, pad_id=0, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def _examples_of_lengths(lengths):
    from tinyllm.data.sft import SFTExample

    return [SFTExample(ids=[i % 7 + 1] * n, labels=[i % 7 + 1] * n) for i, n in enumerate(lengths)]


def test_length_grouped_batches_keep_each_epochs_examples_and_pad_less() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(3, 200, (203,), generator=g)]  # 203 = 25 batches of 8 + 3
    exs = _examples_of_lengths(lengths)
    plain = SFTBatches(exs, 8, pad_id=0, seed=1)
    grouped = SFTBatches(exs, 8, pad_id=0, seed=1, group_by_length=True)
    assert sorted(grouped._order.tolist()) == list(range(203))  # every example once per epoch
    assert grouped._order[-3:].tolist() == sorted(grouped._order[-3:].tolist(), key=lambda i: -lengths[i])
    # the same first permutation as ungrouped batching (an unchanged stream for group_by_length=False)
    assert plain._order.tolist() == SFTBatches(exs, 8, pad_id=0, seed=1)._order.tolist()
    w_plain, w_grouped = plain.widths(25), grouped.widths(25)
    assert sum(w_grouped) < 0.75 * sum(w_plain), (sum(w_grouped), sum(w_plain))
    # widths() peeks without drawing, and says what the batches will be, across the epoch boundary too
    got = [int(next(grouped)["input_ids"].shape[1]) for _ in range(40)]
    assert got[:25] == w_grouped
    again = SFTBatches(exs, 8, pad_id=0, seed=1, group_by_length=True)
    assert again.widths(40) == got
    # resumable: a copy loaded from the state draws the same batches
    a = SFTBatches(exs, 8, pad_id=0, seed=1, group_by_length=True)
    for _ in range(27):
        next(a)
    b = SFTBatches(exs, 8, pad_id=0, seed=1, group_by_length=True)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


def test_sft_steps_for_budget_prices_each_batch_by_its_width() -> None:
    from tinyllm.recipes.tiny_zh_plan import sft_steps_for_budget

    exs = _examples_of_lengths([65] * 40 + [129] * 40)  # widths 64 and 128 after the shift
    full = SFTBatches(exs, 8, pad_id=0, seed=0, group_by_length=True)
    widths = full.widths(10)
    assert sorted(set(widths)) == [64, 128]
    # 1 s per full-width (256) step: a batch of width 64 costs 0.25 s, of 128 0.5 s
    cost = [w / 256 for w in widths]
    budget = sum(cost[:7]) + 0.01
    assert sft_steps_for_budget(full, budget, 1.0, 256) == 7
    assert full.widths(10) == widths  # the estimate drew nothing


def test_sft_learning_rate_scales_with_the_square_root_of_the_planned_batch() -> None:
    from tinyllm.recipes.tiny_zh import SCALES
    from tinyllm.recipes.tiny_zh_plan import sft_learning_rate

    sc = SCALES["default"]
    assert sft_learning_rate(sc, sc.batch_size) == sc.sft_lr
    assert sft_learning_rate(sc, sc.batch_size // 2) == pytest.approx(sc.sft_lr / 2**0.5)
    assert sft_learning_rate(sc, sc.batch_size * 4) == pytest.approx(sc.sft_lr * 2)
    with pytest.raises(ValueError, match="batch=0"):
        sft_learning_rate(sc, 0)


def test_sft_rows_hold_the_tokens_of_the_planned_pretraining_batch() -> None:
    from tinyllm.recipes.tiny_zh import SCALES
    from tinyllm.recipes.tiny_zh_plan import sft_shape

    sc = SCALES["default"]  # pretraining 64 × 64, SFT rows up to 256 tokens
    assert sft_shape(sc, {"batch_size": sc.batch_size}) == (sc.batch_size * sc.seq_len // sc.sft_seq_len,
                                                              sc.sft_seq_len)
    assert sft_shape(sc, {"batch_size": sc.batch_size // 2})[0] * sc.sft_seq_len == sc.batch_size // 2 * sc.seq_len
    quick = SCALES["quick"]  # no separate SFT width: the pretraining shape
    assert sft_shape(quick, {"batch_size": 8}) == (8, quick.seq_len)
    assert sft_shape(quick, {}) == (quick.batch_size, quick.seq_len)


def test_run_sft_learns_and_saves_a_transformers_checkpoint(base_dir, tmp_path) -> None:
    d, tok = base_dir
    data = tmp_path / "data.jsonl"
    _write_data(data)
    cfg = SFTConfig(init_from=str(d), data=str(data), out_dir=str(tmp_path / "run"), max_steps=40,
                    batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=0, eval_steps=2, log_interval=5,
                    save_interval=0, val_fraction=0.1, progress=False, device="cpu")
    result = run_sft(cfg)
    assert result.losses[-1] < 0.5 * result.losses[0]
    final = tmp_path / "run" / "final"
    assert (final / "tokenizer.json").exists() and (final / "model.safetensors").exists()
    resolved = json.loads((tmp_path / "run" / "sft_config.json").read_text())
    assert resolved["num_train_examples"] + resolved["num_val_examples"] == 24
    from transformers import AutoModelForCausalLM

    from tinyllm.model.hf import load_model

    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    ours = load_model(final)
    ids = torch.tensor([tok.encode("你好")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_builtin_data_and_bad_config() -> None:
    convs = load_conversations("builtin:qa", max_examples=5)
    assert len(convs) == 5 and convs[0].messages[-1].role == "assistant"
    with pytest.raises(ValueError, match="init_from"):
        SFTConfig(data="x.jsonl")
    with pytest.raises(ValueError, match="max_length=1"):
        SFTConfig(init_from="m", data="x.jsonl", max_length=1)


def test_replay_mixes_pretraining_windows_all_learned(base_dir, tmp_path) -> None:
    from tinyllm.data.text import TokenShards, write_token_shards
    from tinyllm.train.sft import replay_examples

    d, _ = base_dir
    docs = [[(7 * i + j) % 50 + 1 for j in range(40)] for i in range(20)]
    write_token_shards(docs, tmp_path / "shards", vocab_size=64, eos_token_id=0)
    shards = TokenShards(tmp_path / "shards", "train")
    a = replay_examples(tmp_path / "shards", 6, 16, seed=3)
    assert len(a) == 6 and all(len(e.ids) == 16 and e.labels == e.ids and e.num_trained == 16 for e in a)
    assert [e.ids for e in a] == [e.ids for e in replay_examples(tmp_path / "shards", 6, 16, seed=3)]
    flat = [int(t) for t in shards.read(0, len(shards))]
    assert all(any(flat[i:i + 16] == e.ids for i in range(len(flat) - 15)) for e in a)  # real windows
    with pytest.raises(ValueError, match="fewer than one window"):
        replay_examples(tmp_path / "shards", 1, 10_000, seed=0)
    data = tmp_path / "data.jsonl"
    _write_data(data)
    cfg = SFTConfig(init_from=str(d), data=str(data), out_dir=str(tmp_path / "run"), max_steps=2,
                    batch_size=4, eval_interval=0, eval_steps=0, save_interval=0, val_fraction=0.0,
                    progress=False, device="cpu", replay_data=str(tmp_path / "shards"), replay_fraction=0.5,
                    max_length=64)
    run_sft(cfg)
    resolved = json.loads((tmp_path / "run" / "sft_config.json").read_text())
    assert resolved["num_replay_examples"] == 24 and resolved["num_train_examples"] == 48
    with pytest.raises(ValueError, match=r"replay_fraction=0\.5 needs --replay-data"):
        SFTConfig(init_from="m", data="x.jsonl", replay_fraction=0.5)
