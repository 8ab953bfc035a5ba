"""Chain-of-thought prompting and self-consistency (notes ch.10 应用: CoT, self-consistency; Wei et al. 2022,
Kojima et al. 2022 "Let's think step by step", Wang et al. 2023 "Self-Consistency").

Three ways to answer a question with a generation backend (`lm.LM.generate_until`):

- `direct`: "Question: …\nAnswer:" and the first number of a short greedy reply;
- `cot`: zero-shot CoT ("Answer: Let's think step by step.") or few-shot CoT (worked examples first), one
  greedy chain, the answer is the last number of the chain (or the number after "The answer is");
- `sc`: k chains sampled at temperature T (seeds seed … seed+k−1), each chain's answer extracted, the
  majority answer wins (ties: the answer reached first). Chains with no number do not vote.

`evaluate_reasoning` scores a task's documents ({question, answer}) by exact match of the numbers, and
returns the per-document answers and votes.

Not covered: verifier-weighted voting, tree/graph of thoughts, program-aided reasoning.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tinyllm.eval.tasks import last_number

FEWSHOT_COT = [
    ("Calculate 3 + 4 * 2.", "Multiplication first: 4 * 2 = 8. Then 3 + 8 = 11. The answer is 11."),
    ("Calculate 20 - 6 / 3.", "Division first: 6 / 3 = 2. Then 20 - 2 = 18. The answer is 18."),
    ("Calculate (5 - 9) * 3.", "Inside the brackets: 5 - 9 = -4. Then -4 * 3 = -12. The answer is -12."),
]
_STATED = re.compile(r"answer is\s*:?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
MODES = ("direct", "cot", "sc")


def chain_answer(text: str) -> str:
    """The number after the last "the answer is", else the last number in the chain."""
    stated = _STATED.findall(text)
    return stated[-1].replace(",", "") if stated else last_number(text)


def first_number(text: str) -> str:
    m = re.search(r"-?\d[\d,]*(?:\.\d+)?", text)
    return m.group(0).replace(",", "").rstrip(".") if m else ""


def majority_vote(answers: Sequence[str]) -> tuple[str, dict[str, int]]:
    """(the most frequent non-empty answer, first reached on a tie; the vote counts)."""
    votes = Counter(a for a in answers if a)
    if not votes:
        return "", {}
    top = max(votes.values())
    winner = next(a for a in answers if a and votes[a] == top)
    return winner, dict(votes)


def prompt(question: str, mode: str, fewshot: bool = False) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    if mode == "direct":
        return f"Question: {question}\nAnswer:"
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEWSHOT_COT) if fewshot else ""
    return f"{shots}Question: {question}\nAnswer: Let's think step by step."


def same_number(pred: str, gold: str) -> bool:
    """Numbers compared as numbers ("3.0" = "3"), anything else as stripped text."""
    try:
        return abs(float(pred) - float(gold)) < 1e-6
    except ValueError:
        return pred.strip() == gold.strip()


def evaluate_reasoning(lm: Any, docs: Sequence[dict[str, Any]], mode: str = "direct", k: int = 5,
                       temperature: float = 0.7, fewshot: bool = False, max_gen_toks: int = 128, seed: int = 0,
                       batch_size: int = 16) -> dict[str, Any]:
    """Accuracy of `mode` on documents {question, answer}; "sc" samples k chains per question."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if not docs:
        raise ValueError("no documents")
    until = ["\n\nQuestion:", "\nQuestion:"]
    if mode == "direct":
        reqs = [(prompt(d["question"], mode), {"until": ["\n"], "max_gen_toks": 16}) for d in docs]
        preds = [first_number(t) for t in lm.generate_until(reqs, batch_size)]
        votes: list[dict[str, int]] = [{p: 1} if p else {} for p in preds]
    elif mode == "cot":
        reqs = [(prompt(d["question"], mode, fewshot), {"until": until, "max_gen_toks": max_gen_toks}) for d in docs]
        preds = [chain_answer(t) for t in lm.generate_until(reqs, batch_size)]
        votes = [{p: 1} if p else {} for p in preds]
    else:
        reqs = [(prompt(d["question"], "sc", fewshot), {"until": until, "max_gen_toks": max_gen_toks,
                                                         "temperature": temperature, "seed": seed + j})
                for d in docs for j in range(k)]
        chains = lm.generate_until(reqs, batch_size)
        preds, votes = [], []
        for i in range(len(docs)):
            winner, v = majority_vote([chain_answer(t) for t in chains[i * k: (i + 1) * k]])
            preds.append(winner)
            votes.append(v)
    correct = [same_number(p, str(d["answer"])) for p, d in zip(preds, docs)]
    return {"accuracy": sum(correct) / len(docs), "n": len(docs), "mode": mode, "k": k if mode == "sc" else 1,
            "predictions": preds, "votes": votes, "correct": correct}
