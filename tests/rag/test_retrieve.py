"""Retrieval stages: hit fusion (RRF closed form, weighted), MMR equal to its naive reference, multi-query and
HyDE through a scripted LLM, LLM relevance reranking, the Retriever over a real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllm.rag.embed import HashingEmbedder
from tinyllm.rag.retrieve import (
    LLMRelevanceReranker,
    Retriever,
    fuse_hits,
    hyde,
    mmr,
    mmr_naive,
    multi_query,
    parse_lines,
    rerank,
)
from tinyllm.rag.store import Hit, RagStore

pytestmark = pytest.mark.usefixtures("one_thread")


def _hits(ids: list[str], scores: list[float] | None = None) -> list[Hit]:
    scores = scores or [1.0 / (i + 1) for i in range(len(ids))]
    return [Hit(d, f"{d}#0", f"text {d}", 0, 6, s) for d, s in zip(ids, scores)]


def test_fuse_hits_rrf_closed_form():
    fused = fuse_hits([_hits(["a", "b", "c"]), _hits(["c", "a"])], method="rrf", k=60)
    assert [h.doc_id for h in fused] == ["a", "c", "b"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1].score == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2].score == pytest.approx(1 / 62)
    assert fused[0].text == "text a"  # the Hit itself survives, only its score changes


def test_fuse_hits_weighted_minmax():
    fused = fuse_hits([_hits(["a", "b"], [10.0, 0.0]), _hits(["b", "a"], [0.9, 0.1])], method="weighted")
    # minmax: list 1 → a 1, b 0; list 2 → b 1, a 0 → tie, first seen (a) wins
    assert [(h.doc_id, h.score) for h in fused] == [("a", 1.0), ("b", 1.0)]
    with pytest.raises(ValueError, match="method='max'"):
        fuse_hits([], method="max")


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_mmr_equals_naive_reference(lam):
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(30, 8))
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    docs[5] = docs[3]  # an exact duplicate
    q = docs[3] + 0.1 * rng.normal(size=8)
    assert mmr(q, docs, 10, lam) == mmr_naive(q, docs, 10, lam)


def test_mmr_skips_duplicates_and_lambda_one_is_relevance():
    docs = np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6]])
    q = np.array([1.0, 0.0])
    assert mmr(q, docs, 2, 1.0) == [0, 1]  # pure relevance keeps the duplicate
    assert mmr(q, docs, 2, 0.3) == [0, 2]  # diversity prefers the different document
    with pytest.raises(ValueError, match=r"lambda_=1\.5"):
        mmr(q, docs, 2, 1.5)


def test_multi_query_and_hyde_with_a_scripted_llm():
    calls = []

    def llm(prompt: str) -> str:
        calls.append(prompt)
        if "改写" in prompt:
            return "1. 北京的天气怎么样\n- 北京天气\n北京天气\n\n（2）北京今天下雨吗"
        return "  北京今天多云转小雨。  "

    assert multi_query("北京天气", llm, n=3) == ["北京天气", "北京的天气怎么样", "北京今天下雨吗"]
    assert "3 个" in calls[0] and "北京天气" in calls[0]
    assert hyde("北京天气", llm) == "北京今天多云转小雨。"
    assert parse_lines("a\n2、b\n• c", 2) == ["a", "b"]


class _ListStore:
    """Each query string maps to a fixed ranking; records the calls."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.calls = table, []

    def search(self, query: str, k: int = 10, mode: str = "hybrid") -> list[Hit]:
        self.calls.append((query, k, mode))
        return _hits(self.table.get(query, []))[:k]


def test_retriever_multi_query_union_is_rrf_of_per_query_lists():
    store = _ListStore({"q": ["a", "b"], "p1": ["c", "a"], "p2": ["d"], "hyde doc": ["b", "e"]})

    def llm(prompt: str) -> str:
        return "p1\np2" if "改写" in prompt else "hyde doc"

    r = Retriever(store, mode="dense", fetch_k=7, llm=llm, multi_query=2, hyde=True)
    got = r.search("q", k=10)
    expected = fuse_hits([_hits(["a", "b"]), _hits(["c", "a"]), _hits(["d"]), _hits(["b", "e"])])
    assert [h.chunk_id for h in got] == [h.chunk_id for h in expected]
    assert {h.doc_id for h in got} == {"a", "b", "c", "d", "e"}  # deduplicated union
    assert store.calls == [("q", 10, "dense"), ("p1", 10, "dense"), ("p2", 10, "dense"), ("hyde doc", 10, "dense")]
    with pytest.raises(ValueError, match="pass llm="):
        Retriever(store, multi_query=2)


def test_rerank_orders_by_scorer_and_keeps_hits():
    hits = _hits(["a", "b", "c"])
    out = rerank("q", hits, lambda q, texts: [len(t) + (5 if t.endswith("c") else 0) for t in texts])
    assert [h.doc_id for h in out] == ["c", "a", "b"]
    with pytest.raises(ValueError, match="2 scores for 3 hits"):
        rerank("q", hits, lambda q, t: [1, 2])


class _YesModel(torch.nn.Module):
    """A fake causal LM whose last-position logits favour token `yes_id` when the prompt contains `key`."""

    def __init__(self, vocab: int, yes_id: int, no_id: int, key_ids: list[int]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.yes_id, self.no_id, self.key = vocab, yes_id, no_id, key_ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        row = ids[0].tolist()
        hit = any(row[i:i + len(self.key)] == self.key for i in range(len(row)))
        logits[0, -1, self.yes_id if hit else self.no_id] = 3.0
        return logits


def test_llm_relevance_reranker_log_odds():
    from tinyllm.tokenizer import train_bpe

    tok = train_bpe(["是否相关文档问题答案猫狗宠物"] * 5, 300, show_progress=False)
    yes, no = tok.encode("是")[0], tok.encode("否")[0]
    model = _YesModel(tok.vocab_size, yes, no, tok.encode("猫"))
    rr = LLMRelevanceReranker(model, tok)
    scores = rr.score("宠物", ["狗狗", "猫猫"])
    # log-softmax difference of logits (0 vs 3) at the two tokens: ±3 exactly
    assert scores == pytest.approx([-3.0, 3.0])
    hits = [Hit("x", "x#0", "狗狗", 0, 2, 0.9), Hit("y", "y#0", "猫猫", 0, 2, 0.1)]
    out = rerank("宠物", hits, rr)
    assert [h.doc_id for h in out] == ["y", "x"] and out[0].score == pytest.approx(3.0)


def test_retriever_over_a_store_with_mmr(tmp_path: Path):
    store = RagStore.open(tmp_path / "kb", embedder=HashingEmbedder(1024))
    store.add([("a", "北京今天下雨，气温下降。"), ("b", "北京今天下雨，气温下降！"), ("c", "北京明天晴，适合出游。"),
               ("d", "股票市场今天大涨。")])
    plain = Retriever(store, mode="dense").search("北京今天天气", k=2)
    assert {h.doc_id for h in plain} == {"a", "b"}
    diverse = Retriever(store, mode="dense", mmr_lambda=0.5).search("北京今天天气", k=2)
    assert diverse[0].doc_id in {"a", "b"} and diverse[1].doc_id == "c"  # the near-duplicate gives way
    store.close()
