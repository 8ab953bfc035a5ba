"""`tinyllm sft --peft ...` end to end on a tiny model: the adapter directory, PEFT loading it, merging."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model, load_model, save_pretrained
from tinyllm.tokenizer.bpe import train_bpe
from tinyllm.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hf_helpers import randomize_

    d = tmp_path_factory.mktemp("base")
    texts = ["你好，今天天气很好。", "把下面的中文翻译成英文。", "hello world", "新闻标题：经济增长"] * 10
    tok = train_bpe(texts, 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    show_progress=False, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
    torch.manual_seed(0)
    model = randomize_(build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               max_position_embeddings=256, eos_token_id=tok.eos_token_id)))
    save_pretrained(model, d)
    tok.save(d)
    data = d.parent / "data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(24):
            f.write(json.dumps({"instruction": "把下面的中文翻译成英文。", "input": f"你好{i % 3}",
                                "output": "hello world"}, ensure_ascii=False) + "\n")
    return d, tok, data


def _cfg(setup, out, **kw) -> SFTConfig:
    d, _, data = setup
    base = dict(init_from=str(d), data=str(data), out_dir=str(out), max_steps=30, batch_size=4, lr=2e-2,
                warmup_steps=2, eval_interval=0, eval_steps=2, log_interval=5, save_interval=0, val_fraction=0.1,
                progress=False, device="cpu")
    return SFTConfig(**{**base, **kw})


def test_sft_peft_lora_end_to_end(setup, tmp_path) -> None:
    peft = pytest.importorskip("peft", reason="HF PEFT loads the adapter")
    from transformers import AutoModelForCausalLM

    d, tok, _ = setup
    result = run_sft(_cfg(setup, tmp_path / "run", peft="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["all-linear"], save_merged=True))
    assert result.losses[-1] < 0.5 * result.losses[0]
    adapter = tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    ckpt = tmp_path / "run" / "checkpoints" / "step-000030"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    ids = torch.tensor([tok.encode("你好")])
    ours = load_model(d, adapter=adapter)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d), adapter).eval()
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        # --save-merged: the base with ΔW folded in, a plain HF checkpoint
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(load_model(d)(ids), expected)


@pytest.mark.parametrize("method", ["qlora", "prefix", "bitfit"])
def test_sft_other_methods_run_and_save_adapters(method, setup, tmp_path) -> None:
    d, tok, _ = setup
    result = run_sft(_cfg(setup, tmp_path / "run", peft=method, max_steps=12, lr=5e-2, num_virtual_tokens=4,
                          target_modules=["all-linear"] if method == "bitfit" else ["q_proj", "v_proj"]))
    assert result.losses[-1] < result.losses[0]
    kind = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["peft_type"]
    assert kind == {"qlora": "LORA", "prefix": "PREFIX_TUNING", "bitfit": "BITFIT"}[method]
    assert not (tmp_path / "run" / "final").exists()
    with torch.no_grad():
        load_model(d, adapter=tmp_path / "run" / "adapter")(torch.tensor([tok.encode("你好")]))


def test_sft_peft_flags_on_the_command_line(setup, tmp_path) -> None:
    from tinyllm.cli import main

    d, _, data = setup
    rc = main(["sft", "--init-from", str(d), "--data", str(data), "--out-dir", str(tmp_path / "cli"),
               "--max-steps", "2", "--batch-size", "2", "--peft", "lora", "--lora-r", "2", "--lora-alpha", "4",
               "--target-modules", "q_proj", "v_proj", "--progress", "false", "--eval-steps", "0",
               "--device", "cpu"])
    assert rc in (0, None)
    cfg = json.loads((tmp_path / "cli" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (2, 4.0, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="peft='ia3'"):
        SFTConfig(init_from="m", data="x.jsonl", peft="ia3")
    with pytest.raises(ValueError, match="save_merged=True needs peft lora or qlora"):
        SFTConfig(init_from="m", data="x.jsonl", peft="prompt", save_merged=True)
