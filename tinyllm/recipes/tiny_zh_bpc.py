"""Held-out bits per character of the tiny-zh recipe, beside character Kneser–Ney baselines (notes ch.01, ch.09).

Perplexity depends on the tokenizer; bits per character and per byte do not (`tinyllm.eval.bpc`). The recipe
reports them for the model after pretraining (`pretrain/final`) and after SFT (`model/`), and for character
Kneser–Ney 3- and 5-gram models trained on exactly the documents the LM pretrained on, all on the same held-out
characters.

- `shards/documents.json` (written by the shard stage) records which documents of
  `tinyllm.data.corpora.pretrain_texts` went into the shards: the training indices in shuffled order, the full
  shuffled order of the validation pool (its prefix is the shards' validation split), and the SHA-256 of each
  document list, so the evaluation rebuilds the exact training text and fails loudly if the corpus changed.
- Held-out text: validation-pool documents (inews dev + People's Daily held-out lines) in that shuffled order,
  whole documents up to a character budget per scale; exact duplicates, and documents that also occur verbatim
  in the training pool, are dropped.
- The n-gram results are cached under `ngram_cache/`, keyed by the hashes of both texts and the order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinyllm.atomic import atomic_write_json
from tinyllm.data.corpora import DEFAULT_SOURCES

MANIFEST = "documents.json"
BPC_CHARS = {"default": 200_000, "quick": 50_000, "test": 3_000, "gpu": 200_000}  # held-out chars per scale


def corpus_documents(split: str, sources: Sequence[str] = DEFAULT_SOURCES) -> list[str]:
    """The recipe's pretraining pool: `pretrain_texts(split)` over `sources` (the default pair: inews and
    People's Daily)."""
    from tinyllm.data.corpora import pretrain_texts

    return pretrain_texts(split, sources=tuple(sources))
NGRAM_ORDERS = (3, 5)


def shuffled_order(n: int, rng: random.Random) -> list[int]:
    """The permutation `rng.shuffle` applies to any list of length n (it depends on n and the state only)."""
    order = list(range(n))
    rng.shuffle(order)
    return order


def save_document_manifest(shard_dir: Path, seed: int, train_order: Sequence[int], docs_train: Sequence[str],
                           val_order: Sequence[int], docs_val: Sequence[str],
                           sources: Sequence[str] = DEFAULT_SOURCES) -> None:
    """Write `documents.json`: `docs_train` must be pretrain_texts("train")[i] for the first len(docs_train)
    indices of `train_order`, and `docs_val` likewise for `val_order` (kept whole: the held-out pool)."""
    from tinyllm.eval.bpc import text_units, texts_sha256

    manifest = {
        "format": "tinyllm-document-manifest/1", "source": "tinyllm.data.corpora.pretrain_texts", "seed": seed,
        "sources": list(sources),
        "train": {"indices": list(train_order[: len(docs_train)]), "documents": len(docs_train),
                  "chars": text_units(docs_train)[0], "sha256": texts_sha256(docs_train)},
        "val": {"order": list(val_order), "documents": len(docs_val), "chars": text_units(docs_val)[0],
                "sha256": texts_sha256(docs_val)},
    }
    atomic_write_json(shard_dir / MANIFEST, manifest, indent=None)


def load_document_manifest(shard_dir: Path) -> dict[str, Any]:
    path = shard_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: these shards predate the document manifest; "
                                "rerun the recipe with --fresh")
    return json.loads(path.read_text(encoding="utf-8"))


def training_documents(manifest: dict[str, Any], pool: Sequence[str]) -> list[str]:
    """The exact training documents of the shards, rebuilt from the training pool (pretrain_texts("train"))
    and checked against the hash."""
    from tinyllm.eval.bpc import texts_sha256

    docs = [pool[i] for i in manifest["train"]["indices"]]
    if texts_sha256(docs) != manifest["train"]["sha256"]:
        raise ValueError("the training documents rebuilt from the corpus do not match the shards' hash "
                         "(the corpus package changed?); rerun the recipe with --fresh")
    return docs


def heldout_documents(manifest: dict[str, Any], pool: Sequence[str], train_pool: Sequence[str],
                      char_budget: int) -> list[str]:
    """Documents of the validation pool (pretrain_texts("val")) in the shards' order, minus anything in the
    training pool, within the budget."""
    from tinyllm.eval.bpc import select_documents, texts_sha256

    order = manifest["val"]["order"]
    if len(order) != len(pool):
        raise ValueError(f"the validation pool has {len(pool)} documents, the manifest {len(order)}; "
                         "rerun the recipe with --fresh")
    shard_val = [pool[i] for i in order[: manifest["val"]["documents"]]]
    if texts_sha256(shard_val) != manifest["val"]["sha256"]:
        raise ValueError("the validation documents rebuilt from the corpus do not match the shards' hash")
    return select_documents((pool[i] for i in order), char_budget, exclude=train_pool)


def heldout_bits(out: Path, scale: str, context: int, tokenizer: Any,
                 models: dict[str, Path]) -> dict[str, Any]:
    """Bits per character / byte of each model in `models` and of the Kneser–Ney baselines on one held-out
    text; the returned dict is what metrics.json stores under "heldout_bits"."""
    from tinyllm.eval.bpc import (
        CONVENTION,
        encode_documents,
        kneser_ney_bits,
        lm_bits,
        normalize_texts,
        text_units,
        texts_sha256,
    )
    from tinyllm.model.hf import load_model

    manifest = load_document_manifest(out / "shards")
    norm = getattr(tokenizer, "normalization", None)
    sources = manifest.get("sources", DEFAULT_SOURCES)
    train_pool = corpus_documents("train", sources)
    train = normalize_texts(training_documents(manifest, train_pool), norm)
    held = normalize_texts(heldout_documents(manifest, corpus_documents("val", sources), train_pool,
                                             BPC_CHARS[scale]), norm)
    chars, nbytes = text_units(held)
    token_docs = encode_documents(tokenizer, held)
    stride = max(1, context // 2)
    res: dict[str, Any] = {
        "heldout": {"documents": len(held), "chars": chars, "bytes": nbytes, "sha256": texts_sha256(held),
                    "char_budget": BPC_CHARS[scale]},
        "lm_windows": {"context": context, "stride": stride}, "convention": CONVENTION,
        "models": {}, "ngram": {},
    }
    for name, mdir in models.items():
        model = load_model(mdir).eval()
        score = lm_bits(model, token_docs, held, tokenizer.eos_token_id, context, stride)
        res["models"][name] = score.as_dict()
    for n in NGRAM_ORDERS:
        res["ngram"][f"kn{n}"] = kneser_ney_bits(train, held, n, cache_dir=out / "ngram_cache")
    if "pretrain" in res["models"] and "sft" in res["models"]:
        a, b = res["models"]["pretrain"], res["models"]["sft"]
        res["delta_sft_minus_pretrain"] = {k: b[k] - a[k] for k in ("bits_per_char", "bits_per_byte")}
    return res


def report_lines(hb: dict[str, Any]) -> list[str]:
    """The report's section: one table, then the conventions that make its rows comparable."""
    h, w = hb["heldout"], hb["lm_windows"]
    rows = [(f"model after {'pretraining' if k == 'pretrain' else k.upper()}", v) for k, v in hb["models"].items()]
    rows += [(f"character Kneser–Ney {v['order']}-gram", v) for v in hb["ngram"].values()]
    lines = ["## Held-out bits per character", "",
             "| model | bits / char | bits / byte |", "|---|---|---|",
             *[f"| {name} | {v['bits_per_char']:.3f} | {v['bits_per_byte']:.3f} |" for name, v in rows]]
    if "delta_sft_minus_pretrain" in hb:
        d = hb["delta_sft_minus_pretrain"]
        lines.append(f"| Δ after SFT − after pretraining | {d['bits_per_char']:+.3f} | {d['bits_per_byte']:+.3f} |")
    kn = next(iter(hb["ngram"].values()), None)
    lines += ["",
              f"Held-out text: {h['documents']} whole documents of the validation pool (inews dev + People's Daily "
              f"held-out lines; none occurs verbatim in the training pool), {h['chars']:,} characters / "
              f"{h['bytes']:,} UTF-8 bytes, SHA-256 `{h['sha256'][:16]}`. Every row scores these same "
              f"characters: {hb['convention']}. The LM reads windows of {w['context']} tokens advancing by "
              f"{w['stride']} (every token predicted once, with at least {w['context'] - w['stride']} tokens of "
              "context or its whole document prefix), fp32."]
    if kn is not None:
        lines.append(f"The n-grams are trained on the LM's exact pretraining documents ({kn['train_documents']:,} "
                     f"document(s), {kn['train_chars']:,} characters); a character unseen in training "
                     f"({kn['oov_chars']} held-out characters) costs −log2 P(<unk>) plus 2 + 8 bits per UTF-8 "
                     "byte to spell it.")
        rare = {v["order"]: v["min_count"] for v in hb["ngram"].values() if v["min_count"] > 1}
        if rare:
            lines.append("Characters seen fewer than " + ", ".join(f"{m} times ({n}-gram)" for n, m in rare.items())
                         + " in training count as unseen there (the vocabulary must fit 64-bit n-gram keys).")
    return [*lines, ""]
