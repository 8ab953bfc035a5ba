"""Adapter directories against HF PEFT in both directions, load_model(adapter=), merge-adapter, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.model.hf import load_model
from tinyllm.train.peft import (
    AdapterConfig,
    BitFitConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    apply_adapters,
    apply_bitfit,
    apply_lora,
    apply_prefix_tuning,
    apply_prompt_tuning,
    load_adapter,
    save_adapter,
)
from tinyllm.train.peft.io import AdapterError

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft", reason="HF PEFT is the reference for adapter directories")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from hf_helpers import save_tiny_hf

    return save_tiny_hf(tmp_path_factory.mktemp("base") / "llama", "llama", seed=0)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


X = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))

OURS = {
    "lora": lambda m: apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False)),
    "lora_rs": lambda m: apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  use_rslora=True, init_lora_weights=False)),
    "prompt": lambda m: apply_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=3)),
    "prefix": lambda m: apply_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=3)),
    "prefix_mlp": lambda m: apply_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                                      encoder_hidden_size=16)),
}


@pytest.mark.parametrize("method", list(OURS))
def test_tinyllm_adapter_loads_in_peft_with_the_same_logits(method, base, tmp_path) -> None:
    ours = OURS[method](load_model(base))
    with torch.no_grad():
        ours_logits = ours(X)
    save_adapter(ours, tmp_path / "adapter", base_path=str(base))
    theirs = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "adapter")
    with torch.no_grad():
        logits = theirs(input_ids=X).logits[:, -X.shape[1]:]  # PEFT also returns the virtual positions
    torch.testing.assert_close(ours_logits, logits, atol=1e-5, rtol=0)
    # and tinyllm.load_model(base, adapter=...) reads it back to the same logits (the same unmerged modules and
    # weights, so the same ops: bit-equal)
    with torch.no_grad():
        torch.testing.assert_close(load_model(base, adapter=tmp_path / "adapter")(X), ours_logits, atol=0, rtol=0)


def test_lora_saved_names_are_peft_names(base, tmp_path) -> None:
    from safetensors.torch import load_file

    save_adapter(OURS["lora"](load_model(base)), tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == ("LORA", 4, 8.0, "all-linear")


@pytest.mark.parametrize("kind", ["lora", "prompt", "prefix"])
def test_peft_saved_adapter_loads_into_tinyllm(kind, base, tmp_path) -> None:
    torch.manual_seed(1)
    if kind == "lora":
        cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"],
                              init_lora_weights=False)
    elif kind == "prompt":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    theirs = peft.get_peft_model(_hf(base), cfg).eval()
    with torch.no_grad():
        logits = theirs(input_ids=X).logits[:, -X.shape[1]:]
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference unless is_trainable


@pytest.mark.parametrize("method", ["adapter", "bitfit"])
def test_tinyllm_only_methods_round_trip(method, base, tmp_path) -> None:
    m = load_model(base)
    m = apply_adapters(m, AdapterConfig(bottleneck_size=4)) if method == "adapter" else apply_bitfit(m, BitFitConfig())
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
        out = m(X)
    save_adapter(m, tmp_path / "a")
    kind = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"]
    assert kind == {"adapter": "BOTTLENECK_ADAPTER", "bitfit": "BITFIT"}[method]
    back = load_model(base, adapter=tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(back(X), out, atol=0, rtol=0)  # same modules and weights reloaded: bit-equal


def test_merge_adapter_command_writes_a_transformers_checkpoint(base, tmp_path) -> None:
    from tinyllm.cli import main

    ours = OURS["lora"](load_model(base))
    with torch.no_grad():
        expected = ours(X)
    save_adapter(ours, tmp_path / "adapter")
    assert main(["merge-adapter", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) in (0, None)
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "merged")(X).logits, expected, atol=1e-5, rtol=0)
    save_adapter(OURS["prompt"](load_model(base)), tmp_path / "prompt")
    from tinyllm.train.peft.cli import MergeAdapterConfig, run_merge_adapter

    with pytest.raises(AdapterError, match="PROMPT_TUNING"):
        run_merge_adapter(MergeAdapterConfig(base=str(base), adapter=str(tmp_path / "prompt"), out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="adapter=''"):
        MergeAdapterConfig(base="b", out="o")


def test_bad_adapter_directories_give_clear_errors(base, tmp_path) -> None:
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        load_adapter(load_model(base), tmp_path)
    d = tmp_path / "broken"
    save_adapter(OURS["lora"](load_model(base)), d)
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(load_model(base), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora=True"):
        load_adapter(load_model(base), d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="'IA3' is not supported"):
        load_adapter(load_model(base), d)
    # a rank that does not fit the saved tensors
    good = tmp_path / "good"
    save_adapter(OURS["lora"](load_model(base)), good)
    (good / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(load_model(base), good)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_lora_on_a_tied_embedding_model_round_trips_with_peft(tmp_path) -> None:
    """SmolLM2-style tied lm_head/embed_tokens: LoRA on every linear but the head, same logits in PEFT."""
    from hf_helpers import save_tiny_hf

    base = save_tiny_hf(tmp_path / "tied", "llama", seed=1, tie_word_embeddings=True)
    ours = OURS["lora"](load_model(base))
    with torch.no_grad():
        expected = ours(X)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "adapter")
    with torch.no_grad():  # tied N(0, 1) embeddings give logits up to ~50: the bases alone differ by 1.1e-5
        torch.testing.assert_close(theirs(input_ids=X).logits, expected, atol=1e-5, rtol=1e-6)
