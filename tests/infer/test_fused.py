"""The engine's flat forward (infer/fused.py) ≡ the model's forward: same logits through prefill and decode on
a contiguous cache, same greedy tokens through the engine on mixed batches, quantized projections kept as
modules, unsupported architectures refused, fused weights stored once. Also the `LLM(quantization=...)` hook."""

from __future__ import annotations

import copy

import pytest
import torch

from tinyllm.infer.engine import LLM, LLMEngine
from tinyllm.infer.fused import FusedForward, supports
from tinyllm.infer.kv_cache import ContiguousKVCache
from tinyllm.infer.quant import model_nbytes, quantize_model
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.model.attention import build_attn_meta
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    return build_model(ModelConfig(**{**base, **kw})).eval()


def _logits_both_ways(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(1))
    ref_cache, fast_cache = ContiguousKVCache.for_model(model, 1, 32), ContiguousKVCache.for_model(model, 1, 32)
    ref_out, fast_out = [], []
    with torch.inference_mode():
        fused = FusedForward(model)
        for start, stop in ((0, 6), (6, 7), (7, 8), (8, 9)):  # a prefill chunk, then single-token steps
            x = ids[:, start:stop]
            ref_out.append(model(x, cache=ref_cache))
            meta = build_attn_meta(stop - start, start, 1, device="cpu")
            h = fused(x[0], torch.arange(start, stop), fast_cache, meta, stop - 1)
            fast_out.append(model.lm_head(h)[None])
    return torch.cat(ref_out, 1), torch.cat(fast_out, 1)


@pytest.mark.parametrize("kw", [
    {},
    {"num_key_value_heads": 1, "tie_word_embeddings": True},
    {"attention_bias": True, "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                              "original_max_position_embeddings": 64}},
    {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
])
def test_fused_forward_equals_model_forward(kw: dict) -> None:
    model = _model(**kw)
    ref, fast = _logits_both_ways(model)
    assert (ref - fast).abs().max().item() < 1e-5


def test_quantized_projections_stay_modules_and_agree() -> None:
    model = quantize_model(_model(), "int8")
    ref, fast = _logits_both_ways(model)
    assert (ref - fast).abs().max().item() < 1e-5


@pytest.mark.parametrize("kw", [{"norm_position": "post"}, {"position_type": "alibi"}, {"qk_norm": True},
                                {"mlp_type": "plain", "hidden_act": "gelu"}, {"num_local_experts": 4},
                                {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}])
def test_other_architectures_are_refused(kw: dict) -> None:
    model = _model(**kw)
    assert not supports(model)
    with pytest.raises(ValueError, match="not a pre-norm"):
        FusedForward(model)


def test_fused_weights_are_stored_once() -> None:
    model = _model()
    before = model_nbytes(model)
    FusedForward(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert model_nbytes(model) == before


def test_engine_greedy_tokens_equal_with_and_without_the_fused_forward() -> None:
    model = _model(num_hidden_layers=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (10,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = {}
    for fused in (False, True):
        engine = LLMEngine(copy.deepcopy(model), None, max_num_batched_tokens=32, num_blocks=40, block_size=4,
                           fused=fused)
        assert (engine.runner.fused is not None) == fused
        llm = LLM.__new__(LLM)  # the front end over an existing engine
        llm.engine, llm._counter = engine, iter(range(10**6))
        outs[fused] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[True] == outs[False]


@pytest.mark.parametrize("method,group", [("int8", 128), ("int4", 32)])
def test_llm_quantization_hook(method: str, group: int) -> None:
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(quantize_model(_model(hidden_size=64, intermediate_size=128), method, group))
    got = LLM(_model(hidden_size=64, intermediate_size=128), quantization=method, group_size=group)
    assert sum(m.__class__.__name__ == "QuantLinear" for m in got.engine.model.modules()) == 2 * 7
    assert ([o.outputs[0].token_ids for o in got.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in want.generate(prompts, params, use_tqdm=False)])
    with pytest.raises(ValueError, match="int3"):
        LLM(_model(), quantization="int3")
