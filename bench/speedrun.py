"""Speedrun sweep for the tiny-zh main job: held-out bits/char of pretraining variants at a fixed budget.

The recipe trains for a wall-clock budget on the user's CPU, so a variant is judged at the number of tokens
*that CPU* processes in that budget: `--probe` measures each variant's CPU step time here (fastest of a few
forward+backward passes, the recipe's own probe) and prints its token budget; `--train` then trains each
variant for its budget (on any device: a GPU runs the CPU budget of many variants in minutes) and prints
held-out bits per character, a figure that does not depend on the tokenizer:

    bits/char = Σ token NLL (bits) over the held-out windows / characters those tokens spell

    python bench/speedrun.py prep  --out runs/speedrun --vocab 8192 4096      # tokenizers + shards, once
    python bench/speedrun.py probe --out runs/speedrun --seconds 330 > budgets.jsonl
    python bench/speedrun.py train --out runs/speedrun --budgets budgets.jsonl [--device cuda]

Variants are the `VARIANTS` table below (overrides of the recipe's default scale); `--only a,b` picks some.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE: dict[str, Any] = dict(vocab=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                            num_attention_heads=8, num_key_value_heads=4, seq_len=256, batch_size=16, lr=3e-3,
                            min_lr=3e-4, schedule="cosine", optimizer="adamw", hidden_act="silu",
                            tie_word_embeddings=True, warmup=50, weight_decay=0.1, zero_init_residual=False,
                            adamw_lr_scale=1.0, decay_fraction=0.2, document_mask=False)

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "wsd": dict(schedule="wsd", min_lr=0.0),
    "lr6e-3": dict(lr=6e-3),
    "lr1.5e-3": dict(lr=1.5e-3),
    "muon": dict(optimizer="muon"),
    "muon-lr6e-3": dict(optimizer="muon", lr=6e-3),
    "muon-lr1e-2": dict(optimizer="muon", lr=1e-2),
    "muon-wsd": dict(optimizer="muon", schedule="wsd", min_lr=0.0),
    "seq128": dict(seq_len=128, batch_size=32),
    "b8": dict(batch_size=8),
    "relu2": dict(hidden_act="relu2"),
    "L4": dict(num_hidden_layers=4),
    "L8-d192": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
                    num_hidden_layers=8),
    "d192": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2),
    "d320": dict(hidden_size=320, intermediate_size=864, num_attention_heads=10, num_key_value_heads=5),
    "d384-L4": dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2,
                    num_hidden_layers=4),
    "v4096": dict(vocab=4096),
    "v4096-d192": dict(vocab=4096, hidden_size=192, intermediate_size=512, num_attention_heads=6,
                       num_key_value_heads=2),
    "untied": dict(tie_word_embeddings=False),
    "wsd-lr6e-3": dict(schedule="wsd", min_lr=0.0, lr=6e-3),
    "b32-lr6e-3": dict(batch_size=32, lr=6e-3),
    "muon-lr2e-2": dict(optimizer="muon", lr=2e-2),
    "muon-relu2-wsd": dict(optimizer="muon", hidden_act="relu2", schedule="wsd", min_lr=0.0),
    "d192-muon": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
                      optimizer="muon"),
    "v4096-muon": dict(vocab=4096, optimizer="muon"),
    # round 2: around the round-1 winner (Muon, a narrower model)
    **{f"m192{k}": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
                        optimizer="muon", **v) for k, v in {
        "-wsd": dict(schedule="wsd", min_lr=0.0),
        "-wsd-s128": dict(schedule="wsd", min_lr=0.0, seq_len=128, batch_size=32),
        "-L4": dict(num_hidden_layers=4),
        "-L8": dict(num_hidden_layers=8),
        "-lr5e-3": dict(lr=5e-3),
        "-lr1.5e-3": dict(lr=1.5e-3),
        "-b8": dict(batch_size=8),
        "-v4096": dict(vocab=4096),
        "-relu2": dict(hidden_act="relu2"),
        "-wd0": dict(weight_decay=0.0),
    }.items()},
    "m128": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                 optimizer="muon"),
    "m160": dict(hidden_size=160, intermediate_size=432, num_attention_heads=5, num_key_value_heads=1,
                 optimizer="muon"),
    "m256-L4": dict(num_hidden_layers=4, optimizer="muon"),
    "m128-L8": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=8, optimizer="muon"),
    # round 3, on an AVX2-only CPU (fp32, compute-bound: a narrower model buys tokens there): the recipe's default
    # (d192 × 4 layers, Muon, WSD) against narrower ones and smaller batches, each at its own CPU token budget
    **{f"cpu-{k}": {**dict(num_hidden_layers=4, optimizer="muon", schedule="wsd", min_lr=0.0), **v} for k, v in {
        "d192": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2),
        "d192-b8": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
                        batch_size=8),
        "d160": dict(hidden_size=160, intermediate_size=432, num_attention_heads=5, num_key_value_heads=1),
        "d128-L6": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=6),
        "d128": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2),
        "d160-b8": dict(hidden_size=160, intermediate_size=432, num_attention_heads=5, num_key_value_heads=1,
                        batch_size=8),
        "d128-b8": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                        batch_size=8),
    }.items()},
    # round 4, same CPU, one change from the round-3 winner (d160, batch 8) at its token budget
    **{f"cpu-d160-b8-{k}": dict(num_hidden_layers=4, optimizer="muon", schedule="wsd", min_lr=0.0, hidden_size=160,
                                intermediate_size=432, num_attention_heads=5, num_key_value_heads=1, batch_size=8,
                                **v) for k, v in {
        "zi": dict(zero_init_residual=True),
        "emb3": dict(adamw_lr_scale=3.0),
        **{f"zi-emb{m}": dict(zero_init_residual=True, adamw_lr_scale=float(m)) for m in (3, 5, 10, 30)},
        # round 5: around the round-4 winner
        "zi-emb3-lr5e-3": dict(zero_init_residual=True, adamw_lr_scale=3.0, lr=5e-3),
        **{f"zi-emb3-decay{f}": dict(zero_init_residual=True, adamw_lr_scale=3.0, decay_fraction=f)
           for f in (0.4, 0.6)},
        "zi-emb3-warmup10": dict(zero_init_residual=True, adamw_lr_scale=3.0, warmup=10),
        # round 6: around round 5's winner (40 % decay)
        "r6-warmup10": dict(zero_init_residual=True, adamw_lr_scale=3.0, decay_fraction=0.4, warmup=10),
        "r6-lr2e-3": dict(zero_init_residual=True, adamw_lr_scale=3.0, decay_fraction=0.4, lr=2e-3),
    }.items()},
    # round 6 on the width and batch the probe chose in the last demo (d128): batch 16 vs 8 at equal tokens
    **{f"cpu-d128-r6-b{b}": dict(num_hidden_layers=4, optimizer="muon", schedule="wsd", min_lr=0.0, hidden_size=128,
                                 intermediate_size=344, num_attention_heads=4, num_key_value_heads=2, batch_size=b,
                                 zero_init_residual=True, adamw_lr_scale=3.0, decay_fraction=0.4) for b in (8, 16)},
    # round 7: around the d128 plan of the last demo, each variant at the tokens its own step time buys in 320 s
    **{f"cpu-d128-r7-{k}": {**dict(num_hidden_layers=4, optimizer="muon", schedule="wsd", min_lr=0.0, hidden_size=128,
                                   intermediate_size=344, num_attention_heads=4, num_key_value_heads=2, batch_size=16,
                                   zero_init_residual=True, adamw_lr_scale=3.0, decay_fraction=0.4), **v} for k, v in {
        "base": {},
        "s128": dict(seq_len=128, batch_size=32),
        "ff512": dict(intermediate_size=512),
        "L5": dict(num_hidden_layers=5),
        "kv4": dict(num_key_value_heads=4),
        "lr4e-3": dict(lr=4e-3),
        "h2": dict(num_attention_heads=2, num_key_value_heads=1),
        "docmask": dict(document_mask=True),
        "v4096": dict(vocab=4096),
        "v4096-h2": dict(vocab=4096, num_attention_heads=2, num_key_value_heads=1),
        "v16384-h2": dict(vocab=16384, num_attention_heads=2, num_key_value_heads=1),
        "h2-lr4e-3": dict(num_attention_heads=2, num_key_value_heads=1, lr=4e-3),
        "h2-lr2e-3": dict(num_attention_heads=2, num_key_value_heads=1, lr=2e-3),
        "h1": dict(num_attention_heads=1, num_key_value_heads=1),
        "h2-kv2": dict(num_attention_heads=2, num_key_value_heads=2),
        "h2-s128": dict(num_attention_heads=2, num_key_value_heads=1, seq_len=128, batch_size=32),
        "h2-s128-L5": dict(num_attention_heads=2, num_key_value_heads=1, seq_len=128, batch_size=32,
                           num_hidden_layers=5),
        "h2-s64": dict(num_attention_heads=2, num_key_value_heads=1, seq_len=64, batch_size=64),
        "h2-s32": dict(num_attention_heads=2, num_key_value_heads=1, seq_len=32, batch_size=128),
    }.items()},
    "smoke": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, seq_len=64, batch_size=4),  # checks the script, not a contender
}


def variant(name: str) -> dict[str, Any]:
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return {**BASE, **VARIANTS[name]}


def flops_per_token(cfg: dict[str, Any]) -> float:
    """Training FLOPs per token: 6·(hidden matmul params + head) + causal attention 6·L·T·d, plus Muon's
    Newton–Schulz work per step spread over the step's tokens (5 iterations of 4m²n + 2m³, m ≤ n)."""
    d, f, L, T = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["seq_len"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    mats = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    dense = L * sum(a * b for a, b in mats) + d * cfg["vocab"]
    fpt = 6 * dense + 6 * L * T * d
    if cfg["optimizer"] == "muon":
        ns = L * sum(5 * (4 * min(a, b) ** 2 * max(a, b) + 2 * min(a, b) ** 3) for a, b in mats)
        fpt += ns / (cfg["batch_size"] * T)
    return float(fpt)


def prep(out: Path, vocabs: list[int], train_chars: int, val_chars: int, seed: int) -> None:
    from tinyllm.data.corpora import inews, pretrain_texts
    from tinyllm.data.text import write_shards
    from tinyllm.recipes.tiny_zh import take_documents
    from tinyllm.tokenizer.bpe import train_bpe
    from tinyllm.tokenizer.chat import CHATML_TEMPLATE

    arts = inews("train")
    random.Random(seed).shuffle(arts)
    tok_texts, n = [], 0
    for a in arts:
        tok_texts.append(f"{a.title}\n{a.content}")
        n += len(tok_texts[-1])
        if n >= 3_000_000:
            break
    train, val = pretrain_texts("train"), pretrain_texts("val")
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(val)
    docs_train, docs_val = take_documents(train, train_chars), take_documents(val, val_chars)
    for v in vocabs:
        d = out / f"v{v}"
        if (d / "shards" / "index.json").exists():
            continue
        tok = train_bpe(tok_texts, v, show_progress=False, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
        tok.save(d / "tokenizer")
        write_shards(docs_train, tok, d / "shards", val_texts=docs_val, progress=False)
        # every val document adds one <|endoftext|>; count the characters the tokens spell
        chars = sum(len(t) for t in docs_val)
        (d / "val_chars.json").write_text(json.dumps({"chars": chars, "docs": len(docs_val)}))
        print(f"v{v}: ready", flush=True)


def build(cfg: dict[str, Any], vocab_size: int, eos: int) -> torch.nn.Module:
    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model

    mc = preset("tiny").replace(
        vocab_size=vocab_size, eos_token_id=eos, hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=max(512, cfg["seq_len"]), tie_word_embeddings=cfg["tie_word_embeddings"],
        hidden_act=cfg["hidden_act"])
    model = build_model(mc)
    if cfg["zero_init_residual"]:
        from tinyllm.train.pretrain import zero_init_residual

        zero_init_residual(model)
    return model


def probe(out: Path, names: list[str], seconds: float, precision: str) -> None:
    from tinyllm.capability import describe, resolve_precision
    from tinyllm.recipes.tiny_zh_plan import measure_step_seconds

    prec = resolve_precision(precision, "cpu")
    for name in names:
        cfg = variant(name)
        torch.manual_seed(0)
        model = build(cfg, cfg["vocab"], 0)
        step_s = measure_step_seconds(model, cfg["batch_size"], cfg["seq_len"], cfg["vocab"], prec, repeats=5,
                                      optimizer=cfg["optimizer"])
        tokens = int(seconds / step_s) * cfg["batch_size"] * cfg["seq_len"]
        print(json.dumps({"variant": name, "step_s": round(step_s, 4), "tokens": tokens, "precision": prec,
                          "params": sum(p.numel() for p in model.parameters()), "cpu": describe("cpu")}),
              flush=True)


def train_variant(out: Path, name: str, tokens: int, device: str, precision: str, seed: int) -> dict[str, Any]:
    from tinyllm.data.text import PackedBatches, TokenShards
    from tinyllm.train.loop import TrainConfig, train
    from tinyllm.train.losses import model_lm_loss
    from tinyllm.train.pretrain import PretrainTask

    cfg = variant(name)
    d = out / f"v{cfg['vocab']}"
    shards = TokenShards(d / "shards", "train")
    torch.manual_seed(seed)
    model = build(cfg, shards.vocab_size, shards.eos_token_id)
    steps = max(20, tokens // (cfg["batch_size"] * cfg["seq_len"]))
    task = PretrainTask(d / "shards", cfg["batch_size"], cfg["seq_len"], seed, cfg["batch_size"],
                        document_mask=cfg["document_mask"])
    tc = TrainConfig(out_dir=str(out / "runs" / name), max_steps=steps, batch_size=cfg["batch_size"], lr=cfg["lr"],
                     min_lr=cfg["min_lr"], warmup_steps=min(cfg["warmup"], steps // 10), schedule=cfg["schedule"],
                     decay_fraction=cfg["decay_fraction"],
                     optimizer=cfg["optimizer"], adamw_lr_scale=cfg["adamw_lr_scale"],
                     weight_decay=cfg["weight_decay"], precision=precision,
                     eval_interval=0, eval_steps=0, log_interval=max(1, steps // 20), save_interval=0,
                     seed=seed, device=device, progress=False)
    t0 = time.time()
    train(model, task, tc)
    train_s = time.time() - t0
    # held-out: every val window once, in order
    val = TokenShards(d / "shards", "val")
    dev = next(model.parameters()).device
    model.eval()
    nll, ntok = 0.0, 0
    with torch.no_grad():
        for x, y in PackedBatches(val, 16, cfg["seq_len"], shuffle=False):
            loss = model_lm_loss(model, x.to(dev), y.to(dev))
            nll += loss.item() * y.numel()
            ntok += y.numel()
            if ntok + 16 * cfg["seq_len"] > len(val):
                break
    vc = json.loads((d / "val_chars.json").read_text())
    chars_per_token = vc["chars"] / len(val)
    bpc = nll / ntok / math.log(2) / chars_per_token
    return {"variant": name, "tokens": steps * cfg["batch_size"] * cfg["seq_len"], "steps": steps,
            "val_loss": round(nll / ntok, 4), "bits_per_char": round(bpc, 4), "train_s": round(train_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["prep", "probe", "train"])
    ap.add_argument("--out", default="runs/speedrun")
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 4096])
    ap.add_argument("--train-chars", type=int, default=14_000_000)
    ap.add_argument("--val-chars", type=int, default=200_000)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--seconds", type=float, default=330.0, help="probe: the pretraining budget in CPU seconds")
    ap.add_argument("--budgets", default="", help="train: JSON lines from probe (variant → tokens)")
    ap.add_argument("--tokens", type=int, default=0, help="train: one token budget for every variant")
    ap.add_argument("--flops-match", action="store_true",
                    help="train: --tokens is the base variant's budget; every other variant gets the same FLOPs")
    ap.add_argument("--scale", type=float, default=1.0, help="train: multiply every budget")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    if args.mode == "prep":
        prep(out, args.vocab, args.train_chars, args.val_chars, args.seed)
    elif args.mode == "probe":
        probe(out, names, args.seconds, args.precision)
    else:
        budgets: dict[str, int] = {}
        if args.budgets:
            for line in Path(args.budgets).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    budgets[row["variant"]] = row["tokens"]
        for name in names:
            tokens = budgets.get(name) or args.tokens
            if args.flops_match and name not in budgets:
                tokens = tokens * flops_per_token(variant("base")) / flops_per_token(variant(name))
            tokens = int(tokens * args.scale)
            if not tokens:
                raise SystemExit(f"no token budget for {name!r}: pass --budgets or --tokens")
            print(json.dumps(train_variant(out, name, tokens, args.device, args.precision, args.seed)), flush=True)


if __name__ == "__main__":
    main()
