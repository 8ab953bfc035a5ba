"""Reward model: Bradley–Terry loss (log 2 at a tie; equal to TRL 1.16's RewardTrainer loss, margin included),
the scalar read at the last non-pad token equal to transformers' LlamaForSequenceClassification, save/load,
and a short run that beats chance on held-out pairs."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tinyllm.data.preference import TokenPair
from tinyllm.train.loop import TrainConfig, train
from tinyllm.train.reward import (
    RewardConfig,
    RewardModel,
    RewardTask,
    bradley_terry_loss,
    load_reward_model,
    preference_accuracy,
)
from tinyllm.train.rl_common import last_token_index, pack_pairs
from tinyllm.train.tasks_arith import CharTokenizer, single_digit_additions, split_problems, tiny_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bradley_terry_values() -> None:
    r = torch.tensor([0.3, -1.0, 2.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))
    # r_c − r_r = 2 → −log σ(2) = 0.126928
    assert bradley_terry_loss(torch.tensor([1.5]), torch.tensor([-0.5])).item() == pytest.approx(0.126928, abs=1e-6)
    # a margin m asks for r_c − r_r > m: loss at a gap of exactly m is log 2
    assert bradley_terry_loss(torch.tensor([1.5]), torch.tensor([-0.5]), 2.0).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("margin", [None, 0.5])
def test_loss_equals_trl_reward_trainer(margin) -> None:
    pytest.importorskip("trl", reason="trl is the reward-model reference")
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(5, generator=g), torch.randn(5, generator=g)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=None),
                           accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(10, 3, dtype=torch.long), "attention_mask": torch.ones(10, 3)}
    if margin is not None:
        inputs["margin"] = torch.full((5,), margin)

    def model(**kw):
        return SimpleNamespace(logits=torch.cat([rc, rr])[:, None])

    theirs = RewardTrainer.compute_loss(fake, model, inputs)
    torch.testing.assert_close(bradley_terry_loss(rc, rr, margin), theirs)


def test_last_token_equals_transformers_sequence_classification(tmp_path) -> None:
    from transformers import LlamaForSequenceClassification

    tok = CharTokenizer()
    rm = RewardModel(tiny_policy(tok, seed=3)).eval()
    rm.save_pretrained(tmp_path / "rm")
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1).eval()
    hf.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        hf.score.weight.copy_(rm.score.weight)
    batch = pack_pairs([[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11, 12], [13]], tok.pad_token_id)
    assert last_token_index(batch["attention_mask"]).tolist() == [4, 4, 2]
    with torch.no_grad():
        ours = rm(batch["input_ids"], batch["attention_mask"])
        theirs = hf(batch["input_ids"]).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # per-token values: the same head at every position
    with torch.no_grad():
        v = rm.values(batch["input_ids"])
    torch.testing.assert_close(v[torch.arange(3), last_token_index(batch["attention_mask"])], ours)
    # save / load round trip
    again = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]), ours)
    with pytest.raises(FileNotFoundError, match="score_head"):
        load_reward_model(tmp_path)


def _pairs(tok, problems, seed):
    """chosen: the right sum; rejected: a sloppy copy of it ("8=") or a wrong sum, alternately."""
    rng = random.Random(seed)
    eos = [tok.eos_token_id]
    out = []
    for i, p in enumerate(problems):
        rej = p.answer + "=" if i % 2 else str((int(p.answer) + rng.randint(1, 9)) % 19)
        out.append(TokenPair(tok.encode(p.prompt), tok.encode(p.answer) + eos, tok.encode(rej) + eos))
    return out


def test_reward_model_beats_chance_on_heldout_pairs(tmp_path) -> None:
    tok = CharTokenizer()
    train_p, held_p = split_problems(single_digit_additions(), 30, seed=0)
    rm = RewardModel(tiny_policy(tok, seed=0))
    held = _pairs(tok, held_p, 1)
    before = preference_accuracy(rm, held, tok.pad_token_id)
    task = RewardTask(_pairs(tok, train_p, 0), held, 16, tok.pad_token_id)
    result = train(rm, task, TrainConfig(out_dir=str(tmp_path), max_steps=30, batch_size=16, lr=3e-3, min_lr=3e-3,
                                         warmup_steps=0, weight_decay=0.0, eval_interval=0, eval_steps=4,
                                         save_interval=0, progress=False, device="cpu", seed=0))
    after = preference_accuracy(rm, held, tok.pad_token_id)
    assert after["accuracy"] >= 0.7 and after["accuracy"] > before["accuracy"] + 0.15, (before, after)
    assert after["margin"] > 0 and after["loss"] < math.log(2)
    # the loop checkpointed the wrapper through its save_pretrained: it loads back as a RewardModel
    saved = load_reward_model(tmp_path / "checkpoints" / "step-000030")
    assert preference_accuracy(saved, held, tok.pad_token_id)["accuracy"] == pytest.approx(after["accuracy"])
    assert result.eval_losses  # the held-out BT loss was evaluated


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="init_from"):
        RewardConfig()
    with pytest.raises(ValueError, match="max_length=1"):
        RewardConfig(init_from="x", max_length=1)
    with pytest.raises(ValueError, match="val_fraction=1"):
        RewardConfig(init_from="x", val_fraction=1)
