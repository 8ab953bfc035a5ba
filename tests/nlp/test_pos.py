"""HMM POS tagger: Viterbi equals brute force, unsmoothed estimates tag like nltk's HMM, unknown words,
accuracy on held-out People's Daily lines, save/load, bad input."""

from __future__ import annotations

import json
import os
import random
import warnings

import pytest

from tinyllm.data.corpora import peoples_daily_tagged
from tinyllm.nlp.pos import JIEBA_TO_PD, HMMTagger, evaluate, word_shape

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = [
    [("我", "r"), ("爱", "v"), ("北京", "ns")],
    [("他", "r"), ("爱", "v"), ("读书", "v")],
    [("北京", "ns"), ("的", "u"), ("爱", "n")],
    [("我", "r"), ("的", "u"), ("书", "n")],
    [("书", "n"), ("很", "d"), ("好", "a")],
]


@pytest.fixture(scope="module")
def train_sents():
    return peoples_daily_tagged("train")


@pytest.fixture(scope="module")
def eval_sents():
    return peoples_daily_tagged("eval")


@pytest.fixture(scope="module")
def tagger(train_sents):
    # a third of the training lines keeps the test fast; the full-split figures are in bench/pos_keywords.py
    return HMMTagger.train(train_sents[:6000])


def test_word_shape():
    assert word_shape("１９９８年") == "0000年"
    assert word_shape("WTO") == word_shape("ＷＴＯ") == "aaa"
    assert word_shape("3G手机") == "0a手机"


def test_toy_tags_and_known_word_ambiguity():
    t = HMMTagger.train(TOY)
    assert t.tag(["我", "爱", "北京"]) == ["r", "v", "ns"]
    # 爱 is v after a pronoun and n after 的: the transitions decide
    assert t.tag(["北京", "的", "爱"]) == ["ns", "u", "n"]
    assert t.tag([]) == []


@pytest.mark.parametrize("order", [1, 2])
def test_viterbi_equals_brute_force(train_sents, order):
    t = HMMTagger.train(train_sents[:1500], order=order, beam=0.05)
    rng = random.Random(order)
    pool = [s for s in train_sents[1500:3000] if 2 <= len(s) <= 7]
    checked = 0
    for sent in rng.sample(pool, 40):
        words = [w for w, _ in sent]
        if _n_paths(t, words) > 20_000:
            continue
        fast, slow = t.tag(words), t.tag_brute_force(words)
        assert fast == slow or t.score(words, fast) == pytest.approx(t.score(words, slow), abs=1e-9)
        checked += 1
    assert checked >= 20


def _n_paths(t: HMMTagger, words: list[str]) -> int:
    n = 1
    for w in words:
        n *= len(t.candidates(w)[0])
    return n


def test_unsmoothed_tags_equal_nltk_hmm(train_sents):
    hmm = pytest.importorskip("nltk.tag.hmm", reason="nltk is the reference HMM tagger")
    sents = train_sents[:120]
    ours = HMMTagger.train(sents, beta=0, interpolation=False, end_state=False)
    ref = hmm.HiddenMarkovModelTrainer().train_supervised(sents)  # maximum-likelihood estimates
    for sent in sents[:20]:
        words = [w for w, _ in sent]
        with warnings.catch_warnings():  # nltk casts log(0) = -inf into float arrays
            warnings.simplefilter("ignore", RuntimeWarning)
            expect = [t for _, t in ref.tag(words)]
        assert ours.tag(words) == expect


def test_unknown_words_from_shape_and_affixes(tagger):
    for word, expect in [("１２３４５６７", "m"), ("二零五七年", "t"), ("ＸＹＺＷ", "nx"), ("台东县", "ns"),
                         ("研究者们", "n"), ("拉美化", "vn")]:
        assert word not in tagger.words
        p = tagger.unknown_distribution(word)  # P_unk(t | word) from shape, suffix and prefix
        assert p.sum() == pytest.approx(1.0)
        assert tagger.tags[int(p.argmax())] == expect, word


def test_heldout_accuracy(tagger, eval_sents):
    r = evaluate(tagger, eval_sents[:400])
    assert r["accuracy"] >= 0.925
    assert r["known_accuracy"] > r["unknown_accuracy"] > 0.5
    assert 0 < r["unknown_rate"] < 0.1


def test_trigram_not_worse_on_heldout(tagger, eval_sents):
    tri = HMMTagger(tagger.counts, **{**tagger.params(), "order": 2})
    assert len(tri.lambdas) == 3 and sum(tri.lambdas) == pytest.approx(1.0)
    bi_acc = evaluate(tagger, eval_sents[:150])["accuracy"]
    assert evaluate(tri, eval_sents[:150])["accuracy"] >= bi_acc - 0.002


def test_save_load_roundtrip(tagger, eval_sents, tmp_path):
    path = tagger.save(tmp_path / "pos.json")
    assert [p.name for p in tmp_path.iterdir()] == ["pos.json"]  # no temp file left behind
    loaded = HMMTagger.load(path)
    for sent in eval_sents[:50]:
        words = [w for w, _ in sent]
        assert loaded.tag(words) == tagger.tag(words)
    assert HMMTagger.load(path, order=2).order == 2


def test_failed_save_leaves_nothing(tagger, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        tagger.save(tmp_path / "pos.json")
    assert list(tmp_path.iterdir()) == []


def test_bad_input(tmp_path):
    t = HMMTagger.train(TOY)
    with pytest.raises(ValueError, match="list of words"):
        t.tag("我爱北京")
    with pytest.raises(ValueError, match="no tagged sentences"):
        HMMTagger.train([])
    with pytest.raises(ValueError, match="not a \\(word, tag\\) pair"):
        HMMTagger.train([[("我", "")]])
    with pytest.raises(ValueError, match="order=3"):
        HMMTagger.train(TOY, order=3)
    with pytest.raises(ValueError, match=r"beam=1\.5"):
        HMMTagger.train(TOY, beam=1.5)
    with pytest.raises(ValueError, match="no such POS model"):
        HMMTagger.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a POS model"):
        HMMTagger.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a tinyllm-hmm-pos"):
        HMMTagger.load(tmp_path / "other.json")


def test_jieba_tag_mapping_lands_in_pd_tagset(train_sents):
    jieba = pytest.importorskip("jieba", reason="jieba's dictionary tags are mapped onto the PD tag set")
    from pathlib import Path

    pd_tags = {t for s in train_sents for _, t in s}
    dict_txt = Path(jieba.__file__).parent / "dict.txt"
    jieba_tags = {line.split(" ")[2].strip() for line in dict_txt.read_text(encoding="utf-8").splitlines()}
    assert {JIEBA_TO_PD.get(t, t) for t in jieba_tags} <= pd_tags


def test_cli_train_eval_and_tag(train_sents, eval_sents, tmp_path, capsys, monkeypatch):
    import tinyllm.data.corpora as corpora
    from tinyllm.nlp.cli import PosConfig, run_pos

    small = {"train": train_sents[:800], "eval": eval_sents[:60]}
    monkeypatch.setattr(corpora, "peoples_daily_tagged", lambda split="train": small[split])
    model = tmp_path / "pos" / "m.json"
    assert run_pos(PosConfig(train=True, eval=True, model=str(model), progress=False)) == 0
    assert model.is_file()
    assert "held-out People's Daily" in capsys.readouterr().out
    src = tmp_path / "in.txt"
    src.write_text("我 爱 北京\n他 的 书\n", encoding="utf-8")
    run_pos(PosConfig(input=str(src), model=str(model), presegmented=True))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "我/r 爱/v 北京/ns" and len(lines) == 2
    with pytest.raises(ValueError, match="order=3"):
        PosConfig(order=3)
    with pytest.raises(SystemExit, match="no such file"):
        run_pos(PosConfig(input=str(tmp_path / "missing.txt"), model=str(model)))


@pytest.mark.parametrize("command", ["pos", "keywords"])
def test_cli_help(command, capsys):
    from tinyllm import cli

    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "--topk" in capsys.readouterr().out if command == "keywords" else "--eval" in capsys.readouterr().out
