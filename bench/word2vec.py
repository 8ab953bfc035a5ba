"""Word2Vec benchmark: tinyllm vs gensim on segmented inews text, same hyper-parameters, same thread count.

Figures (one JSON line each):
- corpus: documents, sentences and words after segmentation (tinyllm's jieba-compatible Segmenter);
- words_per_s: training throughput (corpus words × epochs / wall time of `train`, vocabulary building
  excluded on both sides), ratio = ours / gensim. gensim runs optimised C (Cython + BLAS) with its own worker
  threads; ours is vectorised torch over batches of examples with `--threads` Python workers;
- words_per_s_paired: one-epoch runs on the first `--speed-words` words, ours and gensim alternating
  `--repeats` times, medians — load changes on a shared machine hit both sides (steadier than the single
  full-length run above);
- neighbour_overlap: for the `--probe-words` most frequent words, the mean share of ours' top-10 cosine
  neighbours that are also gensim's top-10; next to it the same overlap between two gensim runs that differ
  only in the seed (`gensim_vs_gensim`), the ceiling that training noise allows.

    python bench/word2vec.py --threads 2 --epochs 5            # the whole train split (~3 M words)
    python bench/word2vec.py --limit-docs 1000 --epochs 3      # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from _common import machine_ceilings, report


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def top_neighbours(unit: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest rows (cosine) for each query row, the query itself excluded."""
    sims = unit[rows] @ unit.T
    sims[np.arange(len(rows)), rows] = -np.inf
    return np.argsort(-sims, axis=1)[:, :k]


def overlap(words: list[str], a: dict[str, int], ua: np.ndarray, b: dict[str, int], ub: np.ndarray,
            wa: list[str], wb: list[str], k: int = 10) -> float:
    na = top_neighbours(ua, np.array([a[w] for w in words]), k)
    nb = top_neighbours(ub, np.array([b[w] for w in words]), k)
    return float(np.mean([len({wa[i] for i in x} & {wb[i] for i in y}) / k for x, y in zip(na, nb)]))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-docs", type=int, default=None, help="first N inews train documents")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads for both (gensim workers, ours workers)")
    ap.add_argument("--sg", type=int, default=1)
    ap.add_argument("--hs", type=int, default=0)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1024, help="ours: examples per vectorised step")
    ap.add_argument("--probe-words", type=int, default=200)
    ap.add_argument("--speed-words", type=int, default=1_000_000, help="corpus words of the paired speed runs")
    ap.add_argument("--repeats", type=int, default=3, help="alternating one-epoch runs per side")
    args = ap.parse_args()

    import gensim
    import torch

    from tinyllm.data.corpora import inews
    from tinyllm.nlp.word2vec import Word2Vec, segment_corpus

    torch.set_num_threads(args.threads)
    print(json.dumps(machine_ceilings()), flush=True)
    docs = [f"{a.title}\n{a.content}" for a in inews("train")][: args.limit_docs]
    t0 = time.perf_counter()
    sents = segment_corpus(docs)
    n_words = sum(map(len, sents))
    emit(what="corpus", docs=len(docs), sentences=len(sents), words=n_words,
         segment_s=round(time.perf_counter() - t0, 1))

    hp = dict(vector_size=args.dim, window=args.window, min_count=args.min_count, sg=args.sg, hs=args.hs,
              negative=0 if args.hs else 5, sample=1e-3, alpha=0.025 if args.sg else 0.05, min_alpha=1e-4,
              epochs=args.epochs)
    ours = Word2Vec(**hp, seed=1, batch_size=args.batch_size, threads=args.threads, progress=False)
    ours.build_vocab(sents)
    t0 = time.perf_counter()
    ours.train(sents)
    t_ours = time.perf_counter() - t0

    def run_gensim(seed: int) -> tuple[gensim.models.Word2Vec, float]:
        g = gensim.models.Word2Vec(**hp, seed=seed, workers=args.threads)
        g.build_vocab(sents)
        t = time.perf_counter()
        g.train(sents, total_examples=g.corpus_count, epochs=args.epochs)
        return g, time.perf_counter() - t

    ref, t_ref = run_gensim(1)
    ref2, _ = run_gensim(2)
    variant = f"{'sg' if args.sg else 'cbow'}-{'hs' if args.hs else 'ns5'}"
    report("word2vec_words_per_s", n_words * args.epochs / t_ours, n_words * args.epochs / t_ref, "words/s",
           variant=variant, threads=args.threads, epochs=args.epochs, dim=args.dim, batch_size=args.batch_size,
           vocab=len(ours.wv), gensim_vocab=len(ref.wv), our_loss_per_epoch=[round(x, 3) for x in ours.losses])

    take, n_take = [], 0
    for s in sents:
        take.append(s)
        n_take += len(s)
        if n_take >= args.speed_words:
            break
    rates: dict[str, list[float]] = {"ours": [], "gensim": []}
    one = {**hp, "epochs": 1}
    for _ in range(args.repeats):
        m = Word2Vec(**one, seed=1, batch_size=args.batch_size, threads=args.threads, progress=False)
        m.build_vocab(take)
        t = time.perf_counter()
        m.train(take)
        rates["ours"].append(n_take / (time.perf_counter() - t))
        g = gensim.models.Word2Vec(**one, seed=1, workers=args.threads)
        g.build_vocab(take)
        t = time.perf_counter()
        g.train(take, total_examples=g.corpus_count, epochs=1)
        rates["gensim"].append(n_take / (time.perf_counter() - t))
    report("word2vec_words_per_s_paired", statistics.median(rates["ours"]), statistics.median(rates["gensim"]),
           "words/s", variant=variant, threads=args.threads, words=n_take, repeats=args.repeats,
           ours_runs=[round(x) for x in rates["ours"]], gensim_runs=[round(x) for x in rates["gensim"]])

    assert ours.vocab is not None
    probe = [w for w in ours.vocab.words if w in ref.wv.key_to_index][: args.probe_words]
    wa, wb, wc = ours.wv.words, ref.wv.index_to_key, ref2.wv.index_to_key
    ua, ub, uc = unit(ours.wv.vectors), unit(ref.wv.vectors), unit(ref2.wv.vectors)
    o_ref = overlap(probe, ours.wv.index, ua, ref.wv.key_to_index, ub, wa, wb)
    o_ceil = overlap(probe, ref2.wv.key_to_index, uc, ref.wv.key_to_index, ub, wc, wb)
    emit(what="neighbour_overlap_top10", variant=variant, words=len(probe), ours_vs_gensim=round(o_ref, 3),
         gensim_vs_gensim=round(o_ceil, 3), ratio=round(o_ref / o_ceil, 3) if o_ceil else None)
    for w in ("中国", "北京", "电影", "手机"):
        if w in ours.wv and w in ref.wv:
            emit(what="neighbours", word=w, ours=[x for x, _ in ours.wv.most_similar(w, topn=6)],
                 gensim=[x for x, _ in ref.wv.most_similar(w, topn=6)])


if __name__ == "__main__":
    main()
