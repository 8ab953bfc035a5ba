"""Opt-in alignment stages of the tiny-zh recipe (notes ch.07): `--dpo` and `--grpo`.

Learning rates suit the recipe's tiny models (DPO 5e-4, GRPO 1e-4; TRL's defaults of 1e-6 are for billions of
parameters and move a 7M-parameter model by nothing in a few dozen steps).

- dpo:  DPO (β 0.1) of the SFT model on inews preference pairs of the train split (own title vs another
  article's title; right vs wrong sentiment label), reference = the SFT model. Measured on pairs of the *test*
  split: preference accuracy by the policy's own likelihoods (log π(y_c|x) > log π(y_r|x)), implicit-reward
  accuracy and mean margin β(ρ_c − ρ_r) — before (the SFT model) and after DPO. Output: `dpo/final/`.
- grpo: the SFT → RL pipeline on verifiable arithmetic (`a+b=` with single digits, chat format): a short SFT
  warm-up on training problems (the model knows no arithmetic from news text, and GRPO learns nothing from
  groups that all score 0), then GRPO (G completions per prompt, k3 KL to the warm-up model). Measured: mean
  reward of sampled completions on held-out problems after the warm-up (before GRPO) and after GRPO.

Each stage is skipped when its metrics file exists (resumable like the rest of the recipe); the default
recipe path does not run or import these stages.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllm.atomic import atomic_write_json, atomic_write_text
from tinyllm.recipes.tiny_zh_plan import log as _log


@dataclass(frozen=True)
class AlignScale:
    dpo_pairs: int  # per builder (title, sentiment)
    dpo_steps: int
    dpo_eval_pairs: int  # per builder, test split
    arith_train: int
    arith_heldout: int
    warmup_steps: int
    grpo_steps: int
    group_size: int


ALIGN_SCALES = {
    "default": AlignScale(1500, 200, 200, 80, 20, 300, 60, 8),
    "quick": AlignScale(300, 40, 50, 80, 20, 100, 20, 8),
    "test": AlignScale(8, 2, 4, 8, 4, 2, 2, 2),
}
ALIGN_SCALES["gpu"] = ALIGN_SCALES["default"]


def stage_dpo(cfg: Any, sc: Any, out: Path, model_dir: Path, tokenizer: Any) -> dict[str, Any]:
    from tinyllm.data.preference import load_pairs, tokenize_pairs
    from tinyllm.model.hf import load_model
    from tinyllm.train.dpo import DPOConfig, attach_reference, dpo_metrics, run_dpo

    path = out / "dpo_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    al = ALIGN_SCALES[cfg.scale]
    t0 = time.time()
    data = out / "dpo_pairs.jsonl"
    if not data.exists():
        from tinyllm.data.preference import write_pairs_jsonl

        write_pairs_jsonl(load_pairs("builtin:title,sentiment", "train", cfg.seed, al.dpo_pairs), data)
    _log(f"dpo: {al.dpo_steps} steps on {2 * al.dpo_pairs} inews preference pairs")
    dcfg = DPOConfig(init_from=str(model_dir), data=str(data), tokenizer=str(out / "tokenizer"),
                     out_dir=str(out / "dpo"), max_length=sc.sft_width, max_steps=al.dpo_steps, batch_size=8,
                     lr=5e-4, min_lr=5e-5, warmup_steps=max(1, al.dpo_steps // 10), beta=0.1,
                     precision=cfg.precision, val_fraction=0.05, eval_interval=0, eval_steps=4,
                     log_interval=max(1, al.dpo_steps // 20), save_interval=0, keep_last=1, seed=cfg.seed,
                     device=cfg.device, progress=cfg.progress)
    result = run_dpo(dcfg)
    if result.interrupted:
        raise KeyboardInterrupt
    # held-out: pairs of the inews test split, reference = the SFT model
    test_pairs = tokenize_pairs(load_pairs("builtin:title,sentiment", "test", cfg.seed, al.dpo_eval_pairs),
                                tokenizer, True, sc.sft_width)
    pad = tokenizer.pad_token_id or 0
    sft = load_model(model_dir)
    ref_pairs = attach_reference(sft, test_pairs, pad)
    metrics = {"before": dpo_metrics(sft, ref_pairs, pad, 0.1),
               "after": dpo_metrics(load_model(out / "dpo" / "final"), ref_pairs, pad, 0.1),
               "train_pairs": 2 * al.dpo_pairs, "steps": al.dpo_steps, "seconds": time.time() - t0}
    atomic_write_json(path, metrics, default=str)
    b, a = metrics["before"], metrics["after"]
    _log(f"dpo: held-out likelihood preference accuracy {b['logprob_accuracy']:.3f} → {a['logprob_accuracy']:.3f}, "
         f"implicit-reward accuracy {a['accuracy']:.3f}, margin {a['margin']:.3f}")
    return metrics


def _arith_records(problems: list[Any]) -> list[dict[str, str]]:
    return [{"instruction": p.prompt, "input": "", "output": p.answer} for p in problems]


def stage_grpo(cfg: Any, sc: Any, out: Path, model_dir: Path) -> dict[str, Any]:
    from tinyllm.train.grpo import GRPOConfig, run_grpo
    from tinyllm.train.sft import SFTConfig, run_sft
    from tinyllm.train.tasks_arith import single_digit_additions

    path = out / "grpo_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    al = ALIGN_SCALES[cfg.scale]
    t0 = time.time()
    # the same problems GRPO will see (build_rl_prompts draws them with the seed): held-out ones are never trained
    from tinyllm.train.tasks_arith import distinct_arith_problems, split_problems

    problems = distinct_arith_problems(al.arith_train + al.arith_heldout, cfg.seed, 9)
    train_p, held_p = split_problems(problems, al.arith_heldout, cfg.seed)
    held_prompts = {p.prompt for p in held_p}
    warm_data = [p for p in single_digit_additions() if p.prompt not in held_prompts]
    random.Random(cfg.seed).shuffle(warm_data)
    data = out / "arith_sft.jsonl"
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                    for r in _arith_records(warm_data)))
    warm = out / "arith_sft"
    if not (warm / "final" / "model.safetensors").exists():
        _log(f"grpo: arithmetic SFT warm-up, {al.warmup_steps} steps on {len(warm_data)} problems")
        wcfg = SFTConfig(init_from=str(model_dir), data=str(data), tokenizer=str(out / "tokenizer"), out_dir=str(warm),
                         max_length=64, max_steps=al.warmup_steps, batch_size=16, lr=1e-3, min_lr=1e-4,
                         warmup_steps=max(1, al.warmup_steps // 20), precision=cfg.precision, val_fraction=0.0,
                         eval_interval=0, eval_steps=0, log_interval=max(1, al.warmup_steps // 20),
                         save_interval=0, keep_last=1, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
        if run_sft(wcfg).interrupted:
            raise KeyboardInterrupt
    _log(f"grpo: {al.grpo_steps} steps, G={al.group_size}, held-out {al.arith_heldout} problems")
    gcfg = GRPOConfig(init_from=str(warm / "final"), tokenizer=str(out / "tokenizer"), out_dir=str(out / "grpo"),
                      task="arith", max_operand=9, num_prompts=al.arith_train, num_heldout=al.arith_heldout,
                      chat=True, max_new_tokens=4, num_generations=al.group_size, batch_size=4,
                      max_steps=al.grpo_steps, lr=1e-4, min_lr=1e-4, beta=0.04, eval_samples=4,
                      precision=cfg.precision, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
                      log_interval=max(1, al.grpo_steps // 10))
    if run_grpo(gcfg).interrupted:
        raise KeyboardInterrupt
    rl = json.loads((out / "grpo" / "grpo_metrics.json").read_text())
    metrics = {"before": rl["heldout_mean_reward_before"], "after": rl["heldout_mean_reward_after"],
               "train_reward_by_rollout": [h["reward"] for h in rl["rollouts"]], "warmup_steps": al.warmup_steps,
               "steps": al.grpo_steps, "group_size": al.group_size, "heldout": al.arith_heldout,
               "train_problems": len(train_p), "seconds": time.time() - t0}
    atomic_write_json(path, metrics, default=str)
    _log(f"grpo: held-out mean reward {metrics['before']:.3f} → {metrics['after']:.3f}")
    return metrics


def report_lines(metrics: dict[str, Any]) -> list[str]:
    """Markdown lines for report.md (empty when neither stage ran)."""
    lines: list[str] = []
    d, g = metrics.get("dpo"), metrics.get("grpo")
    if d is None and g is None:
        return lines
    lines += ["## Alignment", "", "| metric | before | after |", "|---|---|---|"]
    if d is not None:
        b, a = d["before"], d["after"]
        lines += [
            f"| DPO: preference accuracy by likelihood, inews test pairs ({b['pairs']}) | "
            f"{b['logprob_accuracy']:.1%} | {a['logprob_accuracy']:.1%} |",
            f"| DPO: implicit-reward accuracy (ρ_c > ρ_r; 0 at π = π_ref) | {b['accuracy']:.1%} | {a['accuracy']:.1%} |",
            f"| DPO: mean margin β(ρ_c − ρ_r) | {b['margin']:.3f} | {a['margin']:.3f} |",
        ]
    if g is not None:
        lines.append(f"| GRPO: mean verifiable reward, {g['heldout']} held-out `a+b=` problems (after the "
                     f"arithmetic SFT warm-up → after GRPO) | {g['before']:.3f} | {g['after']:.3f} |")
    return [*lines, ""]
