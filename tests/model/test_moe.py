"""Mixture of Experts: routers, capacity, losses, sparse ≡ dense, and Mixtral parity with transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.configuration_switch_transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersTop1Router,
    router_z_loss_func,
)

from tinyllm.model.config import ConfigError, ModelConfig
from tinyllm.model.hf import build_model, hf_to_tinyllm, load_model, load_state_dict_into, save_pretrained
from tinyllm.model.moe import MoE, expert_capacity, load_balancing_loss, moe_from_hf, router_z_loss


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4,
                num_experts_per_tok=2, initializer_range=0.1, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def hf_mixtral(sliding_window: int | None = None) -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, sliding_window=sliding_window, initializer_range=0.1,
                        attn_implementation="eager")
    return MixtralForCausalLM(cfg).eval()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ HF parity (the spine)
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_hf_mixtral_checkpoint_loads_with_equal_logits(tmp_path, sliding_window):
    hf = hf_mixtral(sliding_window)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.sliding_window == sliding_window
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-4, rtol=0)


def test_sliding_window_changes_logits_so_the_parity_above_means_something():
    hf_full, hf_window = hf_mixtral(None), hf_mixtral(5)
    with torch.no_grad():
        assert not torch.allclose(hf_full(IDS).logits, hf_window(IDS).logits, atol=1e-4)


def test_transformers5_fused_in_memory_layout_imports():
    hf = hf_mixtral()
    sd = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd  # the layout this test exists for
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    ours = build_model(cfg).eval()
    load_state_dict_into(ours, hf_to_tinyllm(cfg, dict(sd)), "in-memory")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-4, rtol=0)


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    ours = build_model(tiny_cfg()).eval()
    save_pretrained(ours, tmp_path)
    hf = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours(IDS), atol=1e-4, rtol=0)


def test_parameter_names():
    names = set(build_model(tiny_cfg(num_shared_experts=1)).state_dict())
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.3.gate_proj.weight",
            "model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
            "model.layers.1.mlp.shared_experts.0.down_proj.weight"} <= names


def test_fused_tensor_with_wrong_expert_count_is_named():
    bad = {"model.layers.0.mlp.experts.down_proj": torch.zeros(3, 64, 96)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj.*num_local_experts=4"):
        moe_from_hf(tiny_cfg(), bad)


@pytest.mark.parametrize("change", [dict(router_type="switch"), dict(num_shared_experts=1)])
def test_export_refuses_what_mixtral_cannot_express(tmp_path, change):
    with pytest.raises(ConfigError, match="MoE exports only as mixtral"):
        save_pretrained(build_model(tiny_cfg(**change)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ routers
def block(**kw) -> MoE:
    torch.manual_seed(0)
    return MoE(tiny_cfg(**kw)).eval()


X = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))


def combine_matrix(moe: MoE) -> torch.Tensor:
    r = moe.routing
    return torch.zeros_like(r.probs).scatter_add_(1, r.experts, r.weights * r.keep)  # [N, E]


@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_nonzero_gates_summing_to_one(router, k):
    moe = block(router_type=router, num_experts_per_tok=k).train()
    moe(X)
    c = combine_matrix(moe)
    assert ((c > 0).sum(-1) == k).all()
    torch.testing.assert_close(c.sum(-1), torch.ones(18))


def test_topk_router_matches_mixtral_router():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    moe = block()
    hf = MixtralTopKRouter(hf_mixtral().config)
    hf.weight.data.copy_(moe.gate.weight.data)
    logits, scores, idx = hf(X.reshape(-1, 64))
    r = moe.gate(X.reshape(-1, 64))
    torch.testing.assert_close(r.logits, logits)
    assert torch.equal(r.experts, idx)
    torch.testing.assert_close(r.weights, scores)


def test_noise_only_in_training():
    moe = block(router_type="noisy_topk")
    torch.manual_seed(3)
    a = moe(X)
    torch.manual_seed(4)
    assert torch.equal(moe(X), a)  # eval: H = x W_g, deterministic whatever the RNG
    moe.train()
    torch.manual_seed(3)
    b = moe(X)
    torch.manual_seed(4)
    assert not torch.allclose(moe(X), b)


def test_router_runs_in_float32_for_bf16_inputs():
    moe = block().to(torch.bfloat16)
    y = moe(X.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and moe.router_logits.dtype == torch.float32


# ------------------------------------------------------------------ Switch capacity
def test_capacity_matches_the_note_example():
    assert expert_capacity(6, 3, 1.0) == 2
    assert expert_capacity(6, 3, 1.5) == 3
    assert expert_capacity(10, 4, 1.2) == 3  # no float round-up to 4


def switch_example(cf: float) -> tuple[MoE, torch.Tensor]:
    """6 tokens, 3 experts; tokens choose experts [0, 1, 1, 1, 2, 0] (expert 1 gets 3)."""
    moe = MoE(tiny_cfg(hidden_size=3, intermediate_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                       num_local_experts=3, router_type="switch", expert_capacity_factor=cf)).eval()
    moe.gate.weight.data = 5 * torch.eye(3)
    x = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 2, 0]), 3).float()[None]  # [1, 6, 3]
    return moe, x


def test_switch_drops_overflow_in_token_order_and_passes_it_through_as_zero():
    moe, x = switch_example(1.0)
    y = moe(x)
    assert moe.routing.keep[:, 0].tolist() == [True, True, True, False, True, True]
    assert torch.equal(y[0, 3], torch.zeros(3)) and (y[0, 2] != 0).any()  # a dropped token gets exactly 0
    moe, x = switch_example(1.5)
    moe(x)
    assert moe.routing.keep.all()


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 2.0])
def test_switch_routing_matches_transformers_top1_router(cf):
    moe = block(router_type="switch", expert_capacity_factor=cf)
    flat = X.reshape(1, -1, 64)  # one group: drop order = token order over the flattened batch
    cap = expert_capacity(flat.shape[1], 4, cf)
    hf = SwitchTransformersTop1Router(SwitchTransformersConfig(
        num_experts=4, expert_capacity=cap, d_model=64, router_bias=False, router_jitter_noise=0.0,
        router_dtype="float32")).eval()
    hf.classifier.weight.data.copy_(moe.gate.weight.data)
    dispatch, probs, _ = hf(flat)
    r = moe.gate(flat[0])
    ours = torch.nn.functional.one_hot(r.experts[:, 0], 4) * r.keep
    assert torch.equal(ours, dispatch[0])
    torch.testing.assert_close(r.probs.max(-1, keepdim=True).values, probs[0])


# ------------------------------------------------------------------ sparse ≡ dense
@pytest.mark.parametrize("kw", [dict(), dict(num_experts_per_tok=3), dict(router_type="noisy_topk"),
                                dict(router_type="switch", expert_capacity_factor=0.75),
                                dict(num_shared_experts=2, shared_expert_intermediate_size=32)])
def test_sparse_dispatch_equals_dense_reference(kw):
    moe = block(**kw)
    torch.testing.assert_close(moe(X), moe.forward_dense(X), atol=1e-6, rtol=1e-5)


def test_shared_experts_add_a_dense_path():
    moe = block(num_shared_experts=2, shared_expert_intermediate_size=32)
    assert moe.shared_experts[0].up_proj.weight.shape == (32, 64)
    routed_only = MoE(tiny_cfg())
    routed_only.load_state_dict(moe.state_dict(), strict=False)
    dense = sum(e(X) for e in moe.shared_experts)
    torch.testing.assert_close(moe(X), routed_only(X) + dense, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ auxiliary losses
def test_load_balancing_loss_extremes():
    t, n = 8, 4
    uniform = torch.full((t, n), 1 / n)
    balanced = torch.arange(t)[:, None] % n
    assert load_balancing_loss(uniform, balanced, n).item() == pytest.approx(1.0)
    collapsed = torch.zeros(t, n)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(t, 1, dtype=torch.long), n).item() == pytest.approx(n)


@pytest.mark.parametrize("router,k", [("switch", 1), ("topk", 1), ("topk", 2)])
def test_block_aux_loss_is_coef_times_k_for_uniform_router(router, k):
    moe = block(router_type=router, num_experts_per_tok=k, router_aux_loss_coef=0.01)
    moe.gate.weight.data.zero_()  # uniform probabilities P_i = 1/N, so N·Σ f_i P_i = Σ f_i = k
    moe(X)
    assert moe.aux_loss.item() == pytest.approx(0.01 * k)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_matches_mixtral(k):
    logits = torch.randn(30, 6, generator=torch.Generator().manual_seed(5))
    probs = logits.softmax(-1)
    ours = load_balancing_loss(probs, probs.topk(k, -1).indices, 6)
    torch.testing.assert_close(ours, load_balancing_loss_func((logits,), num_experts=6, top_k=k))


def test_switch_load_balancing_loss_matches_switch_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func as switch_lb,
    )

    probs = torch.randn(1, 30, 6, generator=torch.Generator().manual_seed(6)).softmax(-1)
    idx = probs.argmax(-1)
    torch.testing.assert_close(load_balancing_loss(probs[0], idx[0, :, None], 6), switch_lb(probs, idx))


def test_z_loss_matches_switch_transformers():
    logits = 3 * torch.randn(2, 10, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(router_z_loss(logits.reshape(-1, 5)), router_z_loss_func(logits))


def test_aux_loss_combines_both_terms_in_eval_too():
    moe = block(router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    moe(X)
    r = moe.routing
    expected = 0.01 * load_balancing_loss(r.probs, r.experts, 4) + 0.001 * router_z_loss(r.logits)
    torch.testing.assert_close(moe.aux_loss, expected)
    assert moe.router_logits.shape == (18, 4)


def test_causal_lm_aux_loss_and_router_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(router_z_loss_coef=1e-3)).train()
    assert model.aux_loss() is None  # before any forward
    logits = model(IDS)
    aux = model.aux_loss()
    assert aux is not None and aux.ndim == 0
    per_layer = [layer.mlp.aux_loss for layer in model.model.layers]
    torch.testing.assert_close(aux, sum(per_layer))
    (logits.float().logsumexp(-1).mean() + aux).backward()
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0
    # the aux loss alone reaches the router through P_i
    model.zero_grad()
    model(IDS)
    model.aux_loss().backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
