"""Hallucination scores on tiny fixtures: SelfCheck overlap is 0 for samples that repeat a sentence and 1 for
samples that share nothing; SelfCheck-unigram equals its formula computed by hand; retrieval support is full
for a claim a retrieved passage states and drops for a swapped word; token entropy and length-normalised
log-probability equal a hand computation from a transformers model's full logits, for our model and the HF
one; AUROC equals sklearn's `roc_auc_score` (ties included) and a brute-force pair count; the inews fact set
is balanced, deterministic and its corruptions differ from the real titles."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from eval_helpers import save_tiny_lm

from tinyllm.eval import hallucination as H
from tinyllm.rag.bm25 import BM25Index


def test_units_and_sentences() -> None:
    assert H.tokens("2018年iPhone X发布，售价8999元") == ["2018", "年", "iphone", "x", "发", "布", "售", "价", "8999", "元"]
    assert H.split_sentences("今天很好。我们去公园！Then we left. OK?\nyes") == [
        "今天很好。", "我们去公园！", "Then we left.", "OK?", "yes"]
    assert H.coverage("北京大学", "我在北京上学", 1) == 0.75 and H.coverage("北京大学", "北京大学", 2) == 1.0


def test_selfcheck_overlap() -> None:
    main = ["巴黎是法国的首都。", "埃菲尔铁塔高三百米。"]
    assert H.selfcheck_overlap(main, [" ".join(main)] * 3) == [0.0, 0.0]
    assert H.selfcheck_overlap(main, ["xyz", "abc"]) == [1.0, 1.0]
    # the first sentence recurs in one sample of two, the second in none
    scores = H.selfcheck_overlap(main, ["巴黎是法国的首都。", "今天下雨"], n=2)
    assert scores[0] == pytest.approx(0.5) and scores[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one sampled answer"):
        H.selfcheck_overlap(main, [])


def test_selfcheck_unigram_equals_its_formula() -> None:
    # units a:3 b:2 c:1 (N = 6) and '<unk>': |V| = 4, add-one smoothing
    r = H.selfcheck_unigram(["a d", "a b"], ["a b", "a c"], passage="a b")
    p_a, p_b, p_d = 4 / 10, 3 / 10, 1 / 10
    assert r["avg_neg_logprob"] == pytest.approx([-(math.log(p_a) + math.log(p_d)) / 2,
                                                  -(math.log(p_a) + math.log(p_b)) / 2])
    assert r["max_neg_logprob"] == pytest.approx([-math.log(p_d), -math.log(p_b)])
    assert r["doc_avg_neg_logprob"] == pytest.approx(-(2 * math.log(p_a) + math.log(p_b) + math.log(p_d)) / 4)
    # a sentence the samples repeat scores lower than one they never say
    s = H.selfcheck_unigram(["the cat sat", "the dog flew"], ["the cat sat"] * 3)["avg_neg_logprob"]
    assert s[0] < s[1]


def test_retrieval_support() -> None:
    docs = {"d1": "The Eiffel Tower is in Paris.", "d2": "The Colosseum is in Rome.", "d3": "Berlin has a wall."}
    index = BM25Index(tokenizer="en")
    index.add(list(docs), list(docs.values()))
    r = H.retrieval_support(["Eiffel Tower is in Paris", "Eiffel Tower is in Rome", "Tokyo tower"], index, docs,
                            k=1, n=1)
    assert r[0]["support"] == 1.0 and r[0]["score"] == 0.0 and r[0]["passages"] == ["d1"]
    assert r[1]["score"] == pytest.approx(1 / 5) and r[2]["score"] == pytest.approx(1 / 2)
    q = H.retrieval_support(["is in Rome"], index, docs, queries=["Eiffel Tower"], k=1, n=2)
    assert q[0]["passages"] == ["d1"] and q[0]["support"] == pytest.approx(1 / 2)  # "is in" yes, "in rome" no
    with pytest.raises(ValueError, match="2 claims but 1 queries"):
        H.retrieval_support(["a", "b"], index, docs, queries=["a"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny"))


def test_uncertainty_equals_a_hand_computation(tiny: Path) -> None:
    from tinyllm.eval.lm import HFLM, TinyLM, encode_pair
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    hf = HFLM.from_pretrained(str(tiny))
    ours = TinyLM(load_model(tiny), load_tokenizer(tiny))
    pairs = [("the model reads the question", " and the following answer"), ("What is", " 注意力 机制"),
             ("Question: tiny math", " A")]
    got_hf, got = H.sequence_uncertainty(hf, pairs, batch_size=2), H.sequence_uncertainty(ours, pairs)
    for (ctx, cont), a, b in zip(pairs, got_hf, got):
        c, x = encode_pair(hf.encode, ctx, cont)
        with torch.no_grad():
            logp = torch.log_softmax(hf.model(torch.tensor([c + x])).logits[0, len(c) - 1: -1].float(), -1)
        lp = logp[torch.arange(len(x)), torch.tensor(x)]
        ent = -(logp.exp() * logp).sum(-1)
        assert a["tokens"] == b["tokens"] == len(x)
        for r in (a, b):
            assert r["mean_logprob"] == pytest.approx(float(lp.mean()), abs=1e-4)
            assert r["min_logprob"] == pytest.approx(float(lp.min()), abs=1e-4)
            assert r["mean_entropy"] == pytest.approx(float(ent.mean()), abs=1e-4)
    assert 0 < got[0]["mean_entropy"] <= math.log(320) + 1e-4


def test_auroc_against_sklearn_and_pair_count() -> None:
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(2, 40)
        labels = [rng.randint(0, 1) for _ in range(n)]
        labels[0], labels[1] = 0, 1
        scores = [float(rng.randint(0, 5)) if trial % 2 else rng.random() for _ in range(n)]  # ties half the time
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
        assert H.auroc(scores, labels) == pytest.approx(pairs)
    metrics = pytest.importorskip("sklearn.metrics")
    labels = [rng.randint(0, 1) for _ in range(200)]
    scores = [float(rng.randint(0, 9)) for _ in range(200)]
    assert H.auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))
    assert H.auroc([0.1, 0.9], [0, 1]) == 1.0 and H.auroc([0.9, 0.1], [0, 1]) == 0.0


@pytest.mark.parametrize("scores, labels, match", [
    ([0.1, 0.2], [1, 1], "needs both classes"), ([0.1], [0, 1], "1 scores but 2 labels"),
    ([0.1, 0.2], [0, 2], "labels must be 0 or 1, got 2"), ([math.nan, 0.2], [0, 1], "NaN")])
def test_auroc_bad_input(scores: list, labels: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        H.auroc(scores, labels)


def test_inews_fact_set() -> None:
    facts = H.inews_fact_set(n=30)
    assert facts == H.inews_fact_set(n=30)
    assert len(facts) == 60 and sum(f["label"] for f in facts) == 30
    kinds = {f["kind"] for f in facts if f["label"]}
    assert kinds == set(H.KINDS)
    for true, fake in zip(facts[::2], facts[1::2]):
        assert true["context"] == fake["context"] and true["label"] == 0 and fake["label"] == 1
        assert fake["claim"] != true["claim"]
        if fake["kind"] == "number":
            assert [c for c in fake["claim"] if not c.isdigit()] == [c for c in true["claim"] if not c.isdigit()]
    with pytest.raises(ValueError, match="n=0 must be in"):
        H.inews_fact_set(n=0)
    rng = random.Random(0)
    assert H.change_number("拍出26套房产", rng) not in (None, "拍出26套房产") and H.change_number("无数字", rng) is None


def test_score_fact_set_end_to_end(tiny: Path) -> None:
    from tinyllm.eval.lm import TinyLM
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    facts = H.inews_fact_set(n=4)
    r = H.score_fact_set(TinyLM(load_model(tiny), load_tokenizer(tiny)), facts, k=2, max_gen_toks=3)
    assert set(r["auroc"]) == set(r["scores"]) and r["n"] == 8
    assert all(len(s) == 8 for s in r["scores"].values())
    assert all(0.0 <= a <= 1.0 for a in r["auroc"].values())
    assert {len(v) for v in r["samples"].values()} == {2} and len(r["samples"]) == 4
    # one AUROC per corruption kind present
    assert set(r["auroc_by_kind"]["mean_entropy"]) == {f["kind"] for f in facts if f["label"]}
