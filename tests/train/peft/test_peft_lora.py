"""LoRA: identity at init, merge ≡ unmerged, gradients only into the factors, several adapters, accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model
from tinyllm.train.peft import (
    LoraConfig,
    apply_lora,
    delete_adapter,
    disable_adapters,
    merge_adapters,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_report,
    unmerge_adapters,
)
from tinyllm.train.peft.lora import LoraLinear, lora_layers, lora_parameter_count
from tinyllm.train.peft.select import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(CFG).eval()


def _x() -> torch.Tensor:
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def test_zero_b_leaves_outputs_unchanged() -> None:
    m = _model()
    x = _x()
    ref = m(x)
    apply_lora(m, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(m(x), ref)  # B = 0 ⇒ ΔW = 0 exactly
    a = m.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    bound = 1 / 32**0.5  # kaiming_uniform(a=√5) on fan_in 32: U(−1/√fan_in, 1/√fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound


def test_merged_equals_unmerged_and_unmerge_restores() -> None:
    m = _model()
    x = _x()
    w0 = m.model.layers[1].mlp.down_proj.weight.detach().clone()
    apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    out = m(x)
    merge_adapters(m)
    torch.testing.assert_close(m(x), out, atol=1e-5, rtol=0)
    lin = m.model.layers[1].mlp.down_proj
    torch.testing.assert_close(lin.base_layer.weight, w0 + lin.delta_weight("default"), atol=1e-6, rtol=0)
    unmerge_adapters(m)
    torch.testing.assert_close(lin.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x), out, atol=1e-5, rtol=0)
    merge_and_unload(m)
    assert not any(isinstance(mod, LoraLinear) for mod in m.modules())
    assert type(m.model.layers[1].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(m(x), out, atol=1e-5, rtol=0)


def test_scaling_alpha_over_r_and_rslora() -> None:
    assert LoraConfig(r=8, lora_alpha=16).scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    m = _model()
    apply_lora(m, LoraConfig(r=4, lora_alpha=12, target_modules=["v_proj"], init_lora_weights=False))
    lin = m.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    manual = lin.base_layer(x) + 3.0 * x @ lin.lora_A["default"].weight.T @ lin.lora_B["default"].weight.T
    torch.testing.assert_close(lin(x), manual, atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(lin.delta_weight("default")) <= 4  # rank(ΔW) ≤ r


def test_only_adapter_parameters_receive_gradients() -> None:
    m = _model()
    apply_lora(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    m.train()
    m(_x()).float().pow(2).mean().backward()
    for name, p in m.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
    # B = 0 at init: A gets no gradient signal yet, B does
    assert m.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad.abs().sum() > 0


def test_multiple_adapters_switch_disable_delete() -> None:
    m = _model()
    x = _x()
    base = m(x)
    apply_lora(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "one")
    out_one = m(x)
    apply_lora(m, LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False), "two")
    out_two = m(x)
    assert not torch.allclose(out_one, out_two)
    set_adapter(m, "one")
    torch.testing.assert_close(m(x), out_one, atol=0, rtol=0)  # switching back runs the very same ops
    # only the active adapter trains
    assert m.model.layers[0].self_attn.q_proj.lora_A["one"].weight.requires_grad
    assert not m.model.layers[0].self_attn.o_proj.lora_A["two"].weight.requires_grad
    with disable_adapters(m):
        torch.testing.assert_close(m(x), base, atol=0, rtol=0)  # only the base layer runs, as before LoRA
    set_adapter(m, ["one", "two"])  # both: the deltas add up
    both = m(x)
    assert not torch.allclose(both, out_one) and not torch.allclose(both, out_two)
    delete_adapter(m, "two")
    set_adapter(m, "one")
    torch.testing.assert_close(m(x), out_one, atol=0, rtol=0)  # switching back runs the very same ops
    with pytest.raises(ValueError, match="'two' is not on the model"):
        set_adapter(m, "two")


def test_target_selection_follows_peft_rules() -> None:
    m = _model()
    assert find_targets(m, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(m, r"model\.layers\.1\..*_proj") == [
        f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert "lm_head" not in find_targets(m, "all-linear") and len(find_targets(m, "all-linear")) == 14
    with pytest.raises(ValueError, match="matches no"):
        find_targets(m, "proj")
    with pytest.raises(ValueError, match="matches no"):
        apply_lora(m, LoraConfig(target_modules=["query"]))


def test_trainable_report_matches_peft_on_the_same_transformers_model(tiny_hf_checkpoint, capsys) -> None:
    peft = pytest.importorskip("peft", reason="HF PEFT is the reference")
    from transformers import AutoModelForCausalLM

    from tinyllm.model.hf import load_model

    path = tiny_hf_checkpoint("llama")
    ours = apply_lora(load_model(path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                 peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = theirs.get_nb_trainable_parameters()
    capsys.readouterr()  # drop what loading printed (progress bars, a DeepSpeed accelerator notice)
    report = print_trainable_parameters(ours)
    assert (report.trainable, report.total) == (trainable, total)
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,} || all params: {total:,}")


def test_parameter_count_worked_numbers() -> None:
    # notes 98.4.d: a 1000×1000 update factored as 1000×2 · 2×1000 → 4,000 parameters = 0.4 %
    assert lora_parameter_count(1000, 1000, 2) == 4000 and 4000 / 1000**2 == 0.004
    m = _model()
    apply_lora(m, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    d, kv = 32, 2 * 8  # k/v project to H_kv·d_head = 16
    per_layer = sum(lora_parameter_count(d, o, 8) for o in (32, kv, kv)) + lora_parameter_count(32, d, 8)
    assert trainable_report(m).trainable == 2 * per_layer
    assert len(list(lora_layers(m))) == 8


def test_bad_configs_name_the_value() -> None:
    for kw, match in (({"r": 0}, "r=0"), ({"lora_alpha": -1}, "lora_alpha=-1"), ({"lora_dropout": 1.0},
                      "lora_dropout=1.0"), ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'")):
        with pytest.raises(ValueError, match=match):
            LoraConfig(**kw)
    m = apply_lora(_model(), LoraConfig())
    with pytest.raises(ValueError, match="already on the model"):
        apply_lora(m, LoraConfig())


def test_merged_model_saves_a_transformers_checkpoint(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from tinyllm.model.hf import save_pretrained

    m = _model()
    x = _x()
    apply_lora(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    out = m(x)
    save_pretrained(merge_and_unload(m), tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, out, atol=1e-5, rtol=0)
