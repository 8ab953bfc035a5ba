"""`tinyllm reward | dpo | ppo | grpo` end to end on a tiny checkpoint with a byte-level BPE tokenizer: each
writes its resolved config, a final checkpoint and a before/after metrics file; PPO scores with the reward model
trained by `tinyllm reward`; GRPO rolls out through the engine."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--max-steps", "2", "--batch-size", "2", "--progress", "false", "--device", "cpu", "--log-interval", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tinyllm.data.corpora import inews
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model, save_pretrained
    from tinyllm.tokenizer.bpe_train import train_bpe
    from tinyllm.tokenizer.chat import CHATML_TEMPLATE

    d = tmp_path_factory.mktemp("base")
    texts = [f"{a.title}\n{a.content}" for a in inews("test")[:40]] + ["1+2=3 4+5=9 0123456789"]
    tok = train_bpe(texts, 320, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                    show_progress=False)
    tok.save(d)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    save_pretrained(build_model(cfg), d)
    return d


def test_reward_then_ppo(base, tmp_path) -> None:
    out = tmp_path / "rm"
    assert main(["reward", "--init-from", str(base), "--data", "builtin:sentiment", "--max-pairs", "12",
                 "--max-length", "96", "--val-fraction", "0.25", "--out-dir", str(out), *COMMON]) == 0
    m = json.loads((out / "reward_metrics.json").read_text())
    assert 0 <= m["after"]["accuracy"] <= 1 and m["after"]["pairs"] == 3
    assert (out / "final" / "score_head.safetensors").exists() and (out / "final" / "tokenizer.json").exists()
    assert json.loads((out / "reward_config.json").read_text())["num_train_pairs"] == 9
    ppo = tmp_path / "ppo"
    assert main(["ppo", "--init-from", str(base), "--task", "builtin:sentiment", "--reward-model",
                 str(out / "final"), "--num-prompts", "4", "--num-heldout", "2", "--rollout-batch-size", "2",
                 "--ppo-epochs", "1", "--max-new-tokens", "4", "--eval-samples", "1", "--out-dir", str(ppo),
                 *COMMON]) == 0
    m = json.loads((ppo / "ppo_metrics.json").read_text())
    assert isinstance(m["heldout_mean_reward_before"], float) and len(m["rollouts"]) == 2
    assert (ppo / "final" / "critic.safetensors").exists()
    from tinyllm.model.hf import load_model

    load_model(ppo / "final")  # the actor is a plain causal-LM checkpoint


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo(base, tmp_path, loss_type) -> None:
    out = tmp_path / "dpo"
    assert main(["dpo", "--init-from", str(base), "--data", "builtin:title", "--max-pairs", "8", "--max-length",
                 "96", "--val-fraction", "0.25", "--loss-type", loss_type, "--out-dir", str(out), *COMMON]) == 0
    m = json.loads((out / "dpo_metrics.json").read_text())
    assert m["before"]["accuracy"] == 0.0 and m["before"]["margin"] == 0.0  # π = π_ref before training
    assert (out / "final" / "model.safetensors").exists() and (out / "dpo_config.json").exists()


def test_grpo_with_engine_rollouts(base, tmp_path) -> None:
    out = tmp_path / "grpo"
    assert main(["grpo", "--init-from", str(base), "--task", "arith", "--num-prompts", "4", "--num-heldout", "2",
                 "--num-generations", "2", "--max-new-tokens", "3", "--backend", "engine", "--eval-samples", "1",
                 "--out-dir", str(out), *COMMON]) == 0
    m = json.loads((out / "grpo_metrics.json").read_text())
    assert 0 <= m["heldout_mean_reward_after"] <= 1 and len(m["rollouts"]) == 2


def test_bad_flags(base, capsys) -> None:
    assert main(["dpo", "--init-from", str(base), "--beta", "0"]) == 2
    assert "beta=0.0 must be > 0" in capsys.readouterr().err
    assert main(["grpo", "--init-from", str(base), "--task", "poems"]) == 2
    assert "task='poems'" in capsys.readouterr().err
