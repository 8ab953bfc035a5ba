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
                "pretrain/metrics.jsonl", "sft/metrics.jsonl", "title_tagger/title_head.safetensors",
                "title_tagger/tokenizer.json"):
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
    assert 0 <= metrics["title_extractive_rouge_l_char"] <= 1 and metrics["title_extractive_chars"] >= 1
    report = (run_dir / "report.md").read_text()
    for needle in ("Held-out bits per character", "Kneser–Ney 3-gram", "Kneser–Ney 5-gram",
                   "after SFT − after pretraining", "lead baseline", "extractive", held["sha256"][:16]):
        assert needle in report, needle


def test_ngram_baseline_uses_the_shards_text_and_its_cache(run_dir) -> None:
    from tinyllm.eval.bpc import texts_sha256
    from tinyllm.recipes.tiny_zh import SCALES
    from tinyllm.recipes.tiny_zh_bpc import (
        BPC_CHARS,
        DEFAULT_SOURCES,
        corpus_documents,
        heldout_bits,
        heldout_documents,
        load_document_manifest,
        training_documents,
    )
    from tinyllm.tokenizer import load_tokenizer

    hb = json.loads((run_dir / "metrics.json").read_text())["heldout_bits"]
    manifest = load_document_manifest(run_dir / "shards")
    sources = manifest.get("sources", DEFAULT_SOURCES)
    train_pool = corpus_documents("train", sources)
    train = training_documents(manifest, train_pool)
    tok = load_tokenizer(run_dir / "tokenizer")
    index = json.loads((run_dir / "shards" / "index.json").read_text())
    # the manifest names exactly the documents tokenized into the training shards
    assert sum(len(tok.encode(d)) + 1 for d in train) == index["splits"]["train"]["total_tokens"]
    assert hb["ngram"]["kn5"]["train_sha256"] == texts_sha256(train)
    held = heldout_documents(manifest, corpus_documents("val", sources), train_pool, BPC_CHARS["test"])
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
    assert TinyZhConfig(device="cpu").scale == "default"  # gpu only where CUDA is the device
    sc = TinyZhConfig(scale="gpu", pretrain_seconds=90, device="cpu").scale_settings()
    assert sc.pretrain_seconds == 90 and sc.sft_seconds == 60 and sc.batch_size == 64
    with pytest.raises(ValueError, match="sft_seconds=-1"):
        TinyZhConfig(sft_seconds=-1)


def test_plan_reports_device_precision_and_sft_replay(run_dir) -> None:
    plan = json.loads((run_dir / "pretrain_plan.json").read_text())
    assert plan["device"] == "cpu" and plan["precision"] in ("fp32", "bf16") and "CPU" in plan["device_name"]
    report = (run_dir / "report.md").read_text()
    assert "trained end to end on a CPU" in report and plan["device_name"] in report
    sft_cfg = json.loads((run_dir / "sft" / "sft_config.json").read_text())
    assert sft_cfg["replay_fraction"] == 0.25 and sft_cfg["num_replay_examples"] > 0


class _Tok:
    vocab_size, eos_token_id = 400, 0


def _fake_probe(times: dict):
    def measure(model, batch_size, seq_len, vocab, precision, repeats=3, optimizer="adamw"):
        return times.get((precision, batch_size, model.config.hidden_size)) or times[(precision, batch_size)]
    return measure


def test_plan_replans_precision_then_batch_when_the_budget_is_too_short(monkeypatch) -> None:
    """Regression: on an AVX2-only CPU bf16 ran ~88 s/step and the recipe planned 20 useless steps."""
    import dataclasses

    from tinyllm.recipes import tiny_zh, tiny_zh_plan

    sc = dataclasses.replace(tiny_zh.SCALES["test"], max_steps=None, pretrain_seconds=100.0, min_steps=50,
                             batch_size=16)
    cfg = TinyZhConfig(scale="test", device="cpu", precision="auto")
    import tinyllm.capability as cap

    monkeypatch.setattr(cap, "resolve_precision", lambda p, d: "bf16")
    # bf16 is slow everywhere, fp32 at batch 16 fits: fp32 wins, and the reason says why
    monkeypatch.setattr(tiny_zh_plan, "measure_step_seconds", _fake_probe(
        {("bf16", 16): 50.0, ("bf16", 8): 25.0, ("bf16", 4): 12.0, ("fp32", 16): 1.0}))
    plan = tiny_zh_plan.plan_pretrain(cfg, sc, _Tok())
    assert (plan["precision"], plan["batch_size"], plan["max_steps"]) == ("fp32", 16, 100)
    assert "allows only 2 steps" in plan["reason"] and [p["batch_size"] for p in plan["probes"]] == [16, 8, 4, 16]
    # nothing fits: the most tokens wins and the plan warns
    monkeypatch.setattr(tiny_zh_plan, "measure_step_seconds", _fake_probe(
        {("bf16", 16): 50.0, ("bf16", 8): 25.0, ("bf16", 4): 20.0, ("fp32", 16): 10.0, ("fp32", 8): 5.0,
         ("fp32", 4): 4.0}))
    plan = tiny_zh_plan.plan_pretrain(cfg, sc, _Tok())
    assert plan["precision"] == "fp32" and plan["batch_size"] == 16 and "undertrained" in plan["reason"]
    # an explicit precision is kept; the epoch cap bounds the steps
    cfg32 = TinyZhConfig(scale="test", device="cpu", precision="fp32")
    monkeypatch.setattr(cap, "resolve_precision", lambda p, d: p)
    monkeypatch.setattr(tiny_zh_plan, "measure_step_seconds", _fake_probe({("fp32", 16): 0.1}))
    plan = tiny_zh_plan.plan_pretrain(cfg32, sc, _Tok(), corpus_tokens=16 * 32 * 300)
    assert plan["max_steps"] == int(sc.max_epochs * 300) and "capped" in plan["reason"]


def test_plan_never_probes_emulated_bf16(monkeypatch) -> None:
    """On a CPU whose bf16 matmul is emulated (AVX2: ~0.02× fp32) one bf16 probe step takes minutes: the
    re-plan halves the fp32 batch and stops there."""
    import dataclasses

    import tinyllm.capability as cap
    from tinyllm.recipes import tiny_zh, tiny_zh_plan

    sc = dataclasses.replace(tiny_zh.SCALES["test"], max_steps=None, pretrain_seconds=100.0, min_steps=500,
                             batch_size=16)
    monkeypatch.setattr(cap, "resolve_precision", lambda p, d: "fp32")
    monkeypatch.setattr(cap, "bf16_matmul_speedup", lambda: 0.02)
    monkeypatch.setattr(tiny_zh_plan, "measure_step_seconds", _fake_probe(
        {("fp32", 16): 0.32, ("fp32", 8): 0.15, ("fp32", 4): 0.1}))
    plan = tiny_zh_plan.plan_pretrain(TinyZhConfig(scale="test", device="cpu", precision="auto"), sc, _Tok())
    assert (plan["precision"], plan["batch_size"], plan["max_steps"]) == ("fp32", 8, 666)
    assert [(p["precision"], p["batch_size"]) for p in plan["probes"]] == [("fp32", 16), ("fp32", 8)]


def test_plan_takes_a_narrower_model_only_where_it_buys_tokens(monkeypatch) -> None:
    import dataclasses

    import tinyllm.capability as cap
    from tinyllm.recipes import tiny_zh, tiny_zh_plan

    heads = dict(num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    sc = dataclasses.replace(tiny_zh.SCALES["test"], max_steps=None, pretrain_seconds=100.0, min_steps=50,
                             batch_size=16, model=dict(hidden_size=64, **heads),
                             narrower=(dict(hidden_size=48, **heads), dict(hidden_size=32, **heads)))
    cfg = TinyZhConfig(scale="test", device="cpu", precision="fp32")
    monkeypatch.setattr(cap, "resolve_precision", lambda p, d: p)
    # compute-bound: 48 runs 1.25× the tokens of 64 (taken), 32 only 1.07× those of 48 (not taken)
    monkeypatch.setattr(tiny_zh_plan, "measure_step_seconds", _fake_probe(
        {("fp32", 16, 64): 1.0, ("fp32", 16, 48): 0.8, ("fp32", 16, 32): 0.75}))
    plan = tiny_zh_plan.plan_pretrain(cfg, sc, _Tok())
    assert plan["model"]["hidden_size"] == 48 and (plan["batch_size"], plan["max_steps"]) == (16, 125)
    assert "width 48 (not 64)" in plan["reason"] and len(plan["width_probes"]) == 3
    pcfg = tiny_zh_plan.pretrain_config(cfg, sc, tiny_zh.Path("o"), tiny_zh.Path("s"), plan)
    assert pcfg.hidden_size == 48
    # overhead-bound (widths run alike): the scale's model stays, and the narrowest is never timed
    monkeypatch.setattr(tiny_zh_plan, "measure_step_seconds", _fake_probe(
        {("fp32", 16, 64): 1.0, ("fp32", 16, 48): 0.95, ("fp32", 16, 32): 0.5}))
    plan = tiny_zh_plan.plan_pretrain(cfg, sc, _Tok())
    assert plan["model"]["hidden_size"] == 64 and "width" not in plan["reason"]
    assert [w["hidden_size"] for w in plan["width_probes"]] == [64, 48]


def test_title_command_prints_a_subsequence_of_each_article(run_dir, capsys, tmp_path) -> None:
    articles = ["北京今天下了一场大雪，道路结冰，多条公交线路停运。", "上海的天气很好，市民纷纷外出踏青。"]
    (tmp_path / "a.txt").write_text("\n".join(articles) + "\n\n", encoding="utf-8")
    assert main(["title", "--model", str(run_dir / "title_tagger"), "--input", str(tmp_path / "a.txt"),
                 "--chars", "8"]) == 0
    titles = capsys.readouterr().out.splitlines()
    assert len(titles) == 2
    for title, article in zip(titles, articles):
        it = iter(article)
        assert len(title) == 8 and all(c in it for c in title)
