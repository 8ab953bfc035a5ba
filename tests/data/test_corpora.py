"""The offline corpora readers and the derived SFT sets."""

from __future__ import annotations

import json

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


def test_pretrain_texts_cover_both_sources() -> None:
    val = corpora.pretrain_texts("val")
    assert len(val) > 999 and sum(map(len, val)) > 1_000_000


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
