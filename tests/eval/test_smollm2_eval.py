"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF) scored by our harness (tinyllm model, prefix sharing)
and by lm-evaluation-harness's HF backend (transformers' GGUF loader): per-request MMLU log-likelihoods within
1e-4, the same predictions, and rolling log-likelihood of English and Chinese text within 1e-4 per token.
Loading the model twice takes minutes on 2 shared cores, hence `slow`."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import smollm2_path

from tinyllm.eval.harness import evaluate_task
from tinyllm.eval.lm import TinyLM
from tinyllm.eval.tasks import mc_task, mmlu_docs
from tinyllm.model.hf import load_model
from tinyllm.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")


def test_smollm2_mmlu_and_rolling_equal_lm_eval() -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = HFLM(pretrained=hf.eval(), tokenizer=transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name),
               batch_size=8)
    ours = TinyLM(load_model(path), load_tokenizer(path))
    task = mc_task("mmlu_sub", mmlu_docs()[::1400][:10])
    mine = evaluate_task(ours, task, batch_size=8)
    reqs = [(ctx, " " + c) for doc, ctx in zip(task.docs, task.contexts(0)) for c in task.doc_to_choice(doc)]
    theirs = [r[0] for r in ref.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)],
                                              disable_tqdm=True)]
    assert [x for s in mine["samples"] for x in s["loglikelihoods"]] == pytest.approx(theirs, abs=1e-4)
    texts = ["The capital of France is Paris. It is known for the Eiffel Tower. " * 3, "中国的首都是北京。"]
    ref_roll = ref.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                         disable_tqdm=True)
    n_tokens = [len(ours.encode(t)) for t in texts]
    for a, b, n in zip(ours.loglikelihood_rolling(texts), ref_roll, n_tokens):
        assert a == pytest.approx(b, abs=1e-4 * n)
