"""`tinyllm eval`: score a model on benchmark tasks with lm-evaluation-harness semantics (notes ch.09 评估).

    tinyllm eval --model smollm2 --tasks mmlu,inews_sentiment --num-fewshot 0 --limit 200 --output results.json
    tinyllm eval --model runs/tiny-zh/model --backend hf --tasks peoples_daily_ppl
    tinyllm eval --base-url http://127.0.0.1:8000/v1 --tokenizer smollm2 --tasks mmlu_anatomy

Writes `output` (JSON: the resolved config, per-task metrics, document counts and the per-document samples),
`output` with a `.md` suffix (the results table, also printed) and `.png` (a bar chart of each task's main
metric, when matplotlib is installed). Tasks are names from `tinyllm.eval.tasks.get_task` or paths of
CSV/JSON/JSONL multiple-choice files (C-Eval, CMMLU, MMLU layouts).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAIN_METRIC = ("acc", "exact_match", "rouge_l", "bits_per_byte")


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "HF checkpoint directory, .gguf file or short name (smollm2)"})
    base_url: str = field(default="", metadata={"help": "OpenAI-compatible endpoint instead of --model, e.g. "
                                                        "http://127.0.0.1:8000/v1"})
    api_key: str = field(default="", metadata={"help": "bearer token for --base-url"})
    served_model: str = field(default="", metadata={"help": "model name at --base-url (default: the first listed)"})
    tokenizer: str = field(default="", metadata={"help": "the served model's tokenizer (path or short name): "
                                                         "token-exact requests with --base-url"})
    backend: str = field(default="tinyllm", metadata={"help": "scoring backend for --model",
                                                      "choices": ["tinyllm", "hf"]})
    tasks: str = field(default="mmlu", metadata={"help": "comma-separated task names or task file paths"})
    num_fewshot: int = field(default=0, metadata={"help": "few-shot examples per prompt"})
    limit: int | None = field(default=None, metadata={"help": "first N documents of each task"})
    batch_size: int = field(default=16, metadata={"help": "rows per forward"})
    max_length: int | None = field(default=None, metadata={"help": "context window (default: the model's)"})
    seed: int = field(default=1234, metadata={"help": "few-shot sampling seed (lm-eval's default)"})
    output: str = field(default="", metadata={"help": "results JSON path (.md and .png written beside it)"})
    progress: bool = field(default=True, metadata={"help": "progress bar per task"})

    def __post_init__(self) -> None:
        if bool(self.model) == bool(self.base_url):
            raise ValueError(f"give exactly one of --model ({self.model!r}) and --base-url ({self.base_url!r})")
        if self.backend not in ("tinyllm", "hf"):
            raise ValueError(f"backend={self.backend!r} must be tinyllm or hf")
        if not [t for t in self.tasks.split(",") if t.strip()]:
            raise ValueError(f"tasks={self.tasks!r} names no task")
        for name in ("num_fewshot",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("batch_size", "limit", "max_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name}={v} must be >= 1")


def build_lm(cfg: EvalConfig) -> Any:
    if cfg.base_url:
        from tinyllm.eval.endpoint import OpenAILM
        from tinyllm.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        return OpenAILM(cfg.base_url, model=cfg.served_model, api_key=cfg.api_key, tokenizer=tok,
                        max_length=cfg.max_length or 2048)
    from tinyllm.model.hf import resolve_model_path

    path = resolve_model_path(cfg.model)
    if not path.exists():
        raise FileNotFoundError(f"--model {cfg.model}: no such file or directory ({path})")
    if cfg.backend == "hf":
        from tinyllm.eval.lm import HFLM

        return HFLM.from_pretrained(str(path), max_length=cfg.max_length)
    from tinyllm.eval.lm import TinyLM
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    return TinyLM(load_model(path), load_tokenizer(path), max_length=cfg.max_length)


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| task | n | shots | metric | value |", "|---|---:|---:|---|---:|"]
    for task, r in results.items():
        for m, v in r["metrics"].items():
            lines.append(f"| {task} | {r['n']} | {r['num_fewshot']} | {m} | {v:.4f} |")
    return "\n".join(lines)


def bar_chart(results: dict[str, Any], path: Path, title: str) -> Path | None:
    """One bar per task: its main metric (acc, exact match, ROUGE-L or bits per byte)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from tinyllm.atomic import atomic_path

    names, values, labels = [], [], []
    for task, r in results.items():
        m = next((k for k in MAIN_METRIC if k in r["metrics"]), next(iter(r["metrics"])))
        names.append(task)
        values.append(r["metrics"][m])
        labels.append(m)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names)), 3.2))
    bars = ax.bar(names, values, color="#4C72B0")
    for b, v, m in zip(bars, values, labels):
        ax.annotate(f"{m}\n{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max([1.0, *values]) * 1.25)
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    from tinyllm.atomic import atomic_write_json, atomic_write_text
    from tinyllm.eval.harness import evaluate_task
    from tinyllm.eval.tasks import get_task

    tasks = [get_task(t.strip()) for t in cfg.tasks.split(",") if t.strip()]  # bad names fail before loading
    lm = build_lm(cfg)
    results: dict[str, Any] = {}
    for task in tasks:
        t0 = time.perf_counter()
        r = evaluate_task(lm, task, num_fewshot=cfg.num_fewshot, limit=cfg.limit, batch_size=cfg.batch_size,
                          seed=cfg.seed, progress=cfg.progress)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        results[task.name] = r
    table = markdown_table(results)
    print(table)
    if cfg.output:
        out = Path(cfg.output)
        config = {**dataclasses.asdict(cfg), "api_key": "***" if cfg.api_key else ""}  # never a secret on disk
        atomic_write_json(out, {"config": config, "results": results})
        atomic_write_text(out.with_suffix(".md"), table + "\n")
        bar_chart(results, out.with_suffix(".png"), cfg.model or cfg.base_url)
    return results
