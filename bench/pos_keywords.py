"""POS tagging and keyword benchmark: tinyllm's HMM tagger, posseg twin and keywords vs jieba 0.42.1.

Figures (one JSON line each):
- pos: held-out accuracy on the People's Daily 1998 lines with index mod 10 == 0 (gold segmentation), for our
  bigram and trigram HMM trained on the other lines; all / known-word / unknown-word accuracy, train and tag
  seconds;
- pos_jieba: jieba's tags on the same lines, mapped to the PD tag set with `JIEBA_TO_PD`, measured two ways:
  (a) "gold words": each gold word gets jieba's tag for that word — the dict.txt tag when jieba's dictionary
  has it (that is all jieba.posseg does for dictionary words), else jieba.posseg.lcut(word) when that keeps
  the word whole; words jieba would split count as errors; (b) "own segmentation": jieba.posseg.lcut on the
  raw sentence, scored on the words whose character span equals a gold word's span (coverage reported), with
  our bigram tagger's accuracy on exactly the same words beside it;
- posseg_parity: our jieba.posseg twin vs jieba.posseg.lcut, sentence by sentence on inews test texts;
- keywords: top-20 agreement with jieba.analyse on inews test articles (title + content): exact list
  equality and mean overlap, for the ranking alone (jieba's cut/tagger as input), the full stack (our
  segmenter and posseg twin), and TextRank over the dictionary-only tagger and over our PD HMM tagger.

    python bench/pos_keywords.py                 # everything (a few minutes on one core)
    python bench/pos_keywords.py --what pos --articles 50
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def bench_pos(train, heldout) -> object:
    from tinyllm.nlp.pos import HMMTagger, evaluate

    t0 = time.perf_counter()
    bigram = HMMTagger.train(train)
    train_s = time.perf_counter() - t0
    for order in (1, 2):
        model = bigram if order == 1 else HMMTagger(bigram.counts, **{**bigram.params(), "order": 2})
        t0 = time.perf_counter()
        r = evaluate(model, heldout)
        emit(bench="pos", order=order, train_seconds=round(train_s, 1), tag_seconds=round(time.perf_counter() - t0, 1),
             lambdas=[round(x, 4) for x in model.lambdas], **{k: round(v, 5) if isinstance(v, float) else v
                                                              for k, v in r.items()})
    return bigram


def bench_pos_jieba(heldout, ours) -> None:
    import jieba
    import jieba.posseg as pseg

    from tinyllm.nlp.pos import JIEBA_TO_PD

    jieba.setLogLevel(logging.WARNING)
    table = pseg.dt.word_tag_tab

    def jieba_word_tag(word: str) -> str | None:
        tag = table.get(word)
        if tag is None:
            pieces = pseg.lcut(word)
            if len(pieces) != 1:
                return None
            tag = pieces[0].flag
        return JIEBA_TO_PD.get(tag, tag)

    right = total = split = 0
    for sent in heldout:
        for w, gold in sent:
            tag = jieba_word_tag(w)
            split += tag is None
            right += tag == gold
            total += 1
    emit(bench="pos_jieba", method="gold words (dictionary tag, else posseg on the word)", accuracy=round(right / total, 5),
         tokens=total, words_jieba_splits=split)

    j_right = o_right = matched = total = 0
    for sent in heldout:
        words = [w for w, _ in sent]
        gold_spans, pos = {}, 0
        for i, (w, _) in enumerate(sent):
            gold_spans[(pos, pos + len(w))] = i
            pos += len(w)
        ours_tags = ours.tag(words)
        pos = 0
        for p in pseg.lcut("".join(words)):
            span = (pos, pos + len(p.word))
            pos += len(p.word)
            i = gold_spans.get(span)
            if i is None:
                continue
            matched += 1
            j_right += JIEBA_TO_PD.get(p.flag, p.flag) == sent[i][1]
            o_right += ours_tags[i] == sent[i][1]
        total += len(sent)
    emit(bench="pos_jieba", method="own segmentation, words whose span equals a gold word",
         accuracy=round(j_right / matched, 5), ours_same_words=round(o_right / matched, 5),
         coverage=round(matched / total, 5), tokens=matched)


def bench_posseg(n_articles: int) -> None:
    import jieba
    import jieba.posseg as pseg

    from tinyllm.data.corpora import inews
    from tinyllm.nlp import keywords as kw

    jieba.setLogLevel(logging.WARNING)
    texts = [t for a in inews("test")[:n_articles] for t in (a.title, a.content)]
    same = sum(kw.default_tagger(t) == [(p.word, p.flag) for p in pseg.lcut(t)] for t in texts)
    emit(bench="posseg_parity", texts=len(texts), identical=same, rate=round(same / len(texts), 5))


def bench_keywords(n_articles: int, hmm_tagger) -> None:
    import jieba
    import jieba.analyse
    import jieba.posseg as pseg

    from tinyllm.data.corpora import inews
    from tinyllm.nlp import keywords as kw

    jieba.setLogLevel(logging.WARNING)
    docs = [f"{a.title}\n{a.content}" for a in inews("test") if a.content][:n_articles]
    jpairs = lambda s: [(p.word, p.flag) for p in pseg.lcut(s)]  # noqa: E731
    dict_tagger, our_hmm = kw.dictionary_tagger(), kw.hmm_tagger(hmm_tagger)
    runs = {
        "tfidf_ranking": (lambda d: kw.extract_tfidf(d, 20, cut=jieba.lcut), "tfidf"),
        "tfidf_full_stack": (lambda d: kw.extract_tfidf(d, 20), "tfidf"),
        "textrank_ranking": (lambda d: kw.extract_textrank(d, 20, tagger=jpairs), "textrank"),
        "textrank_full_stack": (lambda d: kw.extract_textrank(d, 20), "textrank"),
        "textrank_dictionary_tagger": (lambda d: kw.extract_textrank(d, 20, tagger=dict_tagger), "textrank"),
        "textrank_pd_hmm_tagger": (lambda d: kw.extract_textrank(d, 20, tagger=our_hmm), "textrank"),
    }
    ref = {"tfidf": [jieba.analyse.extract_tags(d, topK=20) for d in docs],
           "textrank": [jieba.analyse.textrank(d, topK=20) for d in docs]}
    for name, (fn, method) in runs.items():
        t0 = time.perf_counter()
        ours = [fn(d) for d in docs]
        sec = time.perf_counter() - t0
        exact = sum(o == r for o, r in zip(ours, ref[method]))
        overlap = [len(set(o) & set(r)) / len(r) if r else float(not o) for o, r in zip(ours, ref[method])]
        emit(bench="keywords", run=name, articles=len(docs), identical_top20=exact, rate=round(exact / len(docs), 4),
             mean_overlap_top20=round(sum(overlap) / len(overlap), 4), seconds=round(sec, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["all", "pos", "keywords"], default="all")
    ap.add_argument("--articles", type=int, default=100, help="inews test articles for the keyword figures")
    args = ap.parse_args()
    from tinyllm.data.corpora import peoples_daily_tagged
    from tinyllm.nlp.pos import HMMTagger

    train = peoples_daily_tagged("train")
    if args.what in ("all", "pos"):
        heldout = peoples_daily_tagged("eval")
        ours = bench_pos(train, heldout)
        bench_pos_jieba(heldout, ours)
    else:
        ours = HMMTagger.train(train)
    if args.what in ("all", "keywords"):
        bench_posseg(args.articles)
        bench_keywords(args.articles, ours)


if __name__ == "__main__":
    main()
