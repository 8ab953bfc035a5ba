"""AdamW parameter groups and learning-rate schedules (tinyllm/train/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllm.model.config import ModelConfig
from tinyllm.model.transformer import CausalLM
from tinyllm.train.optim import MuonAdamW, build_optimizer, cosine_lr, lr_at, param_groups, wsd_lr

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


def test_muon_takes_hidden_matrices_and_adamw_the_rest() -> None:
    model = CausalLM(ModelConfig(**TINY, tie_word_embeddings=True))
    opt = build_optimizer(model.named_parameters(), 1e-3, 0.1, kind="muon")
    assert isinstance(opt, MuonAdamW)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert id(model.model.embed_tokens.weight) in adam_ids  # embeddings and the (tied) head stay on AdamW
    assert id(model.model.layers[0].self_attn.q_proj.weight) in muon_ids
    assert id(model.model.layers[0].mlp.down_proj.weight) in muon_ids
    assert not muon_ids & adam_ids
    assert len(muon_ids | adam_ids) == len({id(p) for p in model.parameters()})
    # one lr assignment reaches both optimizers (the loop sets every group's lr each step)
    for g in opt.param_groups:
        g["lr"] = 5e-4
    assert all(g["lr"] == 5e-4 for o in (opt.muon, opt.adamw) for g in o.param_groups)


def test_adamw_lr_scale_runs_the_adamw_part_of_muon_at_a_multiple_of_the_schedule(tmp_path) -> None:
    from tinyllm.train.loop import TrainConfig

    torch.manual_seed(0)
    a = CausalLM(ModelConfig(**TINY, tie_word_embeddings=True))
    b = CausalLM(ModelConfig(**TINY, tie_word_embeddings=True))
    b.load_state_dict(a.state_dict())
    scaled = build_optimizer(a.named_parameters(), 1e-3, 0.1, kind="muon", adamw_lr_scale=10.0)
    assert all(g["lr"] == 1e-2 and g["lr_scale"] == 10.0 for g in scaled.adamw.param_groups)
    assert all(g["lr"] == 1e-3 and "lr_scale" not in g for g in scaled.muon.param_groups)
    # one step at scheduled lr 2e-3: the AdamW part moves as a plain AdamW at 2e-2, the Muon part as at 2e-3
    plain = build_optimizer(b.named_parameters(), 2e-3, 0.1, kind="muon")
    for g in plain.adamw.param_groups:
        g["lr"] = 2e-2
    for g in scaled.param_groups:  # what the training loop does each step
        g["lr"] = 2e-3 * g.get("lr_scale", 1.0)
    ids = torch.randint(0, 64, (2, 12))
    for model, opt in ((a, scaled), (b, plain)):
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=n)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="adamw_lr_scale"):
            build_optimizer(a.named_parameters(), 1e-3, 0.1, kind="muon", adamw_lr_scale=bad)
    with pytest.raises(ValueError, match="optimizer='muon'"):
        build_optimizer(a.named_parameters(), 1e-3, 0.1, adamw_lr_scale=3.0)
    with pytest.raises(ValueError, match=r"adamw_lr_scale=3\.0 applies to optimizer='muon'"):
        TrainConfig(out_dir=str(tmp_path), adamw_lr_scale=3.0)


def test_muon_update_equals_torch_muon_and_state_round_trips() -> None:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**TINY))
    twin = CausalLM(ModelConfig(**TINY))
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model.named_parameters(), 1e-2, 0.1, kind="muon")
    opt.muon.ns_dtype = torch.bfloat16  # torch.optim.Muon iterates in bf16
    w, tw = model.model.layers[0].self_attn.q_proj.weight, twin.model.layers[0].self_attn.q_proj.weight
    ref = torch.optim.Muon([tw], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    x = torch.randint(0, 64, (2, 12))
    for m in (model, twin):
        m(x).float().square().mean().backward()
    opt.step()
    ref.step()
    torch.testing.assert_close(w, tw, atol=1e-6, rtol=0)
    state = opt.state_dict()
    opt2 = build_optimizer(model.named_parameters(), 1e-2, 0.1, kind="muon")
    opt2.load_state_dict(state)
    assert torch.equal(opt2.muon.state[w]["momentum_buffer"], opt.muon.state[w]["momentum_buffer"])
    with pytest.raises(ValueError, match="muon"):
        opt2.load_state_dict(torch.optim.AdamW([w]).state_dict())
    with pytest.raises(ValueError, match="optimizer='lion'"):
        build_optimizer(model.named_parameters(), 1e-2, 0.1, kind="lion")


def test_newton_schulz_orthogonalises_in_fp32_too() -> None:
    from tinyllm.train.muon import newton_schulz

    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(g, dtype=torch.float32)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.6 and s.max() < 1.25  # singular values pushed towards 1
    torch.testing.assert_close(newton_schulz(g.T, dtype=torch.float32), o.T)  # tall = transposed wide
    torch.testing.assert_close(o, newton_schulz(g, dtype=torch.bfloat16).float(), atol=0.05, rtol=0)
