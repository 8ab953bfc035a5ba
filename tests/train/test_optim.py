"""AdamW parameter groups and learning-rate schedules (tinyllm/train/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllm.model.config import ModelConfig
from tinyllm.model.transformer import CausalLM
from tinyllm.train.optim import build_optimizer, cosine_lr, lr_at, param_groups, wsd_lr

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)


def test_decay_only_on_matrices_including_embeddings() -> None:
    model = CausalLM(ModelConfig(**TINY, tie_word_embeddings=True))
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = {id(p) for p in decay["params"]}
    assert id(model.model.embed_tokens.weight) in ids  # nanoGPT convention: embeddings decay
    assert id(model.model.layers[0].self_attn.q_proj.bias) in {id(p) for p in no_decay["params"]}
    # the tied embedding / lm_head matrix is one parameter, listed once
    assert len(ids) == len(decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_frozen_parameters_are_left_out_and_empty_set_is_an_error() -> None:
    model = CausalLM(ModelConfig(**TINY))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.named_parameters(), 1e-3, 0.1)
    model.lm_head.weight.requires_grad_(True)
    opt = build_optimizer(model.named_parameters(), 1e-3, 0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [1]


def test_cosine_equals_transformers_with_min_lr_zero() -> None:
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    for sched_fn, name in ((get_cosine_schedule_with_warmup, "cosine"),
                           (get_constant_schedule_with_warmup, "constant")):
        opt = torch.optim.SGD([p], lr=3e-3)
        kw = {"num_training_steps": 50} if name == "cosine" else {}
        sched = sched_fn(opt, num_warmup_steps=7, **kw)
        for step in range(51):  # past the end transformers' cosine rises again; ours holds min_lr
            ours = lr_at(step, name, 3e-3, 0.0, 7, 50)
            assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), (name, step)
            opt.step()
            sched.step()


def test_schedule_values_by_hand() -> None:
    # warmup: update s uses lr·s/W
    assert cosine_lr(0, 1.0, 0.1, 10, 110) == 0.0
    assert cosine_lr(5, 1.0, 0.1, 10, 110) == 0.5
    # cosine: halfway through the decay lands halfway between lr and min_lr; the end at min_lr
    assert cosine_lr(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert cosine_lr(35, 1.0, 0.1, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert cosine_lr(500, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    # WSD over 100 steps with the last 20 decaying: stable until 80
    assert wsd_lr(50, 1.0, 0.0, 10, 100, 0.2) == 1.0
    assert wsd_lr(80, 1.0, 0.0, 10, 100, 0.2) == 1.0
    assert wsd_lr(90, 1.0, 0.0, 10, 100, 0.2, "linear") == pytest.approx(0.5)
    assert wsd_lr(85, 1.0, 0.2, 10, 100, 0.2, "linear") == pytest.approx(1.0 - 0.8 * 0.25)
    assert wsd_lr(85, 1.0, 0.0, 10, 100, 0.2, "sqrt") == pytest.approx(0.5)  # 1 − √0.25
    assert wsd_lr(100, 1.0, 0.1, 10, 100, 0.2, "sqrt") == pytest.approx(0.1)
    assert lr_at(3, "constant", 2.0, 0.0, 4, 10) == 1.5 and lr_at(9, "constant", 2.0, 0.0, 4, 10) == 2.0
    with pytest.raises(ValueError, match="schedule='step'"):
        lr_at(0, "step", 1.0, 0.0, 0, 10)
    with pytest.raises(ValueError, match="decay_shape='exp'"):
        wsd_lr(95, 1.0, 0.0, 0, 100, 0.2, "exp")
