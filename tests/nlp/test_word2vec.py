"""Word2Vec: Huffman codes, noise table, subsampling, example generation, the batched step against its
per-example reference and against autograd, training on planted structure, word2vec files read by gensim."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch

from tinyllm.nlp.vectors import KeyedVectors
from tinyllm.nlp.word2vec import (
    Word2Vec,
    build_vocab,
    cbow_contexts,
    huffman_tree,
    keep_probabilities,
    sgd_step,
    sgd_step_naive,
    unigram_table,
    window_pairs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ Huffman tree
def test_huffman_hand_example():
    # counts 5,4,3,2,1: merges (1+2)=3 → node 0, (3+3)=6 → node 1, (4+5)=9 → node 2, root 15 → node 3
    codes, points = huffman_tree(np.array([5, 4, 3, 2, 1]))
    assert ["".join(map(str, c)) for c in codes] == ["11", "10", "00", "011", "010"]
    assert [p.tolist() for p in points] == [[3, 2], [3, 2], [3, 1], [3, 1, 0], [3, 1, 0]]


def _optimal_cost(counts):
    heap = list(map(int, counts))
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        s = heapq.heappop(heap) + heapq.heappop(heap)
        cost += s
        heapq.heappush(heap, s)
    return cost


@pytest.mark.parametrize("seed", range(5))
def test_huffman_prefix_free_optimal_and_ordered(seed):
    rng = np.random.default_rng(seed)
    counts = np.sort(rng.integers(1, 1000, 60))[::-1]
    codes, points = huffman_tree(counts)
    strings = ["".join(map(str, c)) for c in codes]
    assert len(set(strings)) == len(strings)
    for a in strings:  # prefix-free
        assert not any(b != a and b.startswith(a) for b in strings)
    lengths = np.array([len(c) for c in codes])
    assert sum(2.0 ** -lengths) == pytest.approx(1.0)          # a full binary tree (Kraft equality)
    assert int((lengths * counts).sum()) == _optimal_cost(counts)  # optimal expected code length
    assert (np.diff(lengths) >= 0).all()                        # more frequent → never a longer code
    assert all(p[0] == len(counts) - 2 for p in points)         # every path starts at the root
    # hierarchical softmax: the leaves' probabilities sum to 1 for any h and node parameters
    theta, h = rng.normal(size=(len(counts) - 1, 8)), rng.normal(size=8)
    probs = [np.prod(1 / (1 + np.exp(-(1 - 2 * c.astype(float)) * (theta[p] @ h)))) for c, p in zip(codes, points)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-12)


def test_huffman_rejects_one_word():
    with pytest.raises(ValueError, match="at least 2"):
        huffman_tree(np.array([3]))


# ------------------------------------------------------------------ noise table and subsampling
def test_unigram_table_follows_count_power():
    counts = np.array([900, 300, 100, 10, 1])
    table = unigram_table(counts, 0.75, size=1_000_000)
    share = np.bincount(table, minlength=len(counts)) / len(table)
    expected = counts**0.75 / (counts**0.75).sum()
    assert np.abs(share - expected).max() < 2e-6
    assert np.abs(np.bincount(unigram_table(counts, 1.0, 1000), minlength=5) / 1000 - counts / counts.sum()).max() \
        < 2e-3


def test_keep_probability_formula():
    counts = np.array([1000, 10, 1])
    t = 1e-3
    tt = t * 1011
    expected = np.minimum((np.sqrt(counts / tt) + 1) * tt / counts, 1.0)
    assert keep_probabilities(counts, t) == pytest.approx(expected)
    assert keep_probabilities(counts, t)[0] == pytest.approx((np.sqrt(1000 / 1.011) + 1) * 1.011 / 1000)
    assert keep_probabilities(counts, t)[0] == pytest.approx(0.03280, abs=1e-5)
    assert (keep_probabilities(counts, 0.0) == 1).all()
    with pytest.raises(ValueError, match="sample=-1"):
        keep_probabilities(counts, -1)


def test_subsampling_and_noise_match_gensim():
    gensim = pytest.importorskip("gensim", reason="gensim is the reference Word2Vec")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    p = 1 / np.arange(1, 41)
    sents = [list(rng.choice(words, 12, p=p / p.sum())) for _ in range(300)]
    ref = gensim.models.Word2Vec(vector_size=8, min_count=2, sample=1e-2, workers=1, hs=1, negative=5)
    ref.build_vocab(sents)
    vocab = build_vocab(sents, min_count=2)
    keep = keep_probabilities(vocab.counts, 1e-2)
    for w, k in zip(vocab.words, keep):
        assert ref.wv.get_vecattr(w, "count") == vocab.counts[vocab.index[w]]
        assert ref.wv.get_vecattr(w, "sample_int") / 2**32 == pytest.approx(min(k, 1.0), abs=1e-9)
    # gensim's cumulative noise table ↔ our per-word share of the table
    ours = np.bincount(unigram_table(vocab.counts, 0.75, 1_000_000), minlength=len(vocab)) / 1_000_000
    ref_share = np.diff(np.r_[0, ref.cum_table]) / ref.cum_table[-1]
    order = [ref.wv.key_to_index[w] for w in vocab.words]
    assert np.abs(ours - ref_share[order]).max() < 2e-6
    # both Huffman trees are optimal: the same expected code length
    codes, _ = huffman_tree(vocab.counts)
    ref_len = sum(len(ref.wv.get_vecattr(w, "code")) * ref.wv.get_vecattr(w, "count") for w in vocab.words)
    assert sum(len(c) * n for c, n in zip(codes, vocab.counts)) == ref_len


# ------------------------------------------------------------------ examples from text
def _brute_pairs(sent, reduced):
    out = []
    for i in range(len(sent)):
        for j in range(len(sent)):
            if i != j and sent[i] == sent[j] and abs(i - j) <= reduced[i]:
                out.append((i, j))
    return sorted(out)


def test_window_pairs_and_cbow_contexts_equal_brute_force():
    rng = np.random.default_rng(1)
    sent = np.repeat(np.arange(6), rng.integers(1, 9, 6))
    for window in (1, 2, 5):
        reduced = window - rng.integers(0, window, len(sent))
        c, x = window_pairs(sent, reduced, window)
        assert list(zip(c.tolist(), x.tolist())) == _brute_pairs(sent, reduced)
        centres, ctx = cbow_contexts(sent, reduced, window)
        by_centre = {}
        for i, j in _brute_pairs(sent, reduced):
            by_centre.setdefault(i, set()).add(j)
        assert centres.tolist() == sorted(by_centre)
        for i, row in zip(centres, ctx):
            assert set(row[row >= 0].tolist()) == by_centre[int(i)]


def test_reduced_window_spans_centre_plus_both_sides():
    # the notes' window span caveat: skip_window=2 covers 2·2+1 = 5 positions including the centre
    sent = np.zeros(9, dtype=np.int64)
    c, x = window_pairs(sent, np.full(9, 2), 2)
    assert sorted(x[c == 4].tolist()) == [2, 3, 5, 6]


# ------------------------------------------------------------------ one SGD step
def _random_batch(rng, v=30, b=16, c=1, t=6):
    inputs = rng.integers(0, v, (b, c))
    in_mask = (rng.random((b, c)) < 0.7).astype(np.float32) if c > 1 else np.ones((b, c), np.float32)
    in_mask[:, 0] = 1
    targets = rng.integers(0, v, (b, t))
    targets[:4, 2] = targets[:4, 1]        # repeated noise words inside one example
    targets[4:8] = targets[0]              # and rows shared across examples
    labels = np.zeros((b, t), np.float32)
    labels[:, 0] = 1
    t_mask = (rng.random((b, t)) < 0.9).astype(np.float32)
    return inputs, in_mask, targets, labels, t_mask


@pytest.mark.parametrize(("c", "cbow_mean"), [(1, True), (4, True), (4, False)])
def test_batched_step_equals_per_example_reference(c, cbow_mean):
    rng = np.random.default_rng(c)
    syn0 = rng.normal(0, 0.3, (30, 10)).astype(np.float32)
    syn1 = rng.normal(0, 0.3, (30, 10)).astype(np.float32)
    batch = _random_batch(rng, c=c)
    a0, a1 = torch.from_numpy(syn0.copy()), torch.from_numpy(syn1.copy())
    loss = sgd_step(a0, a1, *(torch.from_numpy(x) for x in batch), 0.05, cbow_mean)
    b0, b1 = syn0.astype(np.float64), syn1.astype(np.float64)
    ref_loss = sgd_step_naive(b0, b1, *batch, 0.05, cbow_mean)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(a0.numpy(), b0, atol=1e-6)
    np.testing.assert_allclose(a1.numpy(), b1, atol=1e-6)
    assert not np.allclose(a0.numpy(), syn0) and not np.allclose(a1.numpy(), syn1)


def test_single_example_step_equals_word2vec_c_order():
    rng = np.random.default_rng(7)
    syn0 = rng.normal(0, 0.3, (20, 6))
    syn1 = rng.normal(0, 0.3, (20, 6))
    inputs, in_mask = np.array([[3, 5, 9]]), np.ones((1, 3), np.float32)
    targets, labels = np.array([[4, 11, 12, 13]]), np.array([[1.0, 0, 0, 0]])
    t_mask = np.ones((1, 4))
    a0, a1 = torch.from_numpy(syn0.copy()), torch.from_numpy(syn1.copy())
    sgd_step(a0, a1, *(torch.from_numpy(x) for x in (inputs, in_mask, targets, labels, t_mask)), 0.1)
    s0, s1 = syn0.copy(), syn1.copy()
    sgd_step_naive(s0, s1, inputs, in_mask, targets, labels, t_mask, 0.1, sequential=True)
    np.testing.assert_allclose(a0.numpy(), s0, atol=1e-12)
    np.testing.assert_allclose(a1.numpy(), s1, atol=1e-12)


def test_step_is_gradient_descent_on_the_logistic_loss():
    """Skip-gram / summed CBOW: the update is −α·∂loss/∂θ for loss = −log σ(u_o·h) − Σ log σ(−u_k·h)."""
    rng = np.random.default_rng(3)
    for c, cbow_mean in ((1, True), (3, False)):
        inputs, in_mask, targets, labels, t_mask = _random_batch(rng, b=1, c=c)
        in_mask[:] = 1
        inputs[0] = [2, 7, 9][:c]
        t_mask[:] = 1
        targets[0] = [1, 3, 4, 5, 6, 8]
        syn0 = torch.tensor(rng.normal(0, 0.5, (30, 5)))
        syn1 = torch.tensor(rng.normal(0, 0.5, (30, 5)))
        p0, p1 = syn0.clone().requires_grad_(), syn1.clone().requires_grad_()
        h = p0[torch.from_numpy(inputs[0])].sum(0)
        f = p1[torch.from_numpy(targets[0])] @ h
        loss = -torch.nn.functional.logsigmoid((2 * torch.from_numpy(labels[0]).double() - 1) * f).sum()
        loss.backward()
        tensors = [torch.from_numpy(x) for x in (inputs, in_mask.astype(np.float64), targets,
                                                   labels.astype(np.float64), t_mask.astype(np.float64))]
        got = sgd_step(syn0, syn1, *tensors, 0.1, cbow_mean)
        assert got == pytest.approx(loss.item())
        torch.testing.assert_close(syn0, p0.detach() - 0.1 * p0.grad)
        torch.testing.assert_close(syn1, p1.detach() - 0.1 * p1.grad)


# ------------------------------------------------------------------ training on planted structure
def _topic_corpus(n_sent=600, seed=0):
    """4 topics × 6 words; each sentence draws 10 words from one topic (plus shared filler words)."""
    rng = np.random.default_rng(seed)
    topics = [[f"t{k}w{i}" for i in range(6)] for k in range(4)]
    sents = []
    for _ in range(n_sent):
        k = rng.integers(4)
        sent = list(rng.choice(topics[k], 10))
        sent.insert(rng.integers(10), "的")
        sents.append(sent)
    return topics, sents


@pytest.mark.parametrize(("sg", "hs"), [(1, 0), (0, 0), (1, 1), (0, 1)])
def test_training_recovers_planted_topics(sg, hs):
    topics, sents = _topic_corpus()
    model = Word2Vec(sents, vector_size=16, window=3, min_count=1, sg=sg, hs=hs, negative=0 if hs else 5,
                     epochs=3, sample=0, seed=1, batch_size=24, table_size=100_000,
                     progress=False)
    assert model.losses[-1] < model.losses[0]
    for topic in topics:
        for w in topic:
            near = {x for x, _ in model.wv.most_similar(w, topn=5)}
            assert near <= set(topic), (w, near)
    assert model.wv.similarity(topics[0][0], topics[0][1]) > model.wv.similarity(topics[0][0], topics[1][1])


# ------------------------------------------------------------------ vectors and files
def _kv(seed=0, v=50, n=12):
    rng = np.random.default_rng(seed)
    return KeyedVectors([f"词{i}" for i in range(v)], rng.normal(size=(v, n)).astype(np.float32))


@pytest.mark.parametrize("binary", [False, True])
def test_word2vec_files_load_in_gensim_and_back(tmp_path, binary):
    gensim = pytest.importorskip("gensim", reason="gensim reads the word2vec formats")
    kv = _kv()
    path = tmp_path / ("v.bin" if binary else "v.txt")
    kv.save_word2vec_format(path, binary=binary)
    ref = gensim.models.KeyedVectors.load_word2vec_format(str(path), binary=binary)
    assert ref.index_to_key == kv.words
    np.testing.assert_array_equal(ref.vectors, kv.vectors)
    back = KeyedVectors.load_word2vec_format(path, binary=binary)
    np.testing.assert_array_equal(back.vectors, kv.vectors)
    # and a file gensim wrote loads in ours
    ref.save_word2vec_format(str(tmp_path / "g"), binary=binary)
    np.testing.assert_array_equal(KeyedVectors.load_word2vec_format(tmp_path / "g", binary=binary).vectors,
                                  kv.vectors)
    # queries agree with gensim's
    assert kv.similarity("词1", "词2") == pytest.approx(float(ref.similarity("词1", "词2")), abs=1e-6)
    for pos, neg in ((["词3"], []), (["词1", "词2"], ["词0"]), (["词5"], ["词6", "词7"])):
        ours = kv.most_similar(positive=pos, negative=neg, topn=8)
        theirs = ref.most_similar(positive=pos, negative=neg, topn=8)
        assert [w for w, _ in ours] == [w for w, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)


def test_analogy_on_planted_vectors():
    base = {"man": [1, 0, 0, 0], "woman": [0, 1, 0, 0], "child": [0, 0, 0, 1], "royal": [0, 0, 1, 0]}
    words = ["man", "woman", "king", "queen", "apple", "child"]
    vecs = {w: np.array(v, float) for w, v in base.items() if w != "royal"}
    vecs["king"] = vecs["man"] + np.array(base["royal"])
    vecs["queen"] = vecs["woman"] + np.array(base["royal"])
    vecs["apple"] = np.array([-1.0, -1.0, 0.2, 0.5])
    kv = KeyedVectors(words, np.stack([vecs[w] for w in words]))
    assert kv.analogy("man", "king", "woman")[0][0] == "queen"
    assert [w for w, _ in kv.most_similar("king", topn=2)] == ["man", "queen"]  # cos 0.71, 0.5


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="hs=1 with negative=5"):
        Word2Vec(hs=1, negative=5)
    with pytest.raises(ValueError, match="window=0"):
        Word2Vec(window=0)
    with pytest.raises(ValueError, match="min_count=3"):
        build_vocab([["a", "b"]], min_count=3)
    kv = KeyedVectors(["a b", "c"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="'a b'"):
        kv.save_word2vec_format(tmp_path / "x.txt")
    assert not list(tmp_path.iterdir())
    with pytest.raises(KeyError, match="'zz'"):
        kv.similarity("c", "zz")


def test_cli_trains_writes_vectors_and_prints_neighbours(tmp_path, capsys):
    from tinyllm.cli import main

    _, sents = _topic_corpus(n_sent=200)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(s) for s in sents) + "\n", encoding="utf-8")
    out = tmp_path / "vec" / "v.bin"
    rc = main(["word2vec", "--corpus", str(corpus), "--presegmented", "--cbow", "--hs", "--min-count", "1",
               "--dim", "8", "--epochs", "1", "--window", "2", "--threads", "1", "--out", str(out),
               "--probes", "t0w0", "nope", "--topn", "3", "--progress", "false"])
    assert rc == 0
    kv = KeyedVectors.load_word2vec_format(out, binary=True)
    assert len(kv) == 25 and kv.vector_size == 8
    assert (out.parent / "v.config.json").exists()
    printed = capsys.readouterr().out
    assert "CBOW / hierarchical softmax" in printed and "t0w0: " in printed and "nope: (not in the vocabulary)" in printed
    assert main(["word2vec", "--corpus", str(tmp_path / "missing.txt"), "--progress", "false"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_seeded_runs_repeat_and_worker_threads_train_too():
    topics, sents = _topic_corpus(n_sent=300)
    kw = dict(vector_size=12, window=3, min_count=1, sg=0, hs=1, negative=0, epochs=3, sample=0, batch_size=24,
              chunk_words=600, progress=False)
    a, b = Word2Vec(sents, **kw), Word2Vec(sents, **kw)
    np.testing.assert_array_equal(a.wv.vectors, b.wv.vectors)
    two = Word2Vec(sents, threads=2, **kw)  # lock-free workers: same draws per chunk, racing updates
    assert two.losses[-1] < two.losses[0]
    assert {x for x, _ in two.wv.most_similar(topics[1][0], topn=5)} <= set(topics[1])
