"""The main job: a tiny Chinese LLM trained end to end on a CPU (notes ch.01–05 in one run).

`tinyllm recipe tiny-zh [--quick] [--out runs/tiny-zh]`:

1. tokenizer — byte-level BPE (~8k vocab, Qwen-style pre-tokenization) trained on the inews train split,
   with <|endoftext|> between documents and ChatML's <|im_start|>/<|im_end|>;
2. shards    — inews train articles + People's Daily training sentences → token shards (inews dev +
   People's Daily held-out lines → validation);
3. pretrain  — a ~7M-parameter LLaMA-style decoder (pre-RMSNorm, RoPE, SwiGLU, GQA, tied embeddings),
   bf16 autocast, cosine schedule, for a wall-clock budget (steps are sized from a measured step time);
4. sft       — full fine-tuning on the derived offline tasks (title, sentiment, translate, qa) with
   assistant-only loss;
5. evaluate  — validation perplexity; sentiment accuracy on the inews test split by log-likelihood of the three
   labels vs the majority-class baseline; title generation ROUGE-L (characters) on the test split;
6. report    — `report.md` (config, tokens, throughput, MFU, metrics, chat samples), loss curves (PNG), and
   the final HF checkpoint in `model/` (loads in transformers; tokenizer files included).

Opt-in alignment stages after the evaluation (`--dpo`, `--grpo`; `tiny_zh_align.py`): DPO on inews preference
pairs and GRPO on verifiable arithmetic, each reporting its before/after metrics in `report.md`.

Every stage writes its output atomically and is skipped when it already exists, so an interrupted run resumes
where it stopped (`--fresh` starts over). Scales: default (~10 minutes on 2 cores), `--quick` (~2 minutes), and
`test` (seconds; used by the test suite).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinyllm.atomic import atomic_dir, atomic_open, atomic_write_json
from tinyllm.data.corpora import DEFAULT_SOURCES

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SFT_TASKS = ("title", "sentiment", "translate", "qa")
TRANSLATE_TO_CHINESE = "把下面的英文翻译成中文。"
# Each task's share of the SFT mix (a run draws fewer rows than the records hold, so copies set the mixture).
# Sentiment answers are three tokens against ~20 for a title: two copies keep them from being drowned (same
# pretrained model, same budget: 61.5 % -> 65.5 % sentiment, bits/char after SFT unchanged). Titles need to learn
# to copy from the article: with 1 / 2 / 3 / 5 copies, title ROUGE-L on 160 inews dev articles was 0.148 / 0.167 /
# 0.197 / 0.189 (test 0.146 / 0.166 / 0.190 / 0.187), sentiment 68.8 / 68.8 / 67.5 / 68.2 %, and bits/char after
# SFT moved +0.090 / +0.049 / +0.064 / +0.063 from pretraining (same pretrained model, AVX-512 Xeon, bf16).
TASK_COPIES = {"sentiment": 2, "title": 3}


def user_text(rec: dict[str, str]) -> str:
    """The user turn of one derived SFT record, the instruction *after* its input ("下面" becomes "上面").

    Title and sentiment rows read the same inews articles and differ only in the instruction; placed before a
    120-character article, the instruction was too far back for a model of a few million parameters to attend to,
    and it answered title prompts with sentiment labels. Next to the answer it is the last thing read."""
    if not rec.get("input"):
        return rec["instruction"]
    return f"{rec['input']}\n\n{rec['instruction'].replace('下面', '上面')}"


def chat_record(rec: dict[str, str]) -> dict[str, Any]:
    """An alpaca record as the OpenAI-messages record the SFT stage trains on (`user_text` order)."""
    return {"messages": [{"role": "user", "content": user_text(rec)},
                         {"role": "assistant", "content": rec["output"]}]}


@dataclass(frozen=True)
class Scale:
    tokenizer_chars: int
    vocab_size: int
    model: dict[str, Any]
    seq_len: int
    batch_size: int
    pretrain_seconds: float
    sft_seconds: float
    sft_per_task: int
    eval_sentiment: int
    eval_titles: int
    max_steps: int | None = None  # fixed step counts (test scale) instead of time budgets
    # pretraining recipe (bench/speedrun.py; BENCHMARKS.md "main job" ablation): Muon on hidden matrices,
    # warmup-stable-decay to 0, a narrow 4-layer model that sees more tokens in the budget
    lr: float = 3e-3
    min_lr: float = 0.0
    schedule: str = "wsd"
    optimizer: str = "muon"
    # SFT peak learning rate at the scale's batch_size; a plan with a smaller batch takes more, noisier steps in
    # the same budget and scales it by sqrt(batch / batch_size) (`sft_learning_rate`)
    sft_lr: float = 7e-4
    replay_fraction: float = 0.25  # share of SFT examples that are pretraining windows (keeps the LM)
    # fewer pretraining steps than this: re-plan (precision, halved batch). At a CPU's token budget more, smaller
    # steps win: on an AVX2-only EPYC (fp32, ~1.3 M tokens in the budget) batch 8 × 662 steps reached 6.30 bits/char
    # against 6.46 for batch 16 × 313 (`bench/speedrun.py`, round 3 in BENCHMARKS.md); where bf16 is fast the
    # budget already holds ~600 steps of batch 16
    min_steps: int = 500
    sources: tuple[str, ...] = DEFAULT_SOURCES
    max_epochs: float = 2.0  # cap on passes over the pretraining text
    compile: bool = False
    # narrower models for a compute-bound machine, widest first: the plan takes one when it runs at least
    # `narrower_speedup`× the tokens/s of the model before it (on an AVX2 CPU in fp32 d160 ran 1.22× d192 and
    # reached 6.26 bits/char against 6.46 in the same 320 s; where bf16 is fast, per-step overhead dominates,
    # the widths run alike and the wider model keeps its capacity)
    narrower: tuple[dict[str, Any], ...] = ()
    narrower_speedup: float = 1.15


SCALES: dict[str, Scale] = {
    "default": Scale(3_000_000, 8192, dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                           num_attention_heads=6, num_key_value_heads=2),
                     256, 16, 320.0, 165.0, 6000, 400, 100,
                     narrower=(dict(hidden_size=160, intermediate_size=432, num_hidden_layers=4, num_attention_heads=5,
                                    num_key_value_heads=1),
                               dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2))),
    "quick": Scale(600_000, 4096, dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2),
                   128, 16, 45.0, 20.0, 1500, 150, 30, min_steps=60),
    "test": Scale(40_000, 400, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2),
                  32, 4, 0.0, 0.0, 40, 12, 4, max_steps=6),
    # CUDA: tens of millions of parameters over every offline Chinese corpus, bf16, GPU-sized batches
    "gpu": Scale(3_000_000, 16384, dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=4),
                 512, 64, 240.0, 60.0, 20000, 1000, 300, lr=2e-3, min_steps=200,
                 sources=("inews", "peoples_daily", "hsk", "chatterbot", "poetry"), max_epochs=6.0,
                 compile=True),
}


@dataclass
class TinyZhConfig:
    out: str = field(default="runs/tiny-zh", metadata={"help": "output directory"})
    quick: bool = field(default=False, metadata={"help": "about 2 minutes instead of about 10"})
    scale: str = field(default="", metadata={"help": "default (CPU, ~10 min), quick (~2-3 min), gpu (chosen on CUDA: "
                                                     "a ~30M model over all offline Chinese text) or test",
                                             "choices": ["", *SCALES]})
    seed: int = field(default=0, metadata={"help": "seed for data order and initial weights"})
    pretrain_seconds: float = field(default=0.0, metadata={"help": "pretraining wall-clock budget (0: the scale's)"})
    sft_seconds: float = field(default=0.0, metadata={"help": "SFT wall-clock budget (0: the scale's)"})
    precision: str = field(default="auto", metadata={"help": "training precision; auto: bf16 on CUDA and on CPUs "
                                                             "where bf16 matmul measures faster than fp32",
                                                     "choices": ["auto", "fp32", "bf16"]})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    fresh: bool = field(default=False, metadata={"help": "delete previous outputs and start over"})
    dpo: bool = field(default=False, metadata={"help": "also run DPO on inews preference pairs and report held-out "
                                                       "preference accuracy / margin before and after"})
    grpo: bool = field(default=False, metadata={"help": "also run an arithmetic SFT warm-up + GRPO and report the "
                                                        "held-out mean verifiable reward before and after"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        if not self.scale:
            from tinyllm.utils import pick_device

            on_cuda = pick_device(self.device).type == "cuda"
            self.scale = "quick" if self.quick else "gpu" if on_cuda else "default"
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r} is not one of {sorted(SCALES)}")
        for name in ("pretrain_seconds", "sft_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0 (0: the scale's budget)")

    def scale_settings(self) -> Scale:
        """The scale with this run's budget overrides applied."""
        sc = SCALES[self.scale]
        return dataclasses.replace(sc, pretrain_seconds=self.pretrain_seconds or sc.pretrain_seconds,
                                   sft_seconds=self.sft_seconds or sc.sft_seconds)


def _log(msg: str) -> None:
    print(f"[tiny-zh] {msg}", flush=True)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, default=str)


# ------------------------------------------------------------------ stages
def stage_tokenizer(cfg: TinyZhConfig, sc: Scale, out: Path) -> Path:
    from tinyllm.data.corpora import inews
    from tinyllm.tokenizer.bpe import train_bpe
    from tinyllm.tokenizer.chat import CHATML_TEMPLATE

    tdir = out / "tokenizer"
    if (tdir / "tokenizer.json").exists():
        return tdir
    t0 = time.time()
    arts = inews("train")
    random.Random(cfg.seed).shuffle(arts)
    texts, n = [], 0
    for a in arts:
        doc = f"{a.title}\n{a.content}"
        texts.append(doc)
        n += len(doc)
        if n >= sc.tokenizer_chars:
            break
    tok = train_bpe(texts, sc.vocab_size, special_tokens=SPECIALS, show_progress=cfg.progress,
                    eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    with atomic_dir(tdir) as tmp:
        tok.save(tmp)
    _log(f"tokenizer: {tok.vocab_size} tokens from {n:,} characters in {time.time() - t0:.0f}s")
    return tdir


def take_documents(docs: list[str], chars: int) -> list[str]:
    """Whole documents from the front of `docs` until at least `chars` characters (or all of them)."""
    out_docs, n = [], 0
    for d in docs:
        out_docs.append(d)
        n += len(d)
        if n >= chars:
            break
    return out_docs


def stage_shards(cfg: TinyZhConfig, sc: Scale, out: Path, tokenizer: Any, tokens_needed: int) -> Path:
    from tinyllm.data.text import write_shards
    from tinyllm.recipes.tiny_zh_bpc import corpus_documents, save_document_manifest, shuffled_order

    sdir = out / "shards"
    if (sdir / "index.json").exists():
        return sdir
    t0 = time.time()
    train, val = corpus_documents("train", sc.sources), corpus_documents("val", sc.sources)
    rng = random.Random(cfg.seed)
    # the same order rng.shuffle(train), rng.shuffle(val) gives, kept as indices for the document manifest
    train_order, val_order = shuffled_order(len(train), rng), shuffled_order(len(val), rng)
    train, val = [train[i] for i in train_order], [val[i] for i in val_order]
    # ~1.4 characters per token for this tokenizer on Chinese news; keep 20% headroom
    train_chars, val_chars = int(tokens_needed * 1.4 * 1.2), max(20_000, int(tokens_needed * 0.05))
    docs_val, docs_train = take_documents(val, val_chars), take_documents(train, train_chars)
    with atomic_dir(sdir) as tmp:
        index = write_shards(docs_train, tokenizer, tmp, val_texts=docs_val, progress=cfg.progress)
        save_document_manifest(tmp, cfg.seed, train_order, docs_train, val_order, docs_val, sources=sc.sources)
    sp = index["splits"]
    _log(f"shards: {sp['train']['total_tokens']:,} train / {sp['val']['total_tokens']:,} val tokens "
         f"in {time.time() - t0:.0f}s")
    return sdir


def _pretrain_config(cfg: TinyZhConfig, sc: Scale, out: Path, shards: Path, plan: dict[str, Any]) -> Any:
    from tinyllm.train.pretrain import PretrainConfig

    max_steps = plan["max_steps"]
    return PretrainConfig(
        data_dir=str(shards), out_dir=str(out / "pretrain"), tokenizer=str(out / "tokenizer"), seq_len=sc.seq_len,
        model_preset="tiny", max_position_embeddings=max(512, sc.seq_len), tie_word_embeddings=True,
        **plan.get("model", sc.model),
        max_steps=max_steps, batch_size=plan["batch_size"], lr=sc.lr, min_lr=sc.min_lr, schedule=sc.schedule,
        optimizer=sc.optimizer, warmup_steps=max(1, min(50, max_steps // 10)), weight_decay=0.1,
        precision=plan["precision"], compile=sc.compile and plan["device"] == "cuda",
        eval_interval=max(1, max_steps // 4), eval_steps=8, log_interval=max(1, max_steps // 50),
        save_interval=max(1, max_steps // 3), keep_last=1, seed=cfg.seed, device=plan["device"],
        progress=cfg.progress)


def measure_step_seconds(model: torch.nn.Module, batch_size: int, seq_len: int, vocab: int,
                         precision: str, repeats: int = 3, optimizer: str = "adamw") -> float:
    """Seconds per training step of one batch: forward, backward and the optimizer update (fastest of `repeats`
    after a warm-up: the minimum is the estimate least disturbed by other work on the machine). The probe model
    is trained by it; pass a throw-away copy."""
    from tinyllm.train.losses import model_lm_loss
    from tinyllm.train.optim import build_optimizer

    dev = next(model.parameters()).device
    opt = build_optimizer(list(model.named_parameters()), 1e-4, 0.1, kind=optimizer)
    x = torch.randint(0, vocab, (batch_size, seq_len), device=dev)
    times = []
    model.train()
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model_lm_loss(model, x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - t0)
    # data loading, logging and evaluation add roughly 10% on these sizes
    return min(times) * 1.1


def plan_pretrain(cfg: TinyZhConfig, sc: Scale, tokenizer: Any, corpus_tokens: int | None = None) -> dict[str, Any]:
    """Which width, precision and batch, and how many steps of them fit the scale's time budget on this machine,
    measured.

    On a CPU the scale's model is timed against its `narrower` alternatives first: a narrower one is taken when it
    runs at least `narrower_speedup`× the tokens/s (a compute-bound machine, where tokens matter more than
    width at this budget). The resolved precision (`auto`: bf16 only where measured faster) and the scale's batch come first; if the
    budget then allows fewer than `sc.min_steps` steps, the other precision and halved batches are measured too
    and the first candidate that reaches `min_steps` wins (else the one with the most tokens), and the plan
    says why. Steps are capped at `sc.max_epochs` passes over the corpus when its size is known."""
    from tinyllm.capability import bf16_matmul_speedup, describe, resolve_precision
    from tinyllm.model.hf import build_model
    from tinyllm.utils import pick_device, seed_everything

    device = pick_device(cfg.device)
    first = resolve_precision(cfg.precision, device)
    base = {"device": device.type, "device_name": describe(device), "precision": first,
            "batch_size": sc.batch_size}
    if sc.max_steps is not None:
        return {**base, "max_steps": sc.max_steps, "measured_step_seconds": 0.0, "tokens_per_second": None,
                "tokens": sc.max_steps * sc.batch_size * sc.seq_len, "reason": "fixed steps (test scale)"}
    alt = [p for p in ("bf16", "fp32") if p != first] if cfg.precision == "auto" else []
    if device.type == "cpu" and alt == ["bf16"] and bf16_matmul_speedup() < 0.5:
        alt = []  # bf16 emulated in software: one probe step would take minutes and lose anyway
    precisions = [first, *alt]
    batches = [b for b in (sc.batch_size, sc.batch_size // 2, sc.batch_size // 4) if b >= 4]

    timed: dict[tuple, float] = {}

    def probe(model_kw: dict[str, Any], precision: str, batch: int) -> float:
        key = (tuple(sorted(model_kw.items())), precision, batch)
        if key not in timed:
            pcfg = _pretrain_config(cfg, sc, Path("."), Path("."), {**base, "max_steps": 1, "model": model_kw})
            seed_everything(cfg.seed)
            model = build_model(pcfg.model_config(tokenizer.vocab_size, tokenizer.eos_token_id)).to(device)
            timed[key] = measure_step_seconds(model, batch, sc.seq_len, tokenizer.vocab_size, precision,
                                              optimizer=sc.optimizer)
        return timed[key]

    # the width: a narrower model only where it buys clearly more tokens (a compute-bound CPU)
    model_kw, widths = sc.model, []
    if sc.narrower and device.type == "cpu":
        best = probe(model_kw, first, sc.batch_size)
        widths.append({"hidden_size": model_kw["hidden_size"], "step_s": best})
        for cand in sc.narrower:
            step_s = probe(cand, first, sc.batch_size)
            widths.append({"hidden_size": cand["hidden_size"], "step_s": step_s})
            _log(f"probe: width {cand['hidden_size']} runs {best / step_s:.2f}× the tokens/s of width "
                 f"{model_kw['hidden_size']}")
            if best / step_s < sc.narrower_speedup:
                break
            model_kw, best = cand, step_s
    base["model"] = model_kw
    tried: list[dict[str, Any]] = []
    for precision in precisions:
        for batch in batches:
            step_s = probe(model_kw, precision, batch)
            steps = int(sc.pretrain_seconds / step_s)
            tried.append({"precision": precision, "batch_size": batch, "step_s": step_s, "steps": steps})
            _log(f"probe: {precision} batch {batch}: {step_s:.3f} s/step → {steps} steps in "
                 f"{sc.pretrain_seconds:.0f} s")
            if steps >= sc.min_steps:
                break
        if tried[-1]["steps"] >= sc.min_steps:
            break
    good = [t for t in tried if t["steps"] >= sc.min_steps]
    pick = good[0] if good else max(tried, key=lambda t: t["steps"] * t["batch_size"])
    if pick is tried[0]:
        reason = f"{pick['steps']} steps fit the {sc.pretrain_seconds:.0f} s budget"
    elif good:
        reason = (f"{tried[0]['precision']} at batch {tried[0]['batch_size']} allows only {tried[0]['steps']} steps "
                  f"(< {sc.min_steps}); {pick['precision']} at batch {pick['batch_size']} allows {pick['steps']}")
    else:
        reason = (f"no candidate reaches {sc.min_steps} steps in {sc.pretrain_seconds:.0f} s; the fastest "
                  f"({pick['precision']}, batch {pick['batch_size']}) gives {pick['steps']}: the model will be "
                  "undertrained (try --scale quick, or a GPU)")
        _log(f"warning: {reason}")
    steps = max(20, pick["steps"])
    window = pick["batch_size"] * sc.seq_len
    if corpus_tokens:
        cap = max(20, int(sc.max_epochs * corpus_tokens / window))
        if cap < steps:
            reason += f"; capped at {sc.max_epochs:g} epochs of the corpus ({cap} steps)"
            steps = cap
    if model_kw is not sc.model:
        chosen = next(w["step_s"] for w in widths if w["hidden_size"] == model_kw["hidden_size"])
        reason += (f"; width {model_kw['hidden_size']} (not {sc.model['hidden_size']}): it runs "
                   f"{widths[0]['step_s'] / chosen:.2f}× the tokens/s on this compute-bound machine")
    return {**base, "precision": pick["precision"], "batch_size": pick["batch_size"], "max_steps": steps,
            "measured_step_seconds": pick["step_s"], "tokens_per_second": window / pick["step_s"],
            "tokens": steps * window, "reason": reason, "probes": tried, "width_probes": widths}


def _corpus_tokens_estimate(sc: Scale) -> int:
    """Training tokens the scale's corpus holds, from its characters (~1.45 characters per token for these
    tokenizers on Chinese news); caps the steps at `max_epochs` passes."""
    from tinyllm.recipes.tiny_zh_bpc import corpus_documents

    return int(sum(len(d) for d in corpus_documents("train", sc.sources)) / 1.45)


def stage_pretrain(cfg: TinyZhConfig, sc: Scale, out: Path, tokenizer: Any) -> dict[str, Any]:
    from tinyllm.train.pretrain import run_pretrain

    done = out / "pretrain" / "final" / "model.safetensors"
    state_path = out / "pretrain_plan.json"
    if state_path.exists():
        plan = json.loads(state_path.read_text())
    else:
        plan = plan_pretrain(cfg, sc, tokenizer, corpus_tokens=_corpus_tokens_estimate(sc))
        _write_json(state_path, plan)
        _log(f"plan: {plan['device_name']}, {plan['precision']}, batch {plan['batch_size']}: {plan['reason']}")
    shards = stage_shards(cfg, sc, out, tokenizer, plan["tokens"])
    if not done.exists():
        _log(f"pretrain: {plan['max_steps']} steps × {plan['batch_size']}×{sc.seq_len} tokens "
             f"(~{plan['measured_step_seconds']:.3f}s/step measured)")
        pcfg = _pretrain_config(cfg, sc, out, shards, plan)
        pcfg.resume = (out / "pretrain" / "checkpoints" / "latest").exists()
        result = run_pretrain(pcfg)
        if result.interrupted:
            raise KeyboardInterrupt
    return plan


def _sft_records(cfg: TinyZhConfig, sc: Scale) -> list[dict[str, str]]:
    from tinyllm.data.corpora import sft_examples

    rng = random.Random(cfg.seed)
    recs: list[dict[str, str]] = []
    for task in SFT_TASKS:
        rows = sft_examples(task, "train", max_chars=120)
        if task == "translate":
            # English → Chinese only: a few-million-parameter model cannot learn to write English, and
            # English-output rows taught it to drift into English in every reply
            rows = [r for r in rows if r["instruction"] == TRANSLATE_TO_CHINESE]
        rng.shuffle(rows)
        recs += rows[: sc.sft_per_task] * TASK_COPIES.get(task, 1)
    rng.shuffle(recs)
    return recs


def sft_steps_for_budget(batches: Any, seconds: float, step_seconds: float, seq_len: int) -> int:
    """How many SFT steps fit `seconds` when a full-width step (`seq_len` tokens per row) takes `step_seconds`:
    each batch costs step_seconds·width/seq_len for the padded width of the batch it will actually draw
    (`SFTBatches.widths`). Measured at the default scale on a 2-core AVX2 EPYC, a step's time grows a little
    faster than its width (0.165 s at a mean width of 142, 0.337 s at 245, AdamW) and the pretraining probe's
    step (Muon, +10 %) is 0.41 s at 256, so the estimate errs on the short side."""
    per_token = max(step_seconds, 1e-6) / seq_len
    spent, steps = 0.0, 0
    for w in batches.widths(int(seconds / per_token) + 1):
        spent += per_token * min(w, seq_len)
        if spent > seconds:
            break
        steps += 1
    return steps


def sft_learning_rate(sc: Scale, batch: int) -> float:
    """The SFT peak learning rate for the batch the plan chose: the scale's `sft_lr` at its own batch size, times
    sqrt(batch / batch_size) for another batch (square-root scaling, as for Adam-style optimizers). Measured on an
    AVX2 EPYC, SFT from the same pretrained models (bits/char drift after SFT, sentiment accuracy):
    batch 16 (461 steps): lr 1e-3 +0.063 / 68.2 %, 7.07e-4 +0.028 / 68.2 %, 5e-4 +0.007 / 67.0 %;
    batch 8 (735 steps): lr 1e-3 +0.146 / 66.5 %, 7.07e-4 +0.087 / 66.5 %, 5e-4 +0.043 / 67.2 %; more replay
    instead (40 % of the rows, lr 1e-3) +0.016 but 59.8 % (BENCHMARKS.md, main job)."""
    if batch <= 0:
        raise ValueError(f"batch={batch} must be positive")
    return sc.sft_lr * math.sqrt(batch / sc.batch_size)


def stage_sft(cfg: TinyZhConfig, sc: Scale, out: Path, plan: dict[str, Any]) -> Path:
    from tinyllm.tokenizer import load_tokenizer
    from tinyllm.train.sft import SFTBatches, SFTConfig, prepare_examples, run_sft

    final = out / "model"
    if (final / "model.safetensors").exists():
        return final
    data = out / "sft_data.jsonl"
    if not data.exists():
        with atomic_open(data) as f:
            for r in _sft_records(cfg, sc):
                f.write(json.dumps(chat_record(r), ensure_ascii=False) + "\n")
    batch = plan.get("batch_size", sc.batch_size)
    lr = sft_learning_rate(sc, batch)

    def config(steps: int) -> SFTConfig:
        # rows of similar length share a batch (the replay windows fill theirs, the short task rows theirs): about
        # 0.6 of the padded tokens of random batches at the default scale, so more steps in the same time
        return SFTConfig(init_from=str(out / "pretrain" / "final"), data=str(data), tokenizer=str(out / "tokenizer"),
                         out_dir=str(out / "sft"), max_length=sc.seq_len, max_steps=steps, batch_size=batch,
                         lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 20),
                         precision=plan.get("precision", cfg.precision), replay_data=str(out / "shards"),
                         replay_fraction=sc.replay_fraction, group_by_length=True,
                         eval_interval=max(1, steps // 2), eval_steps=4, log_interval=max(1, steps // 30),
                         save_interval=max(1, steps // 2), keep_last=1, val_fraction=0.02, seed=cfg.seed,
                         device=plan.get("device", cfg.device), progress=cfg.progress)

    scfg = config(1)
    prepared = prepare_examples(scfg, load_tokenizer(out / "tokenizer"))
    if sc.max_steps is not None:
        steps = sc.max_steps
    else:
        # the budget priced batch by batch from the widths the run will draw, a full-width step costing about a
        # pretraining step (measured: 0.51 vs 0.525 s at the default scale)
        draws = SFTBatches(prepared[0], batch, 0, cfg.seed, group_by_length=True)
        steps = max(20, sft_steps_for_budget(draws, sc.sft_seconds, plan["measured_step_seconds"], sc.seq_len))
    scfg = config(steps)
    _log(f"sft: {steps} steps on {len(SFT_TASKS)} derived tasks, {sc.replay_fraction:.0%} of the rows "
         f"pretraining text (replay), rows grouped by length, peak lr {lr:.2g}")
    scfg.resume = (out / "sft" / "checkpoints" / "latest").exists()
    result = run_sft(scfg, prepared)
    if result.interrupted:
        raise KeyboardInterrupt
    with atomic_dir(final) as tmp:
        shutil.copytree(out / "sft" / "final", tmp, dirs_exist_ok=True)
        _stop_at_end_of_turn(tmp)
    return final


def _stop_at_end_of_turn(model_dir: Path) -> None:
    """A chat model stops at <|im_end|> as well as <|endoftext|>: list both as EOS for generators. Each file is
    replaced atomically, and a second run rewrites the same bytes (the list is set, not appended to)."""
    from tinyllm.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids = [tok.eos_token_id, tok.special_tokens["<|im_end|>"]]
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        data = json.loads(path.read_text())
        data["eos_token_id"] = ids
        atomic_write_json(path, data, sort_keys=True, ensure_ascii=True)


def run_recipe(cfg: TinyZhConfig) -> int:
    from tinyllm.recipes.tiny_zh_eval import evaluate, write_report
    from tinyllm.tokenizer import load_tokenizer

    sc = cfg.scale_settings()
    if sc.sources != DEFAULT_SOURCES:
        from tinyllm.data.corpora import missing_sources

        missing = missing_sources(sc.sources)
        for name, why in missing.items():
            _log(f"corpus {name!r} skipped: {why}")
        sc = dataclasses.replace(sc, sources=tuple(s for s in sc.sources if s not in missing))
    out = Path(cfg.out)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "recipe_config.json", {**dataclasses.asdict(cfg), "scale_settings": dataclasses.asdict(sc)})
    t0 = time.time()
    timings: dict[str, float] = {}
    try:
        tdir = stage_tokenizer(cfg, sc, out)
        timings["tokenizer"] = time.time() - t0
        tokenizer = load_tokenizer(tdir)
        plan = stage_pretrain(cfg, sc, out, tokenizer)
        timings["pretrain"] = time.time() - t0 - sum(timings.values())
        model_dir = stage_sft(cfg, sc, out, plan)
        timings["sft"] = time.time() - t0 - sum(timings.values())
        metrics = evaluate(cfg, sc, out, model_dir, tokenizer)
        timings["eval"] = time.time() - t0 - sum(timings.values())
        if cfg.dpo or cfg.grpo:
            from tinyllm.recipes.tiny_zh_align import stage_dpo, stage_grpo

            if cfg.dpo:
                metrics["dpo"] = stage_dpo(cfg, sc, out, model_dir, tokenizer)
                timings["dpo"] = time.time() - t0 - sum(timings.values())
            if cfg.grpo:
                metrics["grpo"] = stage_grpo(cfg, sc, out, model_dir)
                timings["grpo"] = time.time() - t0 - sum(timings.values())
    except KeyboardInterrupt:
        _log("interrupted; run the same command again to resume")
        return 130
    report = write_report(cfg, sc, out, plan, metrics, timings)
    _log(f"done in {time.time() - t0:.0f}s → {report}")
    return 0
