"""Robustness of HF checkpoint import/export (DESIGN §4, §6): every layout transformers writes loads, every
broken checkpoint fails with an error naming the file or tensor, and saving never leaves a half-written
checkpoint or a temporary directory behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hf_helpers import randomize_
from transformers import AutoModelForCausalLM

from tinyllm.model.config import ConfigError, preset
from tinyllm.model.hf import CheckpointError, build_model, load_model, save_pretrained

IDS = torch.arange(12)[None] % 128


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _hf_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")(IDS).logits


def test_sharded_safetensors_load(tiny_hf_checkpoint, tmp_path: Path) -> None:
    src = tiny_hf_checkpoint()
    hf = AutoModelForCausalLM.from_pretrained(src)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_logits(load_model(tmp_path / "sharded")), _hf_logits(src), atol=1e-4, rtol=0)
    # a shard named in the index but absent is reported by name
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[1]} is missing"):
        load_model(tmp_path / "sharded")


def test_pytorch_model_bin_loads(tiny_hf_checkpoint) -> None:
    path = tiny_hf_checkpoint()
    sd = safetensors.torch.load_file(path / "model.safetensors")
    torch.save(sd, path / "pytorch_model.bin")
    expect = _logits(load_model(path))
    (path / "model.safetensors").unlink()
    assert torch.equal(_logits(load_model(path)), expect)  # the same weights through the same model: bit-equal


def test_truncated_safetensors_names_the_file(tiny_hf_checkpoint) -> None:
    path = tiny_hf_checkpoint()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(path)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)


def test_missing_files_are_clear_errors(tiny_hf_checkpoint, tmp_path: Path) -> None:
    path = tiny_hf_checkpoint()
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.json found"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(preset("tiny").to_hf()))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(tmp_path / "empty")


def test_mismatched_shapes_name_the_tensor(tiny_hf_checkpoint) -> None:
    path = tiny_hf_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \['model\.layers\.2\."):
        load_model(path)


def test_round_trip_and_save_into_existing_dir(tmp_path: Path) -> None:
    model = randomize_(build_model(preset("tiny", vocab_size=128, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)))
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "README.md").write_text("mine")
    save_pretrained(model, target)
    assert (target / "tokenizer.json").read_text() == "{}" and (target / "README.md").read_text() == "mine"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in target.iterdir()}
    assert not list(tmp_path.glob(".ckpt.tmp-*"))
    torch.testing.assert_close(_logits(load_model(target)), _logits(model), atol=0, rtol=0)  # same weights, ops
    torch.testing.assert_close(_hf_logits(target), _logits(model), atol=1e-4, rtol=0)
    # tied weights are stored once, as transformers expects
    assert "lm_head.weight" not in safetensors.torch.load_file(target / "model.safetensors")
    # bf16 export keeps the dtype in config.json
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    first = randomize_(build_model(preset("tiny", **small)), seed=1)
    target = save_pretrained(first, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    second = randomize_(build_model(preset("tiny", **small)), seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(second, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left
    with pytest.raises(OSError, match="disk full"):  # same for a fresh target
        save_pretrained(second, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    torch.testing.assert_close(_logits(load_model(target)), _logits(first), atol=0, rtol=0)  # same weights, ops


def test_save_refuses_unexportable_config(tmp_path: Path) -> None:
    model = build_model(preset("tiny", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, norm_type="layernorm"))
    with pytest.raises(ConfigError, match="save_pretrained: cannot express as HF"):
        save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
