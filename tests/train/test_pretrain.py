"""Pretraining end to end (tinyllm/train/pretrain.py): shards → model → HF checkpoint that transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllm import cli
from tinyllm.data.text import write_token_shards
from tinyllm.model.hf import load_model
from tinyllm.train.pretrain import PretrainConfig, run_pretrain

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    # a Markov chain: t → (3t + 1) mod 40 with probability 0.8, else uniform; learnable and shared by val
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(120):
        t, doc = int(rng.integers(0, 40)), []
        for _ in range(int(rng.integers(10, 40))):
            doc.append(t)
            t = (3 * t + 1) % 40 if rng.random() < 0.8 else int(rng.integers(0, 40))
        docs.append(doc)
    write_token_shards(docs, tmp_path / "shards", vocab_size=48, eos_token_id=47, shard_tokens=500,
                       val_fraction=0.1, progress=False)
    return tmp_path / "shards"


def test_pretrain_learns_and_saves_a_transformers_checkpoint(shards: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    out = tmp_path / "run"
    cfg = PretrainConfig(data_dir=str(shards), out_dir=str(out), seq_len=32, batch_size=8, max_steps=40, lr=1e-2,
                         min_lr=1e-3, warmup_steps=4, eval_interval=20, eval_steps=2, log_interval=10,
                         save_interval=0, device="cpu", progress=False, tokenizer=str(tmp_path / "tok"), **SIZE)
    res = run_pretrain(cfg)
    assert res.step == 40 and not res.interrupted
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.5
    assert res.eval_losses[40] < res.eval_losses[20]
    resolved = json.loads((out / "pretrain_config.json").read_text())
    assert resolved["model"]["vocab_size"] == 48 and resolved["model"]["eos_token_id"] == 47
    assert resolved["model"]["hidden_size"] == 32 and resolved["seq_len"] == 32
    final = out / "final"
    assert (final / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_model(final).eval()
    ids = torch.randint(0, 48, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_config_errors_and_cli(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_dir"):
        PretrainConfig()
    with pytest.raises(ValueError, match="vocab_size=10"):
        run_pretrain(PretrainConfig(data_dir=str(shards), out_dir=str(tmp_path / "x"), vocab_size=10, **SIZE))
    out = tmp_path / "cli"
    rc = cli.main(["pretrain", "--data-dir", str(shards), "--out-dir", str(out), "--seq-len", "16",
                   "--batch-size", "2", "--max-steps", "3", "--hidden-size", "32", "--intermediate-size", "64",
                   "--num-hidden-layers", "1", "--num-attention-heads", "4", "--num-key-value-heads", "2",
                   "--betas", "0.9", "0.99", "--device", "cpu", "--progress", "false"])
    assert rc == 0
    resolved = json.loads((out / "pretrain_config.json").read_text())
    assert resolved["betas"] == [0.9, 0.99] and resolved["model"]["num_hidden_layers"] == 1
    assert (out / "final" / "model.safetensors").exists()


def test_zero_init_residual_starts_every_block_as_the_identity_and_still_learns(shards: Path, tmp_path: Path) -> None:
    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model
    from tinyllm.train.pretrain import build_pretrain_model, zero_init_residual

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=48, **SIZE)).eval()
    assert zero_init_residual(model) == 2 * SIZE["num_hidden_layers"]
    zeroed = {n for n, p in model.named_parameters() if not p.any()}
    assert zeroed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    # identity blocks: the logits are the final norm of the embeddings through the tied head
    ids = torch.randint(0, 48, (2, 8))
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        torch.testing.assert_close(model(ids), model.model.norm(emb) @ model.model.embed_tokens.weight.T)
    with pytest.raises(ValueError, match="found none"):
        zero_init_residual(torch.nn.Sequential(torch.nn.Linear(2, 2)))

    cfg = PretrainConfig(data_dir=str(shards), out_dir=str(tmp_path / "zi"), seq_len=32, batch_size=8, max_steps=30,
                         lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_interval=0, eval_steps=0, log_interval=10,
                         save_interval=0, device="cpu", progress=False, optimizer="muon", zero_init_residual=True,
                         adamw_lr_scale=3.0, **SIZE)
    from tinyllm.data.text import TokenShards

    assert not build_pretrain_model(cfg, TokenShards(shards, "train")).model.layers[0].mlp.down_proj.weight.any()
    res = run_pretrain(cfg)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.5
    trained = load_model(tmp_path / "zi" / "final")
    assert all(trained.model.layers[i].self_attn.o_proj.weight.any() for i in range(2))
    with pytest.raises(ValueError, match="fresh model only"):
        PretrainConfig(data_dir=str(shards), init_from=str(tmp_path / "zi" / "final"), zero_init_residual=True)


def test_document_mask_scores_each_packed_document_as_if_it_stood_alone(shards: Path) -> None:
    from tinyllm.model.attention import document_attn_meta
    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model
    from tinyllm.train.losses import model_lm_loss
    from tinyllm.train.pretrain import PretrainTask

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)).eval()
    eos = 0
    # a window that starts inside one document, then two more, each opened by the boundary token
    x = torch.tensor([[5, 6, 7, eos, 8, 9, eos, 10, 11, 12]])
    y = torch.tensor([[6, 7, eos, 8, 9, eos, 10, 11, 12, 13]])
    meta = document_attn_meta(x, eos)
    packed = model(x, attn_meta=meta)
    alone = torch.cat([model(x[:, a:b]) for a, b in ((0, 3), (3, 6), (6, 10))], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x), alone, atol=1e-3)  # without the mask the later documents read the earlier
    # the fused loss takes the same mask: equal to the mean of the documents' own token losses
    ce = torch.nn.functional.cross_entropy(alone[0], y[0])
    torch.testing.assert_close(model_lm_loss(model, x, y, attn_meta=meta), ce, rtol=1e-5, atol=1e-6)
    # the pretraining task builds it from the shards' end-of-text id
    task = PretrainTask(shards, 2, 16, 0, 2, document_mask=True)
    bx, by = next(iter(task.train_batches()))
    loss, _ = task.loss(model, (bx, by))
    ref = model_lm_loss(model, bx, by, attn_meta=document_attn_meta(bx, task.train_shards.eos_token_id))
    torch.testing.assert_close(loss, ref)
    assert (bx == task.train_shards.eos_token_id).any()  # the batch really packs several documents
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        document_attn_meta(x[0], eos)
