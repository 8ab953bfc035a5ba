"""The documentation is executable: every ```python block in docs/*.md and README.md runs and its asserts
hold, every `tinyllm …` line of a ```bash block names a real command with flags its parser accepts, every
chapter page answers the notes' interview questions, and the site builds with `mkdocs build --strict`.

A python block whose first line is `# docs: slow` (it loads the real SmolLM2 or runs long) is in the slow set.
Bash blocks are parsed, not run: they start servers, train for minutes or write into runs/.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
SLOW = "# docs: slow"

# the notes' chapters → the page that carries its interview questions (pages others own join when written)
CHAPTERS = {
    "01": ["01-segmentation.md", "01-pos-and-keywords.md", "01-word-vectors-and-ngram.md"],
    "02": ["02-architecture.md", "02-subword-tokenizers.md"],
    "03": ["03-04-data-and-training.md"],
    "04": ["04-distributed.md"],
    "05": ["05-peft.md"],
    "06": ["06-inference.md", "06-serving.md"],
    "07": ["07-alignment.md"],
    "08": ["08-rag.md", "08-rag-store.md", "08-agents.md"],
    "09": ["09-evaluation.md"],
    "10": ["10-applications.md"],
    "98": ["98-tsinghua-course.md"],
}


def blocks(lang: str) -> list[tuple[str, int, str]]:
    return [(page, i, code) for page, i, code, _ in _fenced(lang)]


def _fenced(lang: str) -> list[tuple[str, int, str, str | None]]:
    """(page, index, code, shown output): a block's output is the ```text block right after it, when only blank
    lines separate the two."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = list(FENCE.finditer(text))
        i = 0
        for k, m in enumerate(fences):
            if m.group(1) != lang:
                continue
            shown = None
            if k + 1 < len(fences) and fences[k + 1].group(1) == "text" and not text[m.end():fences[k + 1].start()].strip():
                shown = fences[k + 1].group(2)
            out.append((page.name, i, m.group(2), shown))
            i += 1
    return out


def _python_params() -> list:
    return [pytest.param(page, i, code, shown, id=f"{page}[{i}]",
                         marks=[pytest.mark.slow] if code.lstrip().startswith(SLOW) else [])
            for page, i, code, shown in _fenced("python")]


@pytest.mark.parametrize(("page", "index", "code", "shown"), _python_params())
def test_doc_example_runs(page: str, index: int, code: str, shown: str | None,
                          capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict = {"__name__": f"docs_{page}_{index}"}
    exec(compile(code, f"{page}[{index}]", "exec"), namespace)
    if shown is not None:  # the output printed on the page is the output the code prints
        printed = capsys.readouterr().out
        assert [ln.rstrip() for ln in printed.strip().splitlines()] == [ln.rstrip() for ln in shown.strip().splitlines()]


def test_docs_have_examples() -> None:
    assert len(blocks("python")) > 50, "docs/ has lost its runnable python examples"


def tinyllm_invocations(code: str, with_comments: bool = False) -> list:
    """argv of every `tinyllm …` (or `.venv/bin/tinyllm …`) call in a shell block, comments and pipes cut;
    with_comments: (argv, the line's trailing comment) pairs, for calls not fed by a pipe."""
    calls = []
    for line in code.replace("\\\n", " ").splitlines():
        m = re.search(r"\s#\s*(.*)$", line)
        comment = m.group(1).strip() if m else ""
        line = line[:m.start()] if m else line
        for n, part in enumerate(re.split(r"&&|\|\||[|;]", line)):
            words = shlex.split(part)
            for k, w in enumerate(words):
                if w == "tinyllm" or w.endswith("/bin/tinyllm"):
                    if not with_comments:
                        calls.append(words[k + 1:])
                    elif n == 0 or "|" not in line:
                        calls.append((words[k + 1:], comment))
                    break
    return calls


BASH = [(page, i, argv) for page, i, code in blocks("bash") for argv in tinyllm_invocations(code)]


@pytest.mark.parametrize(("page", "index", "argv"), BASH, ids=[f"{p}[{i}] {' '.join(a[:2])}" for p, i, a in BASH])
def test_doc_command_lines_parse(page: str, index: int, argv: list[str]) -> None:
    from tinyllm import cli

    name = " ".join(argv[:2]) if " ".join(argv[:2]) in cli.COMMANDS else argv[0]
    assert name in cli.COMMANDS, f"{page}: `tinyllm {' '.join(argv)}` names no command"
    cls, _ = cli._load(cli.COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"tinyllm {name}", exit_on_error=False)
    parser.add_argument("--config")
    parser.add_argument("--debug", action="store_true")
    cli.add_dataclass_arguments(parser, cls)
    # usage notation: "..." stands for flags shown on an earlier line, [--flag X] marks an optional one
    rest = argv[len(name.split(" ")):]
    rest = [w.strip("[]") for w in (rest[1:] if rest[:1] == ["..."] else rest)]
    if "--help" in rest or "-h" in rest:
        return
    try:
        parser.parse_args(rest)
    except (argparse.ArgumentError, SystemExit) as e:
        pytest.fail(f"{page}: `tinyllm {' '.join(argv)}` does not parse: {e}")


def test_bash_blocks_are_checked() -> None:
    assert len(BASH) >= 10


def _runnable(argv: list[str]) -> bool:
    """Shell lines cheap and side-effect free enough to run: the calculators, segmenting a given text, and
    searching the docs without a model or a store file."""
    if argv[:1] == ["calc"]:
        return True
    if argv[:1] == ["seg"]:
        return "--text" in argv
    return argv[:1] == ["ask"] and "--search-only" in argv and not {"--store", "--save-store"} & set(argv)


RUNNABLE = [(page, i, argv, comment) for page, i, code in blocks("bash")
            for argv, comment in tinyllm_invocations(code, with_comments=True) if _runnable(argv)]


@pytest.mark.parametrize(("page", "index", "argv", "comment"), RUNNABLE,
                         ids=[f"{p}[{i}] {' '.join(a[:2])}" for p, i, a, _ in RUNNABLE])
def test_doc_command_lines_run(page: str, index: int, argv: list[str], comment: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """The line runs; a trailing comment that shows output (digits or a word list like 我 / 来到) is printed."""
    from tinyllm.cli import main

    assert main(argv) == 0, f"{page}: `tinyllm {' '.join(argv)}` failed"
    out = capsys.readouterr().out
    if comment and (re.fullmatch(r"[\d,.]+", comment) or " / " in comment):
        assert comment in out, f"{page}: `tinyllm {' '.join(argv)}` does not print {comment!r}"


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_chapter_answers_interview_questions(chapter: str) -> None:
    present = [p for p in CHAPTERS[chapter] if (DOCS / p).exists()]
    assert present == CHAPTERS[chapter], f"chapter {chapter}: missing pages {set(CHAPTERS[chapter]) - set(present)}"
    with_questions = [p for p in present if "面试题" in (DOCS / p).read_text(encoding="utf-8")]
    assert with_questions, f"chapter {chapter}: none of {present} has a 面试题 / Interview questions section"
    for p in with_questions:
        section = (DOCS / p).read_text(encoding="utf-8").split("面试题", 1)[1]
        assert "```python" in section, f"{p}: the interview questions are answered without code"


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists() and (site / "api" / "index.html").exists()
    figures = {p.name for p in (site / "figures").glob("*.png")}
    assert {"attention-masks.png", "tokenization-zh.png", "pipeline-schedules.png", "recall-at-k.png"} <= figures
    assert "WARNING" not in proc.stderr


def _figures_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_figures", DOCS / "hooks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("micro", [1, 4, 8])
def test_pipeline_figure_schedules(micro: int) -> None:
    """The schedules drawn for GPipe and 1F1B have the closed-form bubble and 1F1B's activation bound."""
    from tinyllm.calc.memory import gpipe_bubble

    fig = _figures_module()
    stages = 4
    for kind in ("gpipe", "1f1b"):
        ops = fig.pipeline_schedule(stages, micro, kind)
        assert len(ops) == 2 * stages * micro
        end = max(t + (1 if op == "F" else 2) for _, op, _, t in ops)
        assert end == 3 * (micro + stages - 1)                  # every stage: M·(F + B) plus K − 1 slots idle
        busy = stages * micro * 3
        assert (stages * end - busy) / (stages * end) == pytest.approx(gpipe_bubble(stages, micro))
        peak = fig.peak_activations(ops, 0)
        assert peak == (micro if kind == "gpipe" else min(stages, micro))
    with pytest.raises(ValueError, match="kind must be"):
        fig.pipeline_schedule(2, 2, "zb")


def test_figures_draw_from_the_engine() -> None:
    fig = _figures_module()
    tables, refs, _ = fig.block_tables()
    assert tables["A"][:3] == tables["B"][:3] and all(refs[b] == 2 for b in tables["A"][:3])  # prefix cache
    assert tables["C.0"][0] == tables["C.1"][0]                                               # forked prompt
    trace = fig.batching_trace()
    assert max(sum(step.values()) for step in trace) <= 16          # the token budget is never exceeded
    assert any(n > 1 for step in trace for n in step.values())      # prompts are fed in chunks


def test_index_chapter_table_links_existing_pages_only() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_chapters", DOCS / "hooks" / "chapters.py")
    chapters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chapters)
    table = chapters.chapter_table({"03-04-data.md": "# Chapters 03–05 — data (数据)\n", "09-eval.md": "# 09 · Eval\n",
                                    "index.md": "# Home\n"})
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ")[1].strip(" |") for r in table.splitlines()[2:]}
    assert rows["03 训练数据集 · data"] == "[data (数据)](03-04-data.md)"
    assert rows["09 大语言模型评估 · evaluation"] == "[Eval](09-eval.md)"
    assert rows["04 分布式训练 · distributed training"] == "no page yet" and len(rows) == 11
    assert chapters.MARKER in (DOCS / "index.md").read_text(encoding="utf-8")
