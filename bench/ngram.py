"""n-gram LM benchmark: interpolated Kneser–Ney perplexity on held-out Chinese text, by characters and by
words, and the tiny LLM's validation loss on the same footing (bits per character).

Figures (one JSON line each):
- kn: inews train → inews dev, modified (and plain) interpolated KN of each order, on characters (units
  seen once become <unk>) and on words (tinyllm's jieba-compatible Segmenter, every token kept): perplexity
  per unit, bits per unit, bits per character (total bits / characters, a line break counted as one
  character for </s>), OOV rate, fit and scoring seconds;
- llm_vs_kn: the tiny-zh recipe's data (inews train + People's Daily train → inews dev + People's Daily
  held-out): KN on characters of the same training text vs the recipe's model. A perplexity per BPE token and
  one per character are not comparable (a token covers ~1.4 characters), bits per character are:
  bpc = loss_nats_per_token / ln 2 / (characters per token). With `--llm-model` (a trained
  runs/tiny-zh/model) the model is scored here on the val documents; without it the loss is `--llm-loss`
  (BENCHMARKS.md's 7.12 nats/token) and the characters per token come from retraining the recipe's tokenizer.

    python bench/ngram.py                                   # ~5 min on a quiet 2-core machine
    python bench/ngram.py --llm-model runs/tiny-zh/model
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import tempfile
import time
from pathlib import Path


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def char_lines(docs: list[str]) -> list[list[str]]:
    return [list(line) for d in docs for line in d.splitlines() if line.strip()]


def run_kn(train, held, order, modified, min_count, **extra) -> dict:
    from tinyllm.nlp.ngram import KneserNeyLM

    t0 = time.perf_counter()
    lm = KneserNeyLM(order=order, modified=modified, min_count=min_count).fit(train)
    t1 = time.perf_counter()
    ev = lm.evaluate(held)
    t2 = time.perf_counter()
    line = dict(what="kn", order=order, smoothing="modified" if modified else "plain", **extra,
                perplexity=round(ev["perplexity"], 2), bits_per_unit=round(ev["bits_per_token"], 4),
                bits_per_char=round(ev["bits_per_char"], 4), oov_rate=round(ev["oov_rate"], 5),
                vocab=len(lm.vocab), engine="numpy" if lm._fast is not None else "python",
                fit_s=round(t1 - t0, 1), eval_s=round(t2 - t1, 1))
    emit(**line)
    return line


def llm_bits_per_char(model_dir: str, docs: list[str], max_chars: int, window: int = 256) -> tuple[float, float]:
    """(nats per token, bits per character) of a causal LM on docs, non-overlapping windows per document."""
    import torch

    import tinyllm

    model = tinyllm.load_model(model_dir).eval()
    tok = tinyllm.load_tokenizer(model_dir)
    nats, tokens, chars = 0.0, 0, 0
    with torch.no_grad():
        for doc in docs:
            ids = tok.encode(doc)
            for a in range(0, len(ids) - 1, window):
                x = torch.tensor([ids[a: a + window + 1]])
                logits = model(x[:, :-1])
                logits = getattr(logits, "logits", logits)
                nll = torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum")
                nats, tokens = nats + float(nll), tokens + x.shape[1] - 1
            chars += len(doc)
            if chars >= max_chars:
                break
    return nats / tokens, nats / math.log(2) / chars


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--char-orders", default="1,2,3,4,5")
    ap.add_argument("--word-orders", default="1,2,3")
    ap.add_argument("--char-min-count", type=int, default=2, help="characters seen fewer times → <unk>")
    ap.add_argument("--word-min-count", type=int, default=2, help="words seen fewer times → <unk>")
    ap.add_argument("--llm-model", default="runs/tiny-zh/model", help="scored here if the directory exists")
    ap.add_argument("--llm-loss", type=float, default=7.12,
                    help="nats per BPE token when --llm-model is absent (BENCHMARKS.md, tiny-zh validation)")
    ap.add_argument("--llm-chars", type=int, default=200_000, help="characters of val text the LLM scores")
    args = ap.parse_args()

    from tinyllm.data.corpora import inews, pretrain_texts
    from tinyllm.nlp.segment import Segmenter

    train_docs = [f"{a.title}\n{a.content}" for a in inews("train")]
    dev_docs = [f"{a.title}\n{a.content}" for a in inews("dev")]
    tr, dv = char_lines(train_docs), char_lines(dev_docs)
    emit(what="corpus", train_chars=sum(map(len, tr)), dev_chars=sum(map(len, dv)), train_lines=len(tr))
    best: dict | None = None
    for n in map(int, args.char_orders.split(",")):
        line = run_kn(tr, dv, n, True, args.char_min_count, unit="char", data="inews train→dev")
        best = line if best is None or line["bits_per_char"] < best["bits_per_char"] else best
    for n in (3, max(map(int, args.char_orders.split(",")))):
        run_kn(tr, dv, n, False, args.char_min_count, unit="char", data="inews train→dev")

    seg = Segmenter.from_jieba()
    t0 = time.perf_counter()
    wtr = [[w for w in seg.cut("".join(s)) if w] for s in tr]
    wdv = [[w for w in seg.cut("".join(s)) if w] for s in dv]
    emit(what="word_corpus", train_words=sum(map(len, wtr)), dev_words=sum(map(len, wdv)),
         segment_s=round(time.perf_counter() - t0, 1))
    for n in map(int, args.word_orders.split(",")):
        run_kn(wtr, wdv, n, True, args.word_min_count, unit="word", data="inews train→dev")
    run_kn(wtr, wdv, 3, False, args.word_min_count, unit="word", data="inews train→dev")

    # the recipe's train/val texts: KN on characters vs the tiny LLM, both in bits per character
    assert best is not None
    val_docs = pretrain_texts("val")
    kn = run_kn(char_lines(pretrain_texts("train")), char_lines(val_docs), best["order"], True,
                args.char_min_count, unit="char", data="tiny-zh train→val")
    if Path(args.llm_model).is_dir():
        loss, bpc = llm_bits_per_char(args.llm_model, val_docs, args.llm_chars)
        source = f"scored {args.llm_model} on the first {args.llm_chars:,} val characters"
        cpt = loss / math.log(2) / bpc
    else:
        import tinyllm
        from tinyllm.recipes.tiny_zh import SCALES, TinyZhConfig, stage_tokenizer

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # JSON lines only
            tdir = stage_tokenizer(TinyZhConfig(out=tmp, progress=False), SCALES["default"], Path(tmp))
            tok = tinyllm.load_tokenizer(tdir)
            n_tok = sum(len(tok.encode(d)) for d in val_docs)
        cpt = sum(map(len, val_docs)) / n_tok
        loss, bpc = args.llm_loss, args.llm_loss / math.log(2) / cpt
        source = "BENCHMARKS.md loss; characters per token from the recipe's tokenizer retrained here"
    emit(what="llm_vs_kn", data="tiny-zh train→val", llm_nats_per_token=round(loss, 4),
         llm_ppl_per_token=round(math.exp(loss), 1), chars_per_token=round(cpt, 4),
         llm_bits_per_char=round(bpc, 4), llm_ppl_per_char=round(2**bpc, 2),
         kn_order=kn["order"], kn_bits_per_char=kn["bits_per_char"], kn_ppl_per_char=kn["perplexity"],
         ratio_llm_over_kn_bpc=round(bpc / kn["bits_per_char"], 3), llm_source=source)


if __name__ == "__main__":
    main()
