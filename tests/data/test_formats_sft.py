"""Instruction formats → Conversation → ids with assistant-only labels; padding ≡ packing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tinyllm.data.formats import Conversation, FormatError, Message, read_conversations, to_conversation
from tinyllm.data.sft import (
    IGNORE_INDEX,
    TemplateError,
    block_causal_mask,
    pack_examples,
    pad_collate,
    stack_packed,
    tokenize_conversation,
)
from tinyllm.model.attention import AttnMeta
from tinyllm.model.config import ModelConfig
from tinyllm.model.transformer import CausalLM


def chatml(messages, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode(text):  # one id per character, small enough for a tiny model
    return [ord(c) % 200 + 1 for c in text]


def test_three_formats_give_the_same_conversation() -> None:
    alpaca = {"instruction": "翻译", "input": "你好", "output": "hello", "system": "s"}
    sharegpt = {"system": "s", "conversations": [{"from": "human", "value": "翻译\n\n你好"},
                                                   {"from": "gpt", "value": "hello"}]}
    openai = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "翻译\n\n你好"},
                           {"role": "assistant", "content": "hello"}]}
    convs = [to_conversation(r) for r in (alpaca, sharegpt, openai)]
    assert convs[0] == convs[1] == convs[2]
    hist = to_conversation({"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]})
    assert [m.role for m in hist.messages] == ["user", "assistant", "user", "assistant"]


def test_bad_records_name_the_problem(tmp_path) -> None:
    with pytest.raises(FormatError, match="speaker 'robot'"):
        to_conversation({"conversations": [{"from": "robot", "value": "x"}]})
    with pytest.raises(FormatError, match="no assistant"):
        to_conversation({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(FormatError, match="match no format"):
        to_conversation({"text": "x"})
    with pytest.raises(FormatError, match="role='bot'"):
        Message("bot", "x")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + "{bad\n", encoding="utf-8")
    it = read_conversations(p)
    assert next(it).messages[-1].content == "b"
    with pytest.raises(FormatError, match=r"d\.jsonl:2"):
        next(it)


def test_only_assistant_tokens_are_learned() -> None:
    conv = Conversation([Message("system", "sys"), Message("user", "u1"), Message("assistant", "A1"),
                         Message("user", "u2"), Message("assistant", "B22")])
    ex = tokenize_conversation(conv, chatml, encode)
    assert ex.ids == encode(chatml(conv.as_dicts(), False))
    learned = "".join(chr((i - 1) % 200) for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE_INDEX)
    assert learned == "A1<|im_end|>\nB22<|im_end|>\n"
    short = tokenize_conversation(conv, chatml, encode, max_length=10)
    assert len(short.ids) == 10


def test_unstable_template_is_refused() -> None:
    def bad(messages, add_generation_prompt):
        return str(len(messages)) + "".join(m["content"] for m in messages)

    with pytest.raises(TemplateError):
        tokenize_conversation(Conversation([Message("user", "a"), Message("assistant", "b")]), bad, encode)


def _convs(n: int) -> list[Conversation]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = int(torch.randint(1, 12, (1,), generator=g))
        out.append(Conversation([Message("user", "问" * k), Message("assistant", f"答{i}" * (k % 5 + 1))]))
    return out


def test_padding_batch_shapes_and_shift() -> None:
    exs = [tokenize_conversation(c, chatml, encode) for c in _convs(3)]
    batch = pad_collate(exs, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape
    for r, ex in enumerate(exs):
        n = len(ex.ids) - 1
        assert batch["input_ids"][r, :n].tolist() == ex.ids[:-1]
        assert batch["labels"][r, :n].tolist() == ex.labels[1:]
        assert (batch["labels"][r, n:] == IGNORE_INDEX).all()


def test_packing_with_document_mask_equals_padding() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = CausalLM(cfg).eval()
    exs = [tokenize_conversation(c, chatml, encode) for c in _convs(6)]
    padded = pad_collate(exs, pad_id=0)
    with torch.no_grad():
        logits = model(padded["input_ids"])
        loss_pad = F.cross_entropy(logits.flatten(0, 1), padded["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        rows = pack_examples(exs, seq_len=256, pad_id=0)
        assert len(rows) < len(exs)
        packed = stack_packed(rows)
        meta = AttnMeta(mask=block_causal_mask(packed["doc_ids"]), k_positions=packed["positions"])
        logits_p = model(packed["input_ids"], positions=packed["positions"], attn_meta=meta)
        loss_pack = F.cross_entropy(logits_p.flatten(0, 1), packed["labels"].flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum")
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-3, rtol=1e-5)
