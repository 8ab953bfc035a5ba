"""The main job end to end at test scale: every artefact exists, the checkpoint loads in transformers,
and a second run resumes from the finished stages instead of redoing them."""

from __future__ import annotations

import json
import math
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


def test_heldout_bits_per_char_beside_kneser_ney(run_dir) -> None:
    from tinyllm.recipes.tiny_zh_bpc import BPC_CHARS

    metrics = json.loads((run_dir / "metrics.json").read_text())
    hb = metrics["heldout_bits"]
    held = hb["heldout"]
    assert 0 < held["chars"] <= BPC_CHARS["test"] and held["bytes"] > held["chars"]
    rows = [hb["models"]["pretrain"], hb["models"]["sft"], hb["ngram"]["kn3"], hb["ngram"]["kn5"]]
    for row in rows:  # every row divides the bits of the same held-out characters
        assert math.isfinite(row["bits_per_char"]) and math.isfinite(row["bits_per_byte"])
        assert row["bits_per_char"] > 0 and row["bits_per_byte"] > 0
        assert (row["chars"], row["bytes"], row["sha256"]) == (held["chars"], held["bytes"], held["sha256"])
    delta = hb["delta_sft_minus_pretrain"]["bits_per_char"]
    assert delta == pytest.approx(rows[1]["bits_per_char"] - rows[0]["bits_per_char"])
    assert 0 <= metrics["title_lead_rouge_l_char"] <= 1 and metrics["title_lead_chars"] >= 1
    report = (run_dir / "report.md").read_text()
    for needle in ("Held-out bits per character", "Kneser–Ney 3-gram", "Kneser–Ney 5-gram",
                   "after SFT − after pretraining", "lead baseline", held["sha256"][:16]):
        assert needle in report, needle


def test_ngram_baseline_uses_the_shards_text_and_its_cache(run_dir) -> None:
    from tinyllm.data.corpora import pretrain_texts
    from tinyllm.eval.bpc import texts_sha256
    from tinyllm.recipes.tiny_zh import SCALES
    from tinyllm.recipes.tiny_zh_bpc import (
        BPC_CHARS,
        heldout_bits,
        heldout_documents,
        load_document_manifest,
        training_documents,
    )
    from tinyllm.tokenizer import load_tokenizer

    hb = json.loads((run_dir / "metrics.json").read_text())["heldout_bits"]
    manifest = load_document_manifest(run_dir / "shards")
    train_pool = pretrain_texts("train")
    train = training_documents(manifest, train_pool)
    tok = load_tokenizer(run_dir / "tokenizer")
    index = json.loads((run_dir / "shards" / "index.json").read_text())
    # the manifest names exactly the documents tokenized into the training shards
    assert sum(len(tok.encode(d)) + 1 for d in train) == index["splits"]["train"]["total_tokens"]
    assert hb["ngram"]["kn5"]["train_sha256"] == texts_sha256(train)
    held = heldout_documents(manifest, pretrain_texts("val"), train_pool, BPC_CHARS["test"])
    assert texts_sha256(held) == hb["heldout"]["sha256"] and not set(held) & set(train_pool)
    again = heldout_bits(run_dir, "test", SCALES["test"].seq_len, tok,
                         {"pretrain": run_dir / "pretrain" / "final", "sft": run_dir / "model"})
    assert all(r["cached"] for r in again["ngram"].values())
    for name in ("kn3", "kn5"):
        assert again["ngram"][name]["bits"] == hb["ngram"][name]["bits"]
    for name in ("pretrain", "sft"):
        assert again["models"][name]["bits"] == pytest.approx(hb["models"][name]["bits"], rel=1e-6)


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
