"""TF-IDF and TextRank keywords equal jieba.analyse (same words, same order, same weights); the joint-HMM
POS tagger equals jieba.posseg; PageRank sweeps converge to the linear-system fixed point."""

from __future__ import annotations

import math

import pytest

from tinyllm.data.corpora import inews
from tinyllm.nlp import keywords as kw
from tinyllm.nlp.posseg import PossegTagger

pytest.importorskip("jieba", reason="jieba.analyse is the reference keyword extractor")
import jieba
import jieba.analyse
import jieba.posseg

pytestmark = pytest.mark.usefixtures("one_thread")

THREADS = ("线程是程序执行时的最小单位，它是进程的一个执行流，是CPU调度和分派的基本单位，一个进程可以由很多个线程"
           "组成，线程间共享进程的所有资源，每个线程有自己的堆栈和局部变量。线程由CPU独立调度执行，在多CPU环境下"
           "就允许多个线程同时运行。同样多线程也可以实现并发操作，每个请求分配一个线程来处理。")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    arts = [a for a in inews("test") if a.content][:24]
    return [f"{a.title}\n{a.content}" for a in arts]


@pytest.fixture(scope="module")
def jieba_pairs():
    return lambda text: [(p.word, p.flag) for p in jieba.posseg.lcut(text)]


def test_tfidf_ranking_equals_jieba(docs):
    # the ranking algorithm alone: same cut (jieba's), same idf table → identical words and float weights
    for text in docs:
        ours = kw.extract_tfidf(text, topk=20, with_weight=True, cut=jieba.lcut)
        assert ours == jieba.analyse.extract_tags(text, topK=20, withWeight=True)


def test_textrank_ranking_equals_jieba(docs, jieba_pairs):
    for text in docs:
        ours = kw.extract_textrank(text, topk=20, with_weight=True, tagger=jieba_pairs)
        assert ours == jieba.analyse.textrank(text, topK=20, withWeight=True)


def test_full_stack_equals_jieba(docs):
    # our segmenter and our posseg twin as inputs: the whole pipeline reproduces jieba.analyse
    for text in docs[:12]:
        assert kw.extract_tfidf(text, topk=10) == jieba.analyse.extract_tags(text, topK=10)
        assert kw.extract_textrank(text, topk=10) == jieba.analyse.textrank(text, topK=10)


def test_notes_thread_example():
    top = kw.extract_tfidf(THREADS, topk=5)
    assert top == jieba.analyse.extract_tags(THREADS, topK=5)
    assert top[:2] == ["线程", "CPU"]  # the notes' example output starts 线程 / CPU / 进程 / 调度 / 多线程
    assert kw.extract_textrank(THREADS, topk=5) == jieba.analyse.textrank(THREADS, topK=5)


def test_allow_pos_tfidf_equals_jieba(docs, jieba_pairs):
    for text in docs[:6]:
        ours = kw.extract_tfidf(text, topk=10, allow_pos=("ns", "n", "vn", "v"), tagger=jieba_pairs)
        assert ours == jieba.analyse.extract_tags(text, topK=10, allowPOS=("ns", "n", "vn", "v"))


def test_posseg_twin_equals_jieba_posseg(docs):
    tagger = kw._default_posseg()
    text = "我爱北京天安门。他来到了网易杭研大厦，iPhone 3.14% 和 ３个 abc123"
    assert tagger(text) == [(p.word, p.flag) for p in jieba.posseg.lcut(text)]
    assert tagger(text)[:4] == [("我", "r"), ("爱", "v"), ("北京", "ns"), ("天安门", "ns")]
    assert tagger.cut(text, hmm=False) == [(p.word, p.flag) for p in jieba.posseg.lcut(text, HMM=False)]
    for doc in docs[:8]:
        assert tagger(doc) == [(p.word, p.flag) for p in jieba.posseg.lcut(doc)]


def test_ties_keep_first_appearance_order():
    idf = kw.IDF({"苹果": 2.0, "香蕉": 2.0, "橙子": 2.0})
    # equal weights: first occurrence decides, not the alphabet or the hash
    assert kw.extract_tfidf("x", cut=lambda _: ["香蕉", "苹果", "橙子"], idf=idf) == ["香蕉", "苹果", "橙子"]
    assert kw.extract_tfidf("x", cut=lambda _: ["橙子", "香蕉", "苹果"], idf=idf) == ["橙子", "香蕉", "苹果"]


def test_tfidf_formula_and_filters():
    idf = kw.IDF({"模型": 1.0, "训练": 3.0, "数据": 2.0})
    words = ["模型", "训练", "模型", "的", "the", "The", " a", "未知词"]
    scores = kw.tfidf_scores(words, idf)
    # single characters, stop words (case-insensitive) and short-after-strip tokens are dropped: total = 4
    assert list(scores) == ["模型", "训练", "未知词"]
    assert scores["模型"] == 2 * (1.0 / 4)
    assert scores["未知词"] == 1 * (idf.median / 4) and idf.median == 2.0


def test_idf_from_corpus():
    idf = kw.IDF.from_corpus([["猫", "狗"], ["猫"], ["鱼", "猫"]])
    assert idf["猫"] == 0.0 and idf["狗"] == pytest.approx(math.log(3))
    assert kw.jieba_idf().median == pytest.approx(jieba.analyse.default_tfidf.median_idf)


def test_pagerank_sweeps_converge_to_fixed_point(jieba_pairs, docs):
    graph = kw.cooccurrence_graph(jieba_pairs(docs[0]))
    assert len(graph) > 10
    converged = kw.pagerank(graph, iterations=500, tol=1e-13)
    exact = kw.pagerank_exact(graph)
    for n in graph:
        assert converged[n] == pytest.approx(exact[n], rel=1e-9)
    # undirected weighted PageRank: Σ WS = |V| at the fixed point
    assert sum(exact.values()) == pytest.approx(len(graph))


def test_graph_window_and_weights():
    pairs = [("线程", "n"), ("的", "uj"), ("进程", "n"), ("调度", "vn"), ("的", "uj"), ("的", "uj"),
             ("线程", "n")]
    g = kw.cooccurrence_graph(pairs, span=5)
    # 线程→进程 (distance 2), 线程→调度 (3); 进程→调度, 进程→线程 (4); 调度→线程 (3)
    assert g["线程"] == [("进程", 1.0), ("调度", 1.0), ("进程", 1.0), ("调度", 1.0)]
    assert kw.cooccurrence_graph(pairs, span=2) == {"进程": [("调度", 1.0)], "调度": [("进程", 1.0)]}
    ranked = kw.extract_textrank("x", tagger=lambda _: pairs, with_weight=True)
    assert ranked[0][1] == 1.0 and all(0 < w <= 1 for _, w in ranked)


def test_our_hmm_tagger_feeds_textrank():
    from tinyllm.data.corpora import peoples_daily_tagged
    from tinyllm.nlp.pos import HMMTagger

    hmm = HMMTagger.train(peoples_daily_tagged("train")[:1500])
    top = kw.extract_textrank(THREADS, topk=5, tagger=kw.hmm_tagger(hmm))
    assert "线程" in top and len(top) == 5


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="topk=-1"):
        kw.extract_tfidf("文本", topk=-1)
    with pytest.raises(ValueError, match="span=1"):
        kw.cooccurrence_graph([], span=1)
    with pytest.raises(ValueError, match=r"damping=1\.5"):
        kw.pagerank({}, damping=1.5)
    with pytest.raises(ValueError, match="does not exist"):
        kw.IDF.load(tmp_path / "none.txt")
    (tmp_path / "bad.txt").write_text("词 1.0 多余\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected 'word idf'"):
        kw.IDF.load(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="empty idf"):
        kw.IDF({})
    with pytest.raises(ValueError, match="must be a str"):
        PossegTagger(None, ({}, {}, {}, {})).cut(None)  # type: ignore[arg-type]
    assert kw.extract_tfidf("", cut=lambda _: []) == []
    assert kw.extract_textrank("", tagger=lambda _: []) == []


def test_cli_keywords(capsys, tmp_path):
    from tinyllm.nlp.cli import KeywordsConfig, run_keywords

    run_keywords(KeywordsConfig(text=THREADS, topk=5))
    assert capsys.readouterr().out.split() == jieba.analyse.extract_tags(THREADS, topK=5)
    src = tmp_path / "doc.txt"
    src.write_text(THREADS, encoding="utf-8")
    run_keywords(KeywordsConfig(input=str(src), method="textrank", topk=3, with_weights=True))
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    expect = jieba.analyse.textrank(THREADS, topK=3, withWeight=True)
    assert [r[0] for r in rows] == [w for w, _ in expect]
    assert [float(r[1]) for r in rows] == pytest.approx([w for _, w in expect], abs=1e-6)
    with pytest.raises(ValueError, match="method='bm25'"):
        KeywordsConfig(method="bm25")
    with pytest.raises(SystemExit, match="does not exist"):
        run_keywords(KeywordsConfig(text="文本", idf=str(tmp_path / "none.txt")))
