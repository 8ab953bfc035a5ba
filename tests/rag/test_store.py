"""RagStore: add/upsert/delete, search modes, reopen gives identical results, atomic updates."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from tinyllm.rag.store import Hit, RagStore

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"id": "bj", "text": "北京是中国的首都。故宫和长城是北京最有名的景点，每年吸引大量游客。", "source": "geo.md",
     "metadata": {"topic": "city"}},
    {"id": "sh", "text": "上海是中国最大的经济中心。外滩的夜景非常漂亮，港口吞吐量世界第一。", "source": "geo.md",
     "metadata": {"topic": "city"}},
    {"id": "rag", "text": "检索增强生成先检索相关文档，再把文档放进提示词。BM25 和向量检索可以混合使用。",
     "source": "ml.md", "metadata": {"topic": "ml"}},
    ("lora", "LoRA 在冻结的权重旁边加入低秩矩阵，只训练很少的参数就能微调大模型。"),
    ("faiss", "Faiss 的 IVF 索引先用 k-means 聚类，查询时只扫描最近的几个簇；HNSW 则是分层图。"),
]
QUERIES = ["北京的景点", "上海 夜景", "向量检索 BM25", "低秩 微调", "HNSW 图索引", "中国"]


class FakeEmbedder:
    """The embedder interface in a few lines: signed hashing of character bigrams, L2-normalised.

    `fail_on_batch=n` raises inside the n-th batch of one encode call (an embedding service going down)."""

    def __init__(self, dim: int = 256, fail_on_batch: int | None = None) -> None:
        self.dim, self.name, self.fail_on_batch = dim, f"fake-{dim}", fail_on_batch

    def spec(self) -> dict:
        return {"type": "fake", "dim": self.dim}

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for b, start in enumerate(range(0, len(texts), batch_size), 1):
            if self.fail_on_batch == b:
                raise RuntimeError(f"embedding batch {b} failed")
            for i in range(start, min(start + batch_size, len(texts))):
                t = texts[i]
                for g in (t[j:j + 2] for j in range(len(t) - 1)):
                    h = zlib.crc32(g.encode())
                    out[i, h % self.dim] += 1.0 if h & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


def _snapshot(store: RagStore) -> dict:
    modes = ("bm25", "dense", "hybrid") if store.embedder is not None else ("bm25",)
    return {(q, m): [(h.chunk_id, round(h.score, 6)) for h in store.search(q, k=4, mode=m)]
            for q in QUERIES for m in modes}


@pytest.fixture
def store(tmp_path):
    with RagStore.open(tmp_path / "kb", embedder=FakeEmbedder(), chunking={"size": 24, "overlap": 4}) as s:
        s.add(DOCS)
        yield s


def test_add_search_and_hits(store: RagStore) -> None:
    assert len(store) == 5 and store.num_chunks > 5 and store.generation == 1
    assert store.get("bj")["metadata"] == {"topic": "city"} and store.get("nope") is None
    assert store.get("lora") == {"id": "lora", "text": DOCS[3][1], "source": "", "metadata": {}}
    for mode in ("bm25", "dense", "hybrid"):
        hits = store.search("北京的景点", k=3, mode=mode)
        assert all(isinstance(h, Hit) for h in hits) and 0 < len(hits) <= 3
        for h in hits:
            assert h.text == store.get(h.doc_id)["text"][h.start:h.end]
            assert h.chunk_id.startswith(h.doc_id + "#")
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert store.search("北京的景点", k=1, mode="bm25")[0].doc_id == "bj"
    assert store.search("外滩的夜景非常漂亮", k=1, mode="dense")[0].doc_id == "sh"
    top = store.search("低秩矩阵微调", k=1)[0]  # default mode with an embedder: hybrid
    assert top.doc_id == "lora" and top.score == pytest.approx(2 / 61)  # rank 1 in both lists
    hit = store.search("故宫", k=1, mode="bm25")[0]
    assert hit.source == "geo.md" and hit.metadata == {"topic": "city"}
    chunks = store.chunks("bj")
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) > 1
    assert all(c.text == DOCS[0]["text"][c.start:c.end] and len(c.text) <= 24 for c in chunks)


def test_hybrid_is_rrf_of_both_lists(store: RagStore) -> None:
    q = "向量检索 BM25"
    bm25 = [h.chunk_id for h in store.search(q, k=50, mode="bm25")]
    dense = [h.chunk_id for h in store.search(q, k=50, mode="dense")]
    want = {}
    for ranking in (bm25, dense):
        for r, cid in enumerate(ranking, 1):
            want[cid] = want.get(cid, 0) + 1 / (60 + r)
    got = store.search(q, k=5, mode="hybrid")
    assert [h.chunk_id for h in got] == sorted(want, key=lambda c: -want[c])[:5]
    assert [h.score for h in got] == pytest.approx(sorted(want.values(), reverse=True)[:5])


def test_upsert_delete_and_skip_unchanged(store: RagStore) -> None:
    old_chunks = {c.chunk_id for c in store.chunks("bj")}
    assert store.add([DOCS[0]]) == 0 and store.generation == 1  # unchanged: nothing rewritten
    assert store.add([{"id": "bj", "text": "北京烤鸭很好吃。", "metadata": {"topic": "food"}}]) == 1
    assert len(store) == 5 and store.get("bj")["metadata"] == {"topic": "food"}
    assert [c.chunk_id for c in store.chunks("bj")] == ["bj#0"] and "bj#1" in old_chunks
    assert all(h.doc_id != "bj" for h in store.search("故宫 长城", k=10, mode="bm25"))
    assert store.search("北京烤鸭", k=1, mode="bm25")[0].chunk_id == "bj#0"
    assert store.delete("sh") == 1 and store.delete(["sh", "zzz"]) == 0
    assert len(store) == 4 and "sh" not in store
    for mode in ("bm25", "dense", "hybrid"):
        assert all(h.doc_id != "sh" for h in store.search("上海 外滩 夜景", k=20, mode=mode))
    assert sorted(p.name for p in store.directory.glob("index-*")) == [f"index-{store.generation:06d}"]


def test_reopen_gives_identical_results(tmp_path, store: RagStore) -> None:
    before, gen = _snapshot(store), store.generation
    store.close()
    with RagStore.open(store.directory, embedder=FakeEmbedder()) as again:
        assert _snapshot(again) == before and again.generation == gen and len(again) == 5
        assert again.chunking == {"strategy": "recursive", "size": 24, "overlap": 4}
    with pytest.raises(ValueError, match="chunking="):
        RagStore.open(store.directory, embedder=FakeEmbedder(), chunking={"size": 100})
    with pytest.raises(ValueError, match="differs from the stored"):
        RagStore.open(store.directory, embedder=FakeEmbedder(dim=32))


def test_reopen_rebuilds_the_embedder_from_its_spec(tmp_path) -> None:
    embed = pytest.importorskip("tinyllm.rag.embed")
    with RagStore.open(tmp_path / "kb", embedder=embed.HashingEmbedder(dim=256)) as s:
        s.add(DOCS)
        before = _snapshot(s)
    with RagStore.open(tmp_path / "kb") as s:  # no embedder given: load_embedder(stored spec)
        assert s.embedder.spec() == embed.HashingEmbedder(dim=256).spec()
        assert _snapshot(s) == before


def test_failed_embedding_leaves_the_previous_store(store: RagStore) -> None:
    before, gen, n = _snapshot(store), store.generation, store.num_chunks
    new_docs = [(f"n{i}", f"第{i}篇新文档，内容各不相同，编号{i}。" * 3) for i in range(40)]
    store.embedder.fail_on_batch = 3
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        store.add(new_docs, batch_size=8)
    assert store.generation == gen and len(store) == 5 and store.num_chunks == n
    assert _snapshot(store) == before and store.get("n0") is None
    store.embedder.fail_on_batch = None
    store.close()
    with RagStore.open(store.directory, embedder=FakeEmbedder()) as again:
        assert _snapshot(again) == before
        again.add(new_docs)
        assert len(again) == 45 and again.search("编号7", k=1, mode="bm25")[0].doc_id.startswith("n")


def test_failure_while_writing_indexes_rolls_back(store: RagStore, monkeypatch) -> None:
    before, gen = _snapshot(store), store.generation

    def broken_save(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(type(store._dense), "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        store.add([("x", "新文档的内容。")])
    with pytest.raises(OSError, match="disk full"):
        store.delete("bj")
    monkeypatch.undo()
    assert store.generation == gen and len(store) == 5 and store.get("x") is None
    assert _snapshot(store) == before  # in-memory indexes were reloaded from the committed generation
    assert [p.name for p in store.directory.glob("index-*")] == [f"index-{gen:06d}"]


def test_crash_before_commit_keeps_the_committed_generation(tmp_path) -> None:
    """A process killed after writing the new index files but before COMMIT: the reopened store is the old one."""
    directory = tmp_path / "en"  # an English-tokenized store: the child skips the segmenter
    with RagStore.open(directory, embedder=FakeEmbedder(), bm25={"tokenizer": "en"}) as s:
        s.add(DOCS)
        before, gen = _snapshot(s), s.generation
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
        from test_store import FakeEmbedder
        from tinyllm.rag.dense import DenseIndex
        from tinyllm.rag.store import RagStore
        real = DenseIndex.save
        def save_then_die(self, d):
            real(self, d)
            os._exit(3)  # index files of generation g+1 are complete, the transaction is not committed
        DenseIndex.save = save_then_die
        s = RagStore.open({str(directory)!r}, embedder=FakeEmbedder())
        s.add([("x", "崩溃前写入的文档。")])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert (directory / f"index-{gen + 1:06d}").exists()  # the orphan is there ...
    with RagStore.open(directory, embedder=FakeEmbedder()) as again:
        assert again.generation == gen and again.get("x") is None and _snapshot(again) == before
        assert not (directory / f"index-{gen + 1:06d}").exists()  # ... and cleaned up on open


def test_bm25_only_store_and_bad_input(tmp_path) -> None:
    with RagStore.open(tmp_path / "plain", bm25={"variant": "bm25+", "tokenizer": "en"}) as s:
        s.add([("a", "The quick brown fox."), ("b", "A lazy dog sleeps all day. The dog is brown.")])
        assert [h.doc_id for h in s.search("brown dog")] == ["b", "a"]
        with pytest.raises(ValueError, match="needs an embedder"):
            s.search("dog", mode="dense")
        with pytest.raises(ValueError, match="mode='sparse'"):
            s.search("dog", mode="sparse")
        with pytest.raises(ValueError, match="k=0"):
            s.search("dog", k=0)
        with pytest.raises(ValueError, match="id=''"):
            s.add([("", "x")])
        with pytest.raises(ValueError, match="duplicate document id 'a'"):
            s.add([("a", "x"), ("a", "y")])
        with pytest.raises(ValueError, match="unknown document fields"):
            s.add([{"id": "c", "text": "x", "title": "t"}])
        assert len(s) == 2
    with pytest.raises(ValueError, match="strategy='semantic'"):
        RagStore.open(tmp_path / "bad", chunking={"strategy": "semantic"})
    with pytest.raises(ValueError, match="variant='bm26'"):
        RagStore.open(tmp_path / "bad2", bm25={"variant": "bm26"})


def test_searches_from_threads_during_updates(store: RagStore) -> None:
    import threading

    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(15):
                for h in store.search("北京 上海 检索", k=5, mode="hybrid"):
                    assert len(h.text) == h.end - h.start and h.chunk_id.startswith(h.doc_id + "#")
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(4):
        store.add([(f"t{i}", f"线程测试文档{i}：北京和上海的检索系统。")])
        store.delete("sh" if i == 1 else f"t{i - 1}" if i else "none")
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted(store.ids()) == ["bj", "faiss", "lora", "rag", "t0", "t3"]
    assert store._bm25.ids == store._dense.ids  # both indexes hold exactly the stored chunks
    assert sorted(store._bm25.ids) == sorted(c.chunk_id for d in store.ids() for c in store.chunks(d))
