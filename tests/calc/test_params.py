"""Closed-form parameter counts equal the models tinyllm and transformers build (on the meta device)."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.calc.params import ParamCount, count_parameters, factorized_embedding_params, resolve_config
from tinyllm.model.config import ConfigError, ModelConfig, preset
from tinyllm.model.hf import build_model

# exact values: the notes (BERT, ChatGLM2, ALBERT) and transformers configs of the released models
ORACLE = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "bert-base": 109_482_240,
    "bert-large": 335_141_888,
    "chatglm2-6b": 6_243_584_000,
    "mixtral-8x7b": 46_702_792_704,
    "smollm2-135m": 134_515_008,
}


def unique_numel(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Parameters of a module, tied tensors once (what `sum(p.numel())` over unique tensors gives)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.startswith(skip):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def tinyllm_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = build_model(cfg)
    return unique_numel(model, skip=("mlm_head.",))  # BertModel carries an MLM head transformers keeps apart


def hf_count(cfg: ModelConfig, pooler: bool = True) -> int:
    transformers = pytest.importorskip("transformers")
    hf = {k: v for k, v in cfg.to_hf().items() if k not in ("model_type", "architectures")}
    config = transformers.AutoConfig.for_model(cfg.model_type, **hf)
    with torch.device("meta"):
        if cfg.is_encoder:
            model = transformers.BertModel(config, add_pooling_layer=pooler)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    return unique_numel(model)


@pytest.mark.parametrize("name", sorted(ORACLE))
def test_presets_match_the_exact_oracle(name: str) -> None:
    assert count_parameters(name).total == ORACLE[name]


def test_chatglm2_per_layer_and_mixtral_active() -> None:
    assert count_parameters("chatglm2-6b").per_layer == 203_960_832
    moe = count_parameters("mixtral-8x7b")
    assert moe.active == 12_879_925_248  # 46.70B total runs like a 12.88B dense model (notes 02.17.c)
    assert round(moe.total / 1e9, 2) == 46.70 and round(moe.active / 1e9, 2) == 12.88


@pytest.mark.parametrize("name", ["llama-7b", "llama-13b", "llama2-70b", "llama3-8b", "mixtral-8x7b",
                                  "smollm2-135m", "chatglm2-6b"])
def test_decoder_presets_equal_transformers_on_meta(name: str) -> None:
    cfg = preset(name)
    if name == "chatglm2-6b":  # q/k/v bias without o_proj bias is the Qwen2 layout in transformers
        cfg = cfg.replace(model_type="qwen2")
    assert count_parameters(name).total == hf_count(cfg)


@pytest.mark.parametrize("pooler", [True, False])
@pytest.mark.parametrize("name", ["bert-base", "bert-large"])
def test_bert_equals_transformers_bertmodel(name: str, pooler: bool) -> None:
    assert count_parameters(name, include_pooler=pooler).total == hf_count(preset(name), pooler=pooler)


# every field that changes a shape, one at a time, on a small base
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=48)
VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "head_dim": dict(head_dim=24, num_key_value_heads=2),
    "qkv_bias": dict(attention_bias=True),
    "o_bias": dict(attention_out_bias=True),
    "all_bias_plain": dict(attention_bias=True, attention_out_bias=True, mlp_bias=True, mlp_type="plain",
                           hidden_act="gelu"),
    "gated_bias": dict(mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "layernorm_post": dict(norm_type="layernorm", norm_position="post"),
    "deepnorm": dict(norm_type="layernorm", norm_position="deepnorm"),
    "learned_pos": dict(position_type="learned"),
    "sinusoidal": dict(position_type="sinusoidal"),
    "alibi": dict(position_type="alibi"),
    "qk_norm": dict(qk_norm=True, num_key_value_heads=2),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_dense_variants_equal_the_built_model(name: str) -> None:
    cfg = ModelConfig(**BASE, **VARIANTS[name])
    count = count_parameters(cfg)
    assert count.total == tinyllm_count(cfg)
    # and component by component, classified by the HF names the model uses
    with torch.device("meta"):
        model = build_model(cfg)
    parts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "head"), 0)
    for pname, p in model.named_parameters():
        key = ("norms" if "norm" in pname else "embeddings" if "embed" in pname else
               "attention" if "self_attn" in pname else "mlp" if ".mlp." in pname else "head")
        parts[key] += p.numel()
    assert parts == {k: getattr(count, k) for k in parts}
    assert count.per_layer * cfg.num_hidden_layers == count.attention + count.mlp + count.norms - (
        cfg.hidden_size if cfg.norm_type == "rmsnorm" else 2 * cfg.hidden_size)


def test_head_and_tying() -> None:
    untied = count_parameters(ModelConfig(**BASE))
    assert untied.head == 320 * 64 and untied.non_embedding == untied.total - 2 * 320 * 64
    assert count_parameters(ModelConfig(**BASE), include_head=False).total == untied.total - 320 * 64
    tied = count_parameters(ModelConfig(**BASE, tie_word_embeddings=True))
    assert tied.head == 0 and tied.total == untied.total - 320 * 64


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"head_dim": 24}])
def test_hf_families_equal_transformers(family: str, extra: dict) -> None:
    fields = dict(BASE, model_type=family, num_key_value_heads=2, **extra)
    if family == "qwen2":
        fields["attention_bias"] = True  # Qwen2: q/k/v bias, no o_proj bias
    cfg = ModelConfig(**fields)
    assert count_parameters(cfg).total == hf_count(cfg) == tinyllm_count(cfg)


def test_llama_attention_and_mlp_bias_equal_transformers() -> None:
    cfg = ModelConfig(**BASE, attention_bias=True, attention_out_bias=True, mlp_bias=True)
    assert count_parameters(cfg).total == hf_count(cfg)


MOE = dict(BASE, num_local_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("extra", [
    {}, {"router_type": "noisy_topk"}, {"router_type": "switch"}, {"num_shared_experts": 2},
    {"num_shared_experts": 1, "shared_expert_intermediate_size": 40}, {"mlp_bias": True}])
def test_moe_equals_the_built_model(extra: dict) -> None:
    pytest.importorskip("tinyllm.model.moe")
    cfg = ModelConfig(**MOE, **extra)
    count = count_parameters(cfg)
    assert count.total == tinyllm_count(cfg)
    expert = 3 * 64 * 96 + (2 * 96 + 64 if cfg.mlp_bias else 0)
    k = 1 if cfg.router_type == "switch" else 2
    assert count.total - count.active == 2 * (4 - k) * expert  # 2 layers, E − k idle experts each


def test_mixtral_tiny_equals_transformers_and_tinyllm() -> None:
    pytest.importorskip("tinyllm.model.moe")
    cfg = ModelConfig(**dict(MOE, model_type="mixtral", num_key_value_heads=2))
    assert count_parameters(cfg).total == hf_count(cfg) == tinyllm_count(cfg)


@pytest.mark.parametrize("name", ["bert-base", "bert-large"])
def test_bert_equals_the_built_model(name: str) -> None:
    pytest.importorskip("tinyllm.model.bert")
    assert count_parameters(name).total == tinyllm_count(preset(name)) == ORACLE[name]


def test_bert_small_without_pooler_and_token_types() -> None:
    pytest.importorskip("tinyllm.model.bert")
    cfg = preset("bert-base").replace(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=16, type_vocab_size=3)
    with_pooler = count_parameters(cfg)
    assert with_pooler.total == tinyllm_count(cfg) == hf_count(cfg)
    assert count_parameters(cfg, include_pooler=False).total == with_pooler.total - (64 * 64 + 64) == hf_count(
        cfg, pooler=False)


def test_albert_factorized_embedding_numbers() -> None:
    assert factorized_embedding_params(21128, 768) == 16_226_304
    assert factorized_embedding_params(21128, 768, 128) == 2_802_688
    with pytest.raises(ValueError, match="embedding_size=0"):
        factorized_embedding_params(21128, 768, 0)


def test_albert_factorization_equals_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(vocab_size=21128, embedding_size=128, hidden_size=768)
    with torch.device("meta"):
        model = transformers.AlbertModel(config)
    mapped = (model.embeddings.word_embeddings.weight.numel()
              + model.encoder.embedding_hidden_mapping_in.weight.numel())
    assert mapped == factorized_embedding_params(21128, 768, 128)


def test_config_json_and_checkpoint_dir(tmp_path) -> None:
    cfg = preset("llama3-8b")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert count_parameters(tmp_path).total == ORACLE["llama3-8b"]
    assert count_parameters(tmp_path / "config.json").total == ORACLE["llama3-8b"]
    assert count_parameters(cfg.to_hf()).total == ORACLE["llama3-8b"]  # a dict is read as HF config.json


def test_bad_inputs_name_the_value(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'llama-99b'"):
        count_parameters("llama-99b")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_config(bad)


def test_as_dict_is_consistent() -> None:
    d = count_parameters("mixtral-8x7b").as_dict()
    assert d["total"] == ORACLE["mixtral-8x7b"] and d["active"] < d["total"]
    assert set(d) >= {f for f in ParamCount.__dataclass_fields__}
