"""The dense-retriever recipe: InfoNCE equals cross entropy over in-batch scores, duplicates are masked, batches
resume exactly, the DSSM encoder equals its numpy embedder twin, and tiny end-to-end runs of both
architectures train through the training loop and export an embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyllm.recipes.dense_retriever import (
    DenseRetrieverConfig,
    HashedPairBatches,
    HashedProjectionEncoder,
    PairBatches,
    bucket_idf,
    collate,
    info_nce,
    mine_hard_negatives,
    pad_batch,
    run_recipe,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_info_nce_is_cross_entropy_over_in_batch_scores():
    q = F.normalize(torch.randn(6, 16), dim=-1)
    d = F.normalize(torch.randn(6, 16), dim=-1)
    loss, _ = info_nce(q, d, 0.05)
    assert torch.allclose(loss, F.cross_entropy(q @ d.T / 0.05, torch.arange(6)))
    # explicit form: −mean_i log(e^{s_ii} / Σ_j e^{s_ij})
    s = (q @ d.T / 0.05).double()
    assert loss.double().item() == pytest.approx((-(s.diag() - s.logsumexp(-1))).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature=0"):
        info_nce(q, d, 0)
    with pytest.raises(ValueError, match=r"must both be \[B, D\]"):
        info_nce(q, d[:3], 0.05)


def test_duplicate_documents_are_not_negatives():
    q = F.normalize(torch.randn(4, 8), dim=-1)
    d = F.normalize(torch.randn(4, 8), dim=-1)
    keys = torch.tensor([5, 9, 5, 3])
    loss, logits = info_nce(q, d, 0.1, keys)
    assert torch.isinf(logits[0, 2]) and torch.isinf(logits[2, 0]) and not torch.isinf(logits[0, 0])
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 2] = keep[2, 0] = False
    s = q @ d.T / 0.1
    ref = torch.stack([-(s[i, i] - s[i][keep[i]].logsumexp(0)) for i in range(4)]).mean()
    assert torch.allclose(loss, ref)


def test_extra_negative_rows_join_the_softmax():
    q = F.normalize(torch.randn(3, 8), dim=-1)
    d = F.normalize(torch.randn(5, 8), dim=-1)  # 3 positives + 2 mined negatives
    keys = torch.tensor([1, 2, 3, 4, 1])  # the last extra row is query 0's own article again
    loss, logits = info_nce(q, d, 0.1, keys)
    assert logits.shape == (3, 5) and torch.isinf(logits[0, 4]) and not torch.isinf(logits[1, 4])
    s = q @ d.T / 0.1
    ref = torch.stack([-(s[i, i] - s[i][~torch.isinf(logits[i])].logsumexp(0)) for i in range(3)]).mean()
    assert torch.allclose(loss, ref)
    with pytest.raises(ValueError, match="must both be"):
        info_nce(q, d[:2], 0.1)


def test_hard_negatives_are_the_top_wrong_articles():
    from tinyllm.rag.embed import HashingEmbedder

    h = HashingEmbedder(256)
    titles = ["北京下雨", "上海晴天", "广州台风"]
    docs = ["北京今天下雨，气温骤降", "北京明天下雨转晴", "上海晴天，广州台风登陆"]
    qx, dx = h.encode_sparse(titles), h.encode_sparse(docs)
    hard = mine_hard_negatives(qx, dx, [10, 11, 12], torch.ones(256), n=1)
    assert hard[0] == [1]  # 北京下雨's best wrong article is the other Beijing one
    assert all(len(r) == 1 and r[0] != i for i, r in enumerate(hard))
    batches = HashedPairBatches([(i, i, k) for i, k in enumerate([10, 11, 12])], qx, dx, 3, 0, hard)
    b = next(batches)
    assert b["q"].shape == (3, 256) and b["d"].shape == (6, 256)
    assert b["doc_keys"][3:].tolist() == [[10, 11, 12][r[0]] for r in (hard[i] for i in batches._order[:3])]


def test_pair_batches_cover_epochs_and_resume_exactly():
    pairs = [([i], [i, i + 1], i) for i in range(10)]
    it = PairBatches(pairs, batch_size=4, pad_id=0, seed=3)
    first_epoch = [next(it)["doc_keys"].tolist() for _ in range(2)]
    assert len({k for batch in first_epoch for k in batch}) == 8  # no pair twice within an epoch (the ragged tail is dropped)
    state = it.state_dict()
    expect = [next(it)["doc_keys"].tolist() for _ in range(3)]
    again = PairBatches(pairs, batch_size=4, pad_id=0, seed=3)
    again.load_state_dict(state)
    assert [next(again)["doc_keys"].tolist() for _ in range(3)] == expect
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert set(collate(pairs[:2], 0)) == {"q_ids", "q_mask", "d_ids", "d_mask", "doc_keys"}
    with pytest.raises(ValueError, match="cannot fill a batch"):
        PairBatches(pairs[:3], 4, 0, 0)


def test_tiny_run_trains_and_exports_an_embedder(tmp_path: Path):
    cfg = DenseRetrieverConfig(out=str(tmp_path / "dr"), arch="transformer", vocab_size=320, tokenizer_chars=20_000, hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, query_len=16,
                               doc_len=32, batch_size=8, max_steps=25, lr=3e-3, warmup_steps=2, limit=16,
                               device="cpu", progress=False)
    summary = run_recipe(cfg)
    metrics = [line for line in (tmp_path / "dr" / "train" / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    assert metrics, "the training loop logged nothing"
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in metrics]
    assert losses[-1] < losses[0]  # 16 pairs, 25 steps: the encoder memorises them
    assert set(summary["dev"]) >= {"recall@1", "recall@10", "mrr", "ndcg@10"}

    from tinyllm.rag.embed import BertEmbedder, load_embedder
    from tinyllm.tokenizer import load_tokenizer

    emb = load_embedder(summary["embedder_spec"])
    assert isinstance(emb, BertEmbedder) and emb.max_length == 32 and emb.dim == 32
    tok = load_tokenizer(tmp_path / "dr" / "model")
    text = "北京今天下雨，气温骤降"
    assert emb.token_ids(text) == tok.encode(text)[:32]  # the exported tokenizer.json encodes as training did
    v = emb.encode([text, "上海"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_dssm_encoder_equals_the_embedder_and_starts_at_idf(tmp_path: Path):
    from tinyllm.rag.embed import HashedProjectionEmbedder, HashingEmbedder, save_hashed_projection

    texts = ["北京今天下雨", "北京明天晴", "上海下雨", "广州"]
    h = HashingEmbedder(64)
    x = h.encode_sparse(texts)
    idf = bucket_idf(x)
    df = (x.toarray() != 0).sum(0)
    np.testing.assert_allclose(idf.numpy(), np.log(5 / (1 + df)) + 1, rtol=1e-6)  # ln((1+N)/(1+df)) + 1
    enc = HashedProjectionEncoder(idf, 8, seed=0)
    torch.testing.assert_close(enc.g.detach(), idf)
    path = save_hashed_projection(tmp_path / "m", enc.g.detach().numpy(), enc.w.detach().numpy(), 64)
    with torch.no_grad():
        ours = enc(torch.tensor(x.toarray())).numpy()
    np.testing.assert_allclose(HashedProjectionEmbedder(path).encode(texts), ours, atol=1e-6)


def test_tiny_dssm_run_trains_and_exports_an_embedder(tmp_path: Path):
    cfg = DenseRetrieverConfig(out=str(tmp_path / "dssm"), hash_dim=1024, proj_dim=16, batch_size=8,
                               max_steps=40, lr=1e-2, limit=16, device="cpu", progress=False)
    assert cfg.arch == "dssm" and cfg.warmup_steps == 10
    summary = run_recipe(cfg)
    lines = (tmp_path / "dssm" / "train" / "metrics.jsonl").read_text().splitlines()
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in lines if '"loss"' in line]
    assert losses and losses[-1] < losses[0]
    assert summary["dev"]["recall@10"] > 0.5  # 16 dev articles: exact n-gram overlap finds most of them

    from tinyllm.rag.embed import HashedProjectionEmbedder, load_embedder

    emb = load_embedder(summary["embedder_spec"])
    assert isinstance(emb, HashedProjectionEmbedder) and emb.dim == 1024 + 16
    v = emb.encode(["北京今天下雨，气温骤降", "上海"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_config_defaults_follow_the_architecture_and_name_the_bad_value():
    assert (DenseRetrieverConfig().batch_size, DenseRetrieverConfig().lr) == (128, 3e-4)
    t = DenseRetrieverConfig(arch="transformer")
    assert (t.batch_size, t.max_steps, t.lr, t.warmup_steps) == (48, 150, 1e-3, 15)
    assert DenseRetrieverConfig(batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="arch='rnn'"):
        DenseRetrieverConfig(arch="rnn")
    with pytest.raises(ValueError, match="batch_size=-1"):
        DenseRetrieverConfig(batch_size=-1)
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible"):
        DenseRetrieverConfig(hidden_size=30, num_attention_heads=4)
