"""BM25 parity with rank_bm25 and bm25s, the naive oracle, updates; dense exact ≡ faiss Flat; ANN recall; fusion."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tinyllm.rag.index import (
    BM25Index,
    DenseIndex,
    bm25_naive_scores,
    reciprocal_rank_fusion,
    tokenize_en,
    tokenize_zh,
    weighted_score_fusion,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ZH_DOCS = [
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "上海是中国最大的经济中心，港口吞吐量位居世界前列。",
    "大语言模型通过预训练学习语言知识，再经过指令微调对齐人类偏好。",
    "检索增强生成先从知识库检索相关文档，再把文档放进提示词让模型回答。",
    "BM25 是一种经典的关键词检索算法，考虑词频、逆文档频率和文档长度。",
    "向量检索把文本编码成稠密向量，用余弦相似度找最近邻。",
    "Faiss 提供 IVF 和 HNSW 等近似最近邻索引，适合大规模向量检索。",
    "北京的故宫和长城吸引了大量游客，文化旅游十分发达。",
    "模型微调可以使用 LoRA 等参数高效方法，显著减少显存占用。",
    "混合检索结合 BM25 与向量检索，用倒数排名融合合并结果。",
    "上海的外滩和东方明珠是著名景点，夜景非常漂亮。",
    "知识库问答是大模型应用的入门场景，检索质量决定回答质量。",
]


def _random_corpus(seed: int, n_docs: int = 80, vocab: int = 50) -> list[list[str]]:
    """Zipf-ish token lists: a few terms appear in most documents (negative Okapi IDF), many are rare."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    return [[words[min(int(rng.paretovariate(0.7)) - 1, vocab - 1)] for _ in range(rng.randint(1, 40))]
            for _ in range(n_docs)]


def _queries(seed: int, corpus: list[list[str]], n: int = 25) -> list[list[str]]:
    rng = random.Random(seed)
    vocab = sorted({t for d in corpus for t in d})
    return [[rng.choice([*vocab, "unseen"]) for _ in range(rng.randint(1, 6))] for _ in range(n)]


def _index(corpus: list[list[str]], **kw) -> BM25Index:
    ix = BM25Index(tokenizer="en", **kw)
    ix.add_tokens([f"d{i}" for i in range(len(corpus))], corpus)
    return ix


def _same_ranking(ours: list[tuple[str, float]], ref_ids: list[str], ref_scores: np.ndarray, tol: float) -> None:
    """Equal top-k lists, except that two ids whose scores tie within `tol` may come in either order."""
    assert len(ours) == len(ref_ids)
    np.testing.assert_allclose([s for _, s in ours], ref_scores, rtol=tol, atol=tol)
    ref = np.asarray(ref_scores)
    for pos, ((oid, _), rid) in enumerate(zip(ours, ref_ids)):
        if oid != rid:  # only a float tie (with a neighbour, or with the k+1-th at the end) may swap ids
            tied = np.abs(np.delete(ref, pos) - ref[pos]) <= tol * max(1.0, abs(ref[pos]))
            assert tied.any() or pos == len(ref_ids) - 1, (pos, oid, rid)


# ---------------------------------------------------------------------------------------------- BM25 parity


@pytest.mark.parametrize("variant", ["okapi", "bm25+"])
@pytest.mark.parametrize("params", [{}, {"k1": 1.2, "b": 0.5}, {"k1": 2.0, "b": 1.0}])
def test_scores_equal_rank_bm25(variant: str, params: dict) -> None:
    rank_bm25 = pytest.importorskip("rank_bm25")
    cls = {"okapi": rank_bm25.BM25Okapi, "bm25+": rank_bm25.BM25Plus}[variant]
    for seed in range(3):
        corpus = _random_corpus(seed)
        ours, ref = _index(corpus, variant=variant, **params), cls(corpus, **params)
        for q in _queries(seed, corpus):
            np.testing.assert_allclose(ours.scores(q), ref.get_scores(q), rtol=1e-12, atol=1e-12)


def test_okapi_epsilon_floor_matches_rank_bm25() -> None:
    rank_bm25 = pytest.importorskip("rank_bm25")
    corpus = [["common", "x"], ["common", "y"], ["common"], ["z"]]  # "common": n=3 > N/2 → negative IDF
    for eps in (0.0, 0.25, 0.5):
        ref = rank_bm25.BM25Okapi(corpus, epsilon=eps)
        ours = _index(corpus, epsilon=eps)
        np.testing.assert_allclose(ours.scores(["common", "x"]), ref.get_scores(["common", "x"]), rtol=1e-12)
        assert ours._compile()["idf"][ours.vocab["common"]] == pytest.approx(ref.idf["common"])


def test_bm25l_equals_rank_bm25_formula_and_pins_its_extra_tf_factor() -> None:
    rank_bm25 = pytest.importorskip("rank_bm25")
    corpus = _random_corpus(7)
    ref = rank_bm25.BM25L(corpus)
    ours = _index(corpus, variant="bm25l")
    dl = np.array(ref.doc_len, dtype=float)
    for q in _queries(7, corpus):
        # rank_bm25's own statistics with the formula of its PR #20 (Lv & Zhai: no factor tf outside c)
        want = np.zeros(len(corpus))
        for t in q:
            tf = np.array([d.get(t, 0) for d in ref.doc_freqs], dtype=float)
            c = tf / (1 - ref.b + ref.b * dl / ref.avgdl)
            want += ref.idf.get(t, 0) * (ref.k1 + 1) * (c + ref.delta) / (ref.k1 + c + ref.delta)
        np.testing.assert_allclose(ours.scores(q), want, rtol=1e-12)
    # rank_bm25 0.2.2 multiplies each term's part by tf: for a one-term query, its score = tf × ours where tf > 0
    for t in ["w0", "w3"]:
        tf = np.array([d.get(t, 0) for d in ref.doc_freqs], dtype=float)
        got = ref.get_scores([t])
        np.testing.assert_allclose(got[tf > 0], (tf * ours.scores([t]))[tf > 0], rtol=1e-12)
        assert np.all(got[tf == 0] == 0) and np.all(ours.scores([t])[tf == 0] > 0)


@pytest.mark.parametrize("variant", ["okapi", "lucene", "bm25l", "bm25+"])
def test_fast_scores_equal_naive_oracle(variant: str) -> None:
    corpus = _random_corpus(3)
    ix = _index(corpus, variant=variant, k1=1.3, b=0.6)
    for q in _queries(3, corpus):
        np.testing.assert_allclose(ix.scores(q), bm25_naive_scores(corpus, q, variant, k1=1.3, b=0.6),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("method", "variant", "scale", "kw"), [
    ("lucene", "lucene", 1.0, {}),
    ("robertson", "okapi", 2.5, {"epsilon": 0.0}),  # okapi with ε=0 is (k1+1) × robertson
    ("bm25+", "bm25+", 1.0, {"delta": 0.5}),
    ("bm25l", "bm25l", 1.0, {"delta": 0.5}),
])
def test_topk_and_scores_equal_bm25s(method: str, variant: str, scale: float, kw: dict) -> None:
    bm25s = pytest.importorskip("bm25s")
    for seed in range(2):
        corpus = _random_corpus(seed, n_docs=150, vocab=120)
        ref = bm25s.BM25(method=method, k1=1.5, b=0.75, delta=0.5)
        ref.index(corpus, show_progress=False)
        ours = _index(corpus, variant=variant, **kw)
        for q in _queries(seed, corpus, n=15):
            q = [t for t in q if t != "unseen"] or ["w1"]
            np.testing.assert_allclose(ours.scores(q), scale * ref.get_scores(q), rtol=2e-6, atol=1e-5)
            hits = ours.search(q, k=10)
            ids, scores = ref.retrieve([q], k=len(hits), show_progress=False)
            _same_ranking(hits, [f"d{i}" for i in ids[0]], scale * scores[0], tol=1e-5)


def test_chinese_tokenizer_and_search() -> None:
    pytest.importorskip("jieba")
    toks = tokenize_zh("BM25 是一种经典的关键词检索算法。Hello World")
    assert "检索" in toks and "bm25" in toks and "world" in toks and "。" not in toks
    assert tokenize_en("Hello, World! x2") == ["hello", "world", "x2"]
    ix = BM25Index()  # tokenizer="zh"
    ix.add([f"z{i}" for i in range(len(ZH_DOCS))], ZH_DOCS)
    assert ix.search("北京的文化", k=2)[0][0] in {"z0", "z7"}
    assert {d for d, _ in ix.search("上海 景点", k=2)} == {"z1", "z10"}
    assert ix.search("混合检索 倒数排名融合", k=1)[0][0] == "z9"
    assert ix.search("完全无关的词语组合火星", k=5) == [] or ix.search("火星", k=5) == []


def test_zh_bigram_tokenizer() -> None:
    from tinyllm.rag.bm25 import tokenize_zh_bigram

    assert tokenize_zh_bigram("北京烤鸭，好！Hello 2024年") == ["北京", "京烤", "烤鸭", "好", "hello", "2024", "年"]
    ix = BM25Index(tokenizer="zh-bigram")
    ix.add([f"z{i}" for i in range(len(ZH_DOCS))], ZH_DOCS)
    assert {d for d, _ in ix.search("上海 景点", k=2)} == {"z1", "z10"}
    assert ix.search("倒数排名融合", k=1)[0][0] == "z9"


def test_remove_and_upsert_equal_a_fresh_build(tmp_path) -> None:
    corpus = _random_corpus(5)
    ids = [f"d{i}" for i in range(len(corpus))]
    ix = _index(corpus)
    ix.remove(["d3", "d10", "nope"])
    ix.add_tokens(["d5"], [["w1", "w2", "w2"]])  # replaces d5
    keep = [i for i in range(len(corpus)) if ids[i] not in ("d3", "d10", "d5")]
    fresh = BM25Index(tokenizer="en")
    fresh.add_tokens([ids[i] for i in keep] + ["d5"], [corpus[i] for i in keep] + [["w1", "w2", "w2"]])
    assert len(ix) == len(fresh) == len(corpus) - 2
    for q in _queries(5, corpus):
        assert ix.search(q, 10) == fresh.search(q, 10)
    ix.save(tmp_path)
    back = BM25Index.load(tmp_path)
    assert back.ids == ix.ids and back.config() == ix.config()
    for q in _queries(6, corpus):
        np.testing.assert_array_equal(back.scores(q), ix.scores(q))  # same arrays, same code: bit-equal
    custom = BM25Index(tokenizer=str.split)
    custom.add(["a"], ["x y"])
    custom.save(tmp_path / "c")
    with pytest.raises(ValueError, match="custom tokenizer"):
        BM25Index.load(tmp_path / "c")
    assert BM25Index.load(tmp_path / "c", tokenizer=str.split).search("x", 1) == custom.search("x", 1)


def test_bm25_bad_input() -> None:
    with pytest.raises(ValueError, match="variant='bm26'"):
        BM25Index(variant="bm26")
    with pytest.raises(ValueError, match=r"b=1\.5"):
        BM25Index(b=1.5)
    with pytest.raises(ValueError, match="tokenizer='fr'"):
        BM25Index(tokenizer="fr")
    ix = BM25Index(tokenizer="en")
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        ix.add(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="k=0"):
        ix.search("x", 0)
    assert ix.search("x", 3) == [] and len(ix.scores("x")) == 0


# ----------------------------------------------------------------------------------------------------- dense


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_equals_faiss_flat(metric: str) -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    x, q = _unit(rng, 3000, 32), _unit(rng, 40, 32)
    ids = [f"v{i}" for i in range(len(x))]
    exact, flat = DenseIndex(32, "exact", metric), DenseIndex(32, "faiss-flat", metric)
    for ix in (exact, flat):
        ix.add(ids, x)
        ix.remove(["v5", "v17"])
        ix.add(["v17"], x[17] * 0 + x[18])  # re-added under a new label
    for qs in (q, q[:3]):  # faiss switches from SIMD loops to BLAS at 20 queries
        a, b = exact.search(qs, 10), flat.search(qs, 10)
        for ra, rb in zip(a, b):
            _same_ranking(ra, [i for i, _ in rb], np.array([s for _, s in rb]), tol=1e-5)
    top = exact.search(x[18], 2)[0]
    assert {i for i, _ in top} == {"v17", "v18"} and "v5" not in {i for r in a for i, _ in r}


def test_pinecone_example_squared_l2() -> None:
    """Notes 8.1.e: Euclidean query [0.3]*8 over A..E = [0.1]*8 … [0.5]*8 gives C 0.0, then D and B at 0.08."""
    for backend in ("exact", "faiss-flat"):
        ix = DenseIndex(8, backend, metric="l2")
        ix.add(list("ABCDE"), np.array([[v] * 8 for v in (0.1, 0.2, 0.3, 0.4, 0.5)]))
        hits = ix.search(np.full(8, 0.3), k=3)[0]
        assert hits[0][0] == "C" and hits[0][1] == pytest.approx(0.0, abs=1e-6)
        assert {i for i, _ in hits[1:]} == {"B", "D"}
        assert [s for _, s in hits[1:]] == pytest.approx([0.08, 0.08], abs=1e-6)  # 8 × 0.1², squared


def _recall(ix: DenseIndex, truth: list[list[tuple[str, float]]], q: np.ndarray, k: int) -> float:
    got = ix.search(q, k)
    return float(np.mean([len({i for i, _ in g} & {i for i, _ in t}) / k for g, t in zip(got, truth)]))


def test_ann_recall_and_removal() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    centers = _unit(rng, 50, 32)  # clustered data, as embeddings are
    x = centers[rng.integers(0, 50, 8000)] + 0.3 * rng.standard_normal((8000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, 8000, 100)] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    ids = [f"v{i}" for i in range(len(x))]
    exact = DenseIndex(32)
    exact.add(ids, x)
    truth = exact.search(q, 10)
    ivf = DenseIndex(32, "faiss-ivf", nlist=64, nprobe=16)  # recall 0.94 here; nprobe=8: 0.86
    hnsw = DenseIndex(32, "faiss-hnsw", hnsw_m=16, ef_search=64)
    for ix in (ivf, hnsw):
        ix.add(ids, x)
        assert _recall(ix, truth, q, 10) >= 0.9
    ivf_one = DenseIndex(32, "faiss-ivf", nlist=64, nprobe=1)
    ivf_one.add(ids, x)
    assert _recall(ivf_one, truth, q, 10) < _recall(ivf, truth, q, 10)  # fewer cells scanned, lower recall
    # removal: IVF uses its own ids (IndexIDMap over IVF mislabels hits after remove_ids); HNSW rebuilds
    gone = [i for i, _ in truth[0][:5]]
    for ix in (ivf, hnsw, exact):
        ix.remove(gone)
        hits = ix.search(q[:1], 10)[0]
        assert not {i for i, _ in hits} & set(gone)
        for i, s in hits:  # every returned id carries its own vector's score
            assert s == pytest.approx(float(x[int(i[1:])] @ q[0]), abs=1e-4)


@pytest.mark.parametrize("backend", ["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"])
def test_dense_save_load_round_trip(tmp_path, backend: str) -> None:
    if backend != "exact":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    x, q = _unit(rng, 500, 16), _unit(rng, 5, 16)
    ix = DenseIndex(16, backend)
    ix.add([f"v{i}" for i in range(500)], x)
    ix.remove(["v1"])
    before = ix.search(q, 5)
    ix.save(tmp_path)
    back = DenseIndex.load(tmp_path)
    assert back.search(q, 5) == before and back.config() == ix.config() and len(back) == 499
    back.add(["new"], q[0])
    assert back.search(q[:1], 1)[0][0][0] == "new"
    assert len(list(tmp_path.glob("faiss-*.index"))) == (1 if backend in ("faiss-ivf", "faiss-hnsw") else 0)


def test_dense_bad_input() -> None:
    with pytest.raises(ValueError, match="backend='annoy'"):
        DenseIndex(8, "annoy")
    with pytest.raises(ValueError, match="metric='cos'"):
        DenseIndex(8, metric="cos")
    ix = DenseIndex(4)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        ix.add(["a", "b"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        ix.add(["a"], np.full(4, np.nan))
    assert ix.search(np.ones(4), 3) == [[]]


# ---------------------------------------------------------------------------------------------------- fusion


def test_reciprocal_rank_fusion_closed_form() -> None:
    fused = reciprocal_rank_fusion([["a", "b", "c"], [("c", 9.0), ("a", 5.0), ("d", 1.0)]], k=60)
    want = {"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63}
    assert [d for d, _ in fused] == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx(want)
    assert reciprocal_rank_fusion([["x", "y"], ["y", "x"]]) == [("x", 1 / 61 + 1 / 62), ("y", 1 / 62 + 1 / 61)]
    with pytest.raises(ValueError, match="same id twice"):
        reciprocal_rank_fusion([["a", "a"]])


def test_weighted_score_fusion() -> None:
    bm25 = [("a", 12.0), ("b", 6.0), ("c", 0.0)]
    dense = {"c": 0.9, "a": 0.5, "d": 0.1}
    fused = dict(weighted_score_fusion([bm25, dense], weights=[0.3, 0.7]))
    assert fused == pytest.approx({"a": 0.3 * 1 + 0.7 * 0.5, "b": 0.3 * 0.5, "c": 0.7 * 1.0, "d": 0.0})
    raw = dict(weighted_score_fusion([bm25, dense], normalize="none"))
    assert raw["a"] == pytest.approx(12.5)
    with pytest.raises(ValueError, match="normalize='l2'"):
        weighted_score_fusion([bm25], normalize="l2")
