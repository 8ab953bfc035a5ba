"""RAG index benchmark: tinyllm's BM25 vs bm25s, and exact dense search vs faiss IndexFlatIP (ratio = ours / peer).

Figures (one JSON line each):
- bm25 tokenize_s: Chinese word segmentation of the corpus (shared by both sides, reported once);
- bm25 build_s: index build from the same token lists (ours: postings + precomputed weights; bm25s: its
  eager sparse score matrix), variant "lucene" on both sides so scores are comparable;
- bm25 query_ms: top-10 per query over the dev titles (ours one query at a time; bm25s its batched
  `retrieve`), plus the fraction of queries whose top-10 ids agree (ties aside) and the max |Δscore|;
- dense query_ms: top-10 by inner product over n clustered random unit vectors (batch and single queries), ours
  "exact" (torch matmul + topk) vs faiss IndexFlatIP at the same thread count; and our faiss-flat wrapper;
- ann: faiss IVF and HNSW through `DenseIndex`: build time, query time and recall@10 against exact
  (ratio = ANN / exact query time).

    python bench/rag.py                      # inews train articles, 50k x 384 vectors, 1 thread
    python bench/rag.py --docs 2000 --n 20000 --no-ann
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DISABLE_TQDM", "1")  # bm25s progress bars
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _common import machine_ceilings, median_seconds, paired_median_seconds, report


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def bench_bm25(docs: int, queries: int, repeats: int) -> None:
    import bm25s

    from tinyllm.data.corpora import inews
    from tinyllm.rag.index import BM25Index, tokenize_zh

    arts = inews("train")[:docs] if docs else inews("train")
    texts = [f"{a.title}\n{a.content}" for a in arts]
    qtexts = [a.title for a in inews("dev")[:queries]]
    t0 = time.perf_counter()
    corpus = [tokenize_zh(t) for t in texts]
    t_tok = time.perf_counter() - t0
    qtoks = [tokenize_zh(q) for q in qtexts]
    ids = [str(i) for i in range(len(corpus))]
    emit(bench="bm25 corpus", docs=len(corpus), chars=sum(map(len, texts)), tokens=sum(map(len, corpus)),
         vocab=len({t for d in corpus for t in d}), tokenize_s=round(t_tok, 2), queries=len(qtoks))

    def build_ours() -> BM25Index:
        ix = BM25Index(variant="lucene", tokenizer="zh")
        ix.add_tokens(ids, corpus)
        ix._compile()  # weights are precomputed lazily at the first query; count them in the build
        return ix

    def build_peer():
        r = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        r.index(corpus, show_progress=False)
        return r

    t_ours, t_peer = paired_median_seconds(build_ours, build_peer, repeats=repeats, warmup=0)
    report("bm25 build_s", t_ours, t_peer, "s", peer_name="bm25s", docs=len(corpus))
    ours, peer = build_ours(), build_peer()

    def query_ours():
        return [ours.search(q, 10) for q in qtoks]

    def query_peer():
        return peer.retrieve(qtoks, k=10, show_progress=False, n_threads=1)

    t_ours, t_peer = paired_median_seconds(query_ours, query_peer, repeats=repeats)
    got = query_ours()
    ref_ids, ref_scores = peer.retrieve(qtoks, k=10, show_progress=False)
    agree, max_diff = 0, 0.0
    for hits, rid, rsc in zip(got, ref_ids, ref_scores):
        n = len(hits)  # ours lists only documents that share a term with the query
        max_diff = max([max_diff] + [abs(s - float(r)) for (_, s), r in zip(hits, rsc[:n])])
        same = [h for h, _ in hits] == [str(i) for i in rid[:n]]
        tied = len({round(float(x), 4) for x in rsc[:n]}) < n
        agree += same or tied
    report("bm25 query_ms", 1e3 * t_ours / len(qtoks), 1e3 * t_peer / len(qtoks), "ms/query", peer_name="bm25s",
           k=10, topk_agree=round(agree / len(qtoks), 4), max_abs_score_diff=float(f"{max_diff:.3g}"))


def bench_dense(n: int, dim: int, nq: int, repeats: int, ann: bool, threads: int) -> None:
    import faiss

    from tinyllm.rag.index import DenseIndex

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    # clustered unit vectors (1,000 topics + noise), as embeddings of a corpus are; uniform random vectors
    # in 384 dimensions would be the ANN worst case (every neighbour almost equally far)
    centers = rng.standard_normal((1000, dim), dtype=np.float32)
    x = centers[rng.integers(0, 1000, n)] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, nq)] + 0.3 * rng.standard_normal((nq, dim), dtype=np.float32) / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(n)]
    exact = DenseIndex(dim, "exact")
    exact.add(ids, x)
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    wrapped = DenseIndex(dim, "faiss-flat")
    wrapped.add(ids, x)
    wrapped.search(q[:1], 10)  # build
    for label, qs in (("batch", q), ("single", q[:1])):
        t_ours, t_peer = paired_median_seconds(lambda qs=qs: exact.search(qs, 10), lambda qs=qs: flat.search(qs, 10),
                                               repeats=repeats)
        report(f"dense exact query_ms {label}", 1e3 * t_ours / len(qs), 1e3 * t_peer / len(qs), "ms/query",
               peer_name="faiss IndexFlatIP", n=n, dim=dim, queries=len(qs), threads=threads)
    t_ours, t_peer = paired_median_seconds(lambda: wrapped.search(q, 10), lambda: flat.search(q, 10),
                                           repeats=repeats)
    report("dense faiss-flat wrapper query_ms", 1e3 * t_ours / nq, 1e3 * t_peer / nq, "ms/query",
           peer_name="faiss IndexFlatIP", n=n, dim=dim)
    truth = exact.search(q, 10)
    _, fi = flat.search(q, 10)
    same = np.mean([[i for i, _ in t] == [f"v{j}" for j in f] for t, f in zip(truth, fi)])
    emit(bench="dense exact vs faiss flat", topk_equal=round(float(same), 4))
    if not ann:
        return
    t_exact = median_seconds(lambda: exact.search(q, 10), repeats)
    for backend, params in (("faiss-ivf", {"nprobe": 16}), ("faiss-hnsw", {"hnsw_m": 32, "ef_search": 64})):
        ix = DenseIndex(dim, backend, **params)
        ix.add(ids, x)
        t0 = time.perf_counter()
        ix.search(q[:1], 10)  # trains / builds
        build = time.perf_counter() - t0
        t = median_seconds(lambda ix=ix: ix.search(q, 10), repeats)
        got = ix.search(q, 10)
        recall = np.mean([len({i for i, _ in g} & {i for i, _ in t}) / 10 for g, t in zip(got, truth)])
        report(f"ann {backend} query_ms", 1e3 * t / nq, 1e3 * t_exact / nq, "ms/query", peer_name="exact",
               recall_at_10=round(float(recall), 4), build_s=round(build, 2), **params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=0, help="inews train articles to index (0 = all)")
    ap.add_argument("--queries", type=int, default=200, help="inews dev titles used as queries")
    ap.add_argument("--n", type=int, default=50_000, help="vectors in the dense benchmark")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--nq", type=int, default=100, help="queries in a dense batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ann", dest="ann", action="store_false", help="skip the IVF/HNSW lines")
    ap.add_argument("--skip-bm25", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(machine_ceilings()), flush=True)
    if not args.skip_bm25:
        bench_bm25(args.docs, args.queries, args.repeats)
    bench_dense(args.n, args.dim, args.nq, args.repeats, args.ann, args.threads)


if __name__ == "__main__":
    main()
