"""How the tiny-zh recipe spends its wall-clock budget, measured on the machine it runs on.

Pretraining: which width, precision and batch, and how many steps of them fit the budget (`plan_pretrain`, from
probe steps timed by `measure_step_seconds`), and the `PretrainConfig` a plan becomes (`pretrain_config`).
SFT: its steps (priced by the widths of the batches it will draw), its learning rate (scaled with the planned
batch) and its batch shape (rows of the scale's SFT width holding the pretraining batch's tokens).
`cfg` is a `tiny_zh.TinyZhConfig`, `sc` a `tiny_zh.Scale`."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    print(f"[tiny-zh] {msg}", flush=True)


def pretrain_config(cfg: Any, sc: Any, out: Path, shards: Path, plan: dict[str, Any]) -> Any:
    from tinyllm.train.pretrain import PretrainConfig

    max_steps = plan["max_steps"]
    return PretrainConfig(
        data_dir=str(shards), out_dir=str(out / "pretrain"), tokenizer=str(out / "tokenizer"), seq_len=sc.seq_len,
        model_preset="tiny", max_position_embeddings=max(512, sc.seq_len), tie_word_embeddings=True,
        **plan.get("model", sc.model),
        max_steps=max_steps, time_budget_s=sc.pretrain_seconds if sc.max_steps is None else 0.0,
        batch_size=plan["batch_size"], lr=sc.lr, min_lr=sc.min_lr, schedule=sc.schedule,
        optimizer=sc.optimizer, adamw_lr_scale=sc.adamw_lr_scale if sc.optimizer == "muon" else 1.0,
        zero_init_residual=sc.zero_init_residual, decay_fraction=sc.decay_fraction,
        warmup_steps=max(1, min(50, max_steps // 10)), weight_decay=0.1,
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


def plan_pretrain(cfg: Any, sc: Any, tokenizer: Any, corpus_tokens: int | None = None) -> dict[str, Any]:
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
            pcfg = pretrain_config(cfg, sc, Path("."), Path("."), {**base, "max_steps": 1, "model": model_kw})
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
            log(f"probe: width {cand['hidden_size']} runs {best / step_s:.2f}× the tokens/s of width "
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
            log(f"probe: {precision} batch {batch}: {step_s:.3f} s/step → {steps} steps in "
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
        log(f"warning: {reason}")
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


def corpus_tokens_estimate(sc: Any) -> int:
    """Training tokens the scale's corpus holds, from its characters (~1.45 characters per token for these
    tokenizers on Chinese news); caps the steps at `max_epochs` passes."""
    from tinyllm.recipes.tiny_zh_bpc import corpus_documents

    return int(sum(len(d) for d in corpus_documents("train", sc.sources)) / 1.45)




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


def sft_learning_rate(sc: Any, batch: int) -> float:
    """The SFT peak learning rate for the (pretraining) batch the plan chose: the scale's `sft_lr` at its own batch
    size, times sqrt(batch / batch_size) for another batch (square-root scaling, as for Adam-style optimizers;
    SFT's batch holds the same tokens, `sft_shape`). Measured on an AVX2 EPYC with 256-token windows, SFT from the
    same pretrained models (bits/char drift after SFT, sentiment accuracy): batch 16 (461 steps): lr 1e-3
    +0.063 / 68.2 %, 7.07e-4 +0.028 / 68.2 %, 5e-4 +0.007 / 67.0 %;
    batch 8 (735 steps): lr 1e-3 +0.146 / 66.5 %, 7.07e-4 +0.087 / 66.5 %, 5e-4 +0.043 / 67.2 %; more replay
    instead (40 % of the rows, lr 1e-3) +0.016 but 59.8 % (BENCHMARKS.md, main job)."""
    if batch <= 0:
        raise ValueError(f"batch={batch} must be positive")
    return sc.sft_lr * math.sqrt(batch / sc.batch_size)


def sft_shape(sc: Any, plan: dict[str, Any]) -> tuple[int, int]:
    """(rows per batch, tokens per row) for SFT and the title tagger: rows up to `sc.sft_seq_len` tokens (default
    `seq_len`), as many as make the plan's pretraining batch of tokens."""
    width = sc.sft_width
    return max(1, plan.get("batch_size", sc.batch_size) * sc.seq_len // width), width
