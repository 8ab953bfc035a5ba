"""ModelConfig validation, presets and the HF config.json mapping (notes ch.02.5, 02.12–02.14; DESIGN rule 6).

Bad values raise ConfigError naming the field and value; every preset builds and the LLaMA presets have the
exact parameter counts of transformers' LlamaForCausalLM; `from_hf`/`to_hf` round-trip and transformers
accepts what `to_hf` writes; `to_hf` refuses what the HF classes cannot express.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import hf_config
from transformers import AutoConfig, AutoModelForCausalLM

from tinyllm.model.config import PRESETS, ConfigError, ModelConfig, preset
from tinyllm.model.transformer import CausalLM


@pytest.mark.parametrize(("kw", "message"), [
    (dict(num_attention_heads=32, num_key_value_heads=5),
     "num_attention_heads=32 is not divisible by num_key_value_heads=5"),
    (dict(model_type="gpt3"), "model_type='gpt3' is not one of"),
    (dict(rope_scaling={"rope_type": "ntk-by-parts", "factor": 2.0}), "rope_scaling.rope_type='ntk-by-parts'"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling.factor=None must be > 0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": -2.0}), "rope_scaling.factor=-2.0 must be > 0"),
    (dict(hidden_size=-64), "hidden_size=-64 must be a positive integer"),
    (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers=2.5 must be a positive integer"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0 must be a positive integer"),
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size=100 is not divisible by num_attention_heads=3"),
    (dict(head_dim=15), "head_dim=15 must be even for RoPE"),
    (dict(hidden_act="swish2"), "hidden_act='swish2'"),
    (dict(attn_implementation="flash"), "attn_implementation='flash'"),
    (dict(norm_position="sandwich"), "norm_position='sandwich'"),
    (dict(sliding_window=0), "sliding_window=0 must be a positive integer"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0 must be > 0"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps=0.0 must be > 0"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor=1.5 must be in (0, 1]"),
])
def test_validation_errors_name_the_value(kw, message) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kw)
    assert message in str(err.value)


def test_derived_fields_and_legacy_rope_key() -> None:
    cfg = ModelConfig(hidden_size=512, num_attention_heads=8, rope_scaling={"type": "linear", "factor": 2})
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == 64 and cfg.num_key_value_groups == 1
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2}  # HF-4 "type" key normalised
    assert ModelConfig(num_attention_heads=32, num_key_value_heads=1).num_key_value_groups == 32
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\): \['hidden'\]"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="unknown preset 'llama-9b'"):
        preset("llama-9b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(name: str) -> None:
    cfg = preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    try:
        hf = cfg.to_hf()
    except ConfigError as e:  # only ChatGLM2's q/k/v-bias-without-o-bias layout has no HF llama form
        assert name == "chatglm2-6b" and "attention_bias covers q/k/v/o" in str(e)
        return
    assert ModelConfig.from_hf(hf) == cfg
    # transformers accepts the dict and reads the same sizes back
    hf_cfg = AutoConfig.for_model(**hf)
    assert ModelConfig.from_hf(hf_cfg.to_dict()) == cfg


@pytest.mark.parametrize(("name", "count"), [
    ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("llama3-8b", 8_030_261_248), ("smollm2-135m", 134_515_008),
])
def test_preset_parameter_counts_equal_transformers(name: str, count: int) -> None:
    cfg = preset(name)
    with torch.device("meta"):
        ours = CausalLM(cfg)
        ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf()))
    assert ours.num_parameters() == count
    assert sum(p.numel() for p in ref.parameters()) == count
    assert preset("llama-7b", num_hidden_layers=2).num_hidden_layers == 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_from_hf_reads_transformers_configs(family: str) -> None:
    hf = hf_config(family, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                            "original_max_position_embeddings": 16}).to_dict()
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (family, 64, 2, 16)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "yarn"
    assert cfg.rope_scaling["original_max_position_embeddings"] == 16
    assert cfg.attention_bias == (family == "qwen2") and not cfg.attention_out_bias
    # and back: transformers reads what to_hf writes as the same rope parameters
    back = AutoConfig.for_model(**cfg.to_hf())
    assert back.rope_parameters["rope_type"] == "yarn" and back.rope_parameters["factor"] == 4.0
    assert back.rope_parameters["rope_theta"] == 5e5


def test_from_hf_transformers4_layout() -> None:
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 1e6,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_act": "silu"}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    assert cfg.max_position_embeddings == 2048 and not cfg.tie_word_embeddings


def test_qwen2_sliding_window_layers() -> None:
    """Qwen2 slides only in layers >= max_window_layers; tinyllm takes all-or-none and refuses a mix."""
    base = hf_config("qwen2", use_sliding_window=True, sliding_window=8).to_dict()
    assert ModelConfig.from_hf({**base, "layer_types": None, "max_window_layers": 0}).sliding_window == 8
    assert ModelConfig.from_hf({**base, "layer_types": None, "max_window_layers": 2}).sliding_window is None
    with pytest.raises(ConfigError, match="sliding window in 1 of 2 layers"):
        ModelConfig.from_hf({**base, "layer_types": None, "max_window_layers": 1})
    assert ModelConfig.from_hf({**base, "use_sliding_window": False}).sliding_window is None
    cfg = ModelConfig(model_type="qwen2", attention_bias=True, sliding_window=8, num_hidden_layers=3)
    hf = AutoConfig.for_model(**cfg.to_hf())
    assert hf.layer_types == ["sliding_attention"] * 3 and hf.sliding_window == 8


@pytest.mark.parametrize(("kw", "reason"), [
    (dict(norm_type="layernorm"), "norm_type='layernorm'"),
    (dict(norm_position="post"), "norm_position='post'"),
    (dict(position_type="alibi"), "position_type='alibi'"),
    (dict(mlp_type="plain"), "mlp_type='plain'"),
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(sliding_window=16), "sliding_window=16"),
    (dict(attention_bias=True), "attention_bias covers q/k/v/o"),
    (dict(model_type="qwen2"), "qwen2 has q/k/v bias"),
    (dict(model_type="mistral", attention_bias=True), "mistral has no attention bias"),
    (dict(model_type="mixtral"), "mixtral needs num_local_experts"),
])
def test_to_hf_refuses_what_hf_cannot_express(kw, reason) -> None:
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, **kw)
    with pytest.raises(ConfigError, match="cannot express as HF model_type") as err:
        cfg.to_hf()
    assert reason in str(err.value)


def test_from_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_type='gpt_neox' is not supported"):
        ModelConfig.from_hf({"model_type": "gpt_neox"})
    with pytest.raises(ConfigError, match="hidden_act='quick_gelu' is not supported"):
        ModelConfig.from_hf({**preset("tiny").to_hf(), "hidden_act": "quick_gelu"})
    with pytest.raises(ConfigError, match=r"no config\.json found"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_hf()))
    assert ModelConfig.from_hf(tmp_path) == preset("tiny")
