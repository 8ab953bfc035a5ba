"""Chain-of-thought prompts, answer extraction and self-consistency voting with a scripted model, and
sampled chains through the engine are seeded (same seeds, same chains)."""

from __future__ import annotations

import pytest
from eval_helpers import save_tiny_lm

from tinyllm.eval import cot
from tinyllm.eval.lm import LM


class Chains(LM):
    """Replies by mode: direct → a wrong number; greedy CoT → a chain to the right answer; sampled chains
    (with a seed) → right for 3 seeds of 5, wrong otherwise."""

    def generate_until(self, requests, batch_size=1):
        out = []
        for ctx, kw in requests:
            if "step by step" not in ctx:
                out.append(" 41\nQuestion: more")
            elif kw.get("temperature", 0) == 0:
                out.append(" 6 * 7 = 42. The answer is 42.")
            else:
                out.append(" 6 * 7 = 42. The answer is 42." if kw["seed"] % 5 in (0, 2, 4) else " so 6 * 7 = 43.")
        return out


def test_modes_and_voting() -> None:
    docs = [{"question": "Calculate 6 * 7.", "answer": "42"}]
    lm = Chains()
    assert cot.evaluate_reasoning(lm, docs, "direct")["accuracy"] == 0.0
    assert cot.evaluate_reasoning(lm, docs, "cot")["accuracy"] == 1.0
    sc = cot.evaluate_reasoning(lm, docs, "sc", k=5)
    assert sc["accuracy"] == 1.0 and sc["votes"] == [{"42": 3, "43": 2}]
    assert cot.evaluate_reasoning(lm, docs, "sc", k=2, seed=1)["predictions"] == ["43"]  # 1 vote each: first


def test_extraction_and_prompts() -> None:
    assert cot.chain_answer("3 + 4 = 7, the answer is: 1,007. Then 9") == "1007"
    assert cot.chain_answer("so 12 then 13") == "13" and cot.first_number(" -5 or 6") == "-5"
    assert cot.majority_vote(["", "1", "2", "2", "1"]) == ("1", {"1": 2, "2": 2})
    assert cot.majority_vote(["", ""]) == ("", {})
    few = cot.prompt("Calculate 1 + 1.", "cot", fewshot=True)
    assert few.count("Question:") == 4 and few.endswith("Let's think step by step.")
    with pytest.raises(ValueError, match="mode='tot'"):
        cot.prompt("q", "tot")


def test_sampled_chains_are_seeded(tmp_path) -> None:
    from tinyllm.eval.lm import TinyLM
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    path = save_tiny_lm(tmp_path / "tiny", max_position_embeddings=128)
    lm = TinyLM(load_model(path), load_tokenizer(path))
    reqs = [("Question: the model", {"max_gen_toks": 8, "temperature": 1.0, "seed": s}) for s in (1, 2, 1)]
    a = lm.generate_until(reqs)
    assert a[0] == a[2] and a == lm.generate_until(reqs) and a[0] != a[1]
