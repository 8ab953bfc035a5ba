"""The main job end to end at test scale: every artefact exists, the checkpoint loads in transformers,
and a second run resumes from the finished stages instead of redoing them."""

from __future__ import annotations

import json
import struct
import time
import zlib

import pytest
import torch

from tinyllm.cli import main
from tinyllm.recipes.tiny_zh import TinyZhConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-zh")
    assert main(["recipe", "tiny-zh", "--scale", "test", "--out", str(out), "--progress", "false"]) == 0
    return out


def _is_png(path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    length, kind = struct.unpack(">I4s", data[8:16])
    return kind == b"IHDR" and zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]


def test_artefacts(run_dir) -> None:
    for rel in ("report.md", "metrics.json", "recipe_config.json", "tokenizer/tokenizer.json",
                "model/model.safetensors", "model/tokenizer.json", "model/config.json",
                "pretrain/metrics.jsonl", "sft/metrics.jsonl"):
        assert (run_dir / rel).exists(), rel
    assert _is_png(run_dir / "pretrain" / "loss.png") and _is_png(run_dir / "sft" / "loss.png")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("pretrain_val_ppl", "sft_val_ppl", "sentiment_accuracy", "sentiment_majority_baseline",
                "title_rouge_l_char", "samples"):
        assert key in metrics
    assert 0 <= metrics["sentiment_accuracy"] <= 1 and metrics["sft_val_ppl"] > 1
    report = (run_dir / "report.md").read_text()
    assert "majority-class baseline" in report and "ROUGE-L" in report and "Chat samples" in report
    cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert isinstance(cfg["eos_token_id"], list) and len(cfg["eos_token_id"]) == 2


def test_checkpoint_loads_in_transformers(run_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyllm.model.hf import load_model

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "model")
    ours = load_model(run_dir / "model")
    ids = hf_tok("今天天气很好", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_second_run_resumes_finished_stages(run_dir) -> None:
    before = (run_dir / "model" / "model.safetensors").stat().st_mtime
    t0 = time.time()
    assert main(["recipe", "tiny-zh", "--scale", "test", "--out", str(run_dir), "--progress", "false"]) == 0
    assert (run_dir / "model" / "model.safetensors").stat().st_mtime == before
    assert time.time() - t0 < 30


def test_config_validation() -> None:
    assert TinyZhConfig(quick=True).scale == "quick"
    with pytest.raises(ValueError, match="scale='huge'"):
        TinyZhConfig(scale="huge")
