"""Norms, residual placement, activations and feed-forward blocks (notes ch.02.2, 02.6, 02.12, 02.13).

RMSNorm equals `torch.nn.RMSNorm` and transformers' `LlamaRMSNorm`; LayerNorm equals `torch.nn.LayerNorm`;
DeepNorm α/β and β-scaled init follow the DeepNet paper; post-/pre-norm layers equal
`nn.TransformerEncoderLayer(norm_first=False/True)` after a weight copy; GELU (exact and tanh), SwiGLU/GeGLU and
LLaMA's FFN width rule match their formulas and Meta's published sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hf_helpers import randomize_
from torch import nn

from tinyllm.model.activation import ACTIVATIONS, gelu, gelu_tanh, gelu_tanh_reference, silu
from tinyllm.model.attention import AttnMeta
from tinyllm.model.config import ModelConfig
from tinyllm.model.mlp import GatedMLP, PlainMLP, llama_ffn_hidden
from tinyllm.model.norm import LayerNorm, RMSNorm, deepnorm_constants
from tinyllm.model.transformer import CausalLM, DecoderLayer, PostNormDecoderLayer, build_layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_torch_and_llama(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (torch.randn(3, 5, 64) * 3).to(dtype)
    ours, ref, hf = RMSNorm(64, 1e-6), nn.RMSNorm(64, eps=1e-6), LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        w = 1 + 0.1 * torch.randn(64)
        for m in (ours, ref, hf):
            m.weight.copy_(w)
    ours, hf = ours.to(dtype), hf.to(dtype)
    assert torch.equal(ours(x), hf(x))  # same fp32 compute and cast-back order as LLaMA
    torch.testing.assert_close(ours(x).float(), ref(x.float()), atol=1e-5 if dtype == torch.float32 else 4e-2,
                               rtol=0 if dtype == torch.float32 else 1e-2)
    # the formula: x / sqrt(mean(x²) + ε) · g
    x32 = x.float()
    expect = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    if dtype == torch.float32:
        torch.testing.assert_close(ours(x), expect, atol=1e-5, rtol=0)


def test_layernorm_matches_torch() -> None:
    x = torch.randn(4, 7, 32) * 2 + 1
    ours, ref = LayerNorm(32, 1e-5), nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
    z = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ours(x), z * ours.weight + ours.bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [1, 6, 100, 1000])
def test_deepnorm_constants(layers: int) -> None:
    alpha, beta = deepnorm_constants(layers)
    assert alpha == pytest.approx((2 * layers) ** 0.25) and beta == pytest.approx((8 * layers) ** -0.25)
    # encoder-only stacks use the same form with N layers
    assert deepnorm_constants(layers, encoder_only=True) == pytest.approx((alpha, beta))


def test_deepnorm_layer_and_init() -> None:
    cfg = ModelConfig(vocab_size=32, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, norm_type="layernorm", norm_position="deepnorm")
    alpha, beta = deepnorm_constants(4)
    model = CausalLM(cfg)
    layer = model.model.layers[0]
    assert isinstance(layer, PostNormDecoderLayer) and layer.alpha == pytest.approx(alpha)
    # value/output/FFN weights: Xavier-normal with gain β, std = β·sqrt(2 / (fan_in + fan_out))
    for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        w = layer.get_submodule(name).weight
        expect = beta * math.sqrt(2.0 / (w.shape[0] + w.shape[1]))
        assert w.std().item() == pytest.approx(expect, rel=0.05), name
    # q/k are not β-scaled
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(cfg.initializer_range, rel=0.05)
    # forward: h = LN(α·x + Attn(x)); y = LN(α·h + FFN(h))
    x = torch.randn(2, 5, 256)
    meta = AttnMeta(None, True)
    with torch.no_grad():
        h = layer.input_layernorm(alpha * x + layer.self_attn(x, None, meta))
        expect = layer.post_attention_layernorm(alpha * h + layer.mlp(h))
        torch.testing.assert_close(layer(x, None, meta, None, None), expect, atol=1e-6, rtol=0)


def _copy_into_torch_layer(ours: nn.Module, ref: nn.TransformerEncoderLayer) -> None:
    a = ours.self_attn
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.self_attn.out_proj.weight.copy_(a.o_proj.weight)
        ref.self_attn.out_proj.bias.copy_(a.o_proj.bias)
        ref.linear1.load_state_dict(ours.mlp.up_proj.state_dict())
        ref.linear2.load_state_dict(ours.mlp.down_proj.state_dict())
        ref.norm1.load_state_dict(ours.input_layernorm.state_dict())
        ref.norm2.load_state_dict(ours.post_attention_layernorm.state_dict())


@pytest.mark.parametrize("impl", ["eager", "sdpa", "tiled"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("position", ["post", "pre"])
def test_layer_equals_torch_transformer_encoder_layer(position: str, act: str, impl: str) -> None:
    """Original (post-norm) and pre-norm blocks with a causal mask equal PyTorch's reference layer."""
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, norm_type="layernorm", norm_position=position, mlp_type="plain",
                      hidden_act=act, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                      position_type="none", rms_norm_eps=1e-5, attn_implementation=impl)
    ours = randomize_(build_layer(cfg, 0)).eval()
    assert isinstance(ours, PostNormDecoderLayer if position == "post" else DecoderLayer)
    ref = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation=act, batch_first=True,
                                     norm_first=position == "pre").eval()
    _copy_into_torch_layer(ours, ref)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        out = ours(x, None, AttnMeta(None, True), None, None)
        expect = ref(x, src_mask=nn.Transformer.generate_square_subsequent_mask(9), is_causal=True)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)


def test_gelu_exact_and_tanh() -> None:
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(gelu(x), exact, atol=1e-12, rtol=0)
    torch.testing.assert_close(gelu_tanh(x), gelu_tanh_reference(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(gelu_tanh(x), nn.GELU(approximate="tanh")(x), atol=0, rtol=0)
    one = torch.tensor([1.0], dtype=torch.float64)
    assert gelu_tanh(one).item() == pytest.approx(0.841192, abs=1e-6)
    assert gelu(one).item() == pytest.approx(0.841345, abs=1e-6)
    assert (gelu_tanh(x) - gelu(x)).abs().max() < 1e-3  # the approximation is close but not exact
    torch.testing.assert_close(silu(x), x * torch.sigmoid(x), atol=1e-12, rtol=0)
    assert set(ACTIVATIONS) == {"silu", "gelu", "gelu_tanh", "relu", "relu2"}
    from transformers.activations import ACT2FN

    torch.testing.assert_close(ACTIVATIONS["relu2"](x), ACT2FN["relu2"](x), atol=0, rtol=0)  # same formula


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu2"])
def test_gated_mlp_formula(act: str) -> None:
    """SwiGLU (silu) / GeGLU (gelu): FFN(x) = (act(x W_g) ⊙ x W_u) W_d."""
    mlp = randomize_(GatedMLP(16, 40, act, bias=False))
    x = torch.randn(3, 16)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    torch.testing.assert_close(mlp(x), (ACTIVATIONS[act](x @ g.T) * (x @ u.T)) @ d.T, atol=1e-5, rtol=0)
    if act in ("silu", "relu2"):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        hf = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act=act))
        hf.load_state_dict(mlp.state_dict())
        torch.testing.assert_close(mlp(x), hf(x), atol=1e-6, rtol=0)


def test_plain_mlp_formula() -> None:
    mlp = randomize_(PlainMLP(16, 64, "relu", bias=True))
    x = torch.randn(3, 16)
    expect = torch.relu(x @ mlp.up_proj.weight.T + mlp.up_proj.bias) @ mlp.down_proj.weight.T + mlp.down_proj.bias
    torch.testing.assert_close(mlp(x), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("dim", "multiple_of", "mult", "expect"), [
    (4096, 256, None, 11008),    # LLaMA-7B
    (5120, 256, None, 13824),    # LLaMA-13B
    (8192, 256, None, 22016),    # LLaMA-65B
    (8192, 4096, 1.3, 28672),    # Llama-2-70B
    (4096, 1024, 1.3, 14336),    # Llama-3-8B
])
def test_llama_ffn_hidden(dim: int, multiple_of: int, mult: float | None, expect: int) -> None:
    assert llama_ffn_hidden(dim, multiple_of, mult) == expect


def test_rmsnorm_training_backward_equals_transformers() -> None:
    """The fp32 training path (hand-derived backward) gives HF LlamaRMSNorm's output and gradients."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    ours, ref = RMSNorm(24, eps=1e-5), LlamaRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(24, generator=g) + 0.5)
        ref.weight.copy_(ours.weight)
    x = 3 * torch.randn(2, 5, 24, generator=g)
    grad = torch.randn(2, 5, 24, generator=g)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    torch.testing.assert_close(yo, yr, rtol=0, atol=0)
    yo.backward(grad)
    yr.backward(grad)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    # frozen weight (adapters): only the input gradient
    ours.weight.requires_grad_(False)
    xo.grad = None
    ours(xo).backward(grad)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-6, atol=1e-6)
