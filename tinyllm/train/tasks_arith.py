"""Verifiable-reward tasks for RL on language models (notes ch.07: reward design; GRPO's rule-based rewards in
DeepSeekMath / DeepSeek-R1): arithmetic problems from a deterministic generator and an answer checker.

A reward is *verifiable* when a program, not a learned model, decides it: the completion's first integer equals
the true answer → 1.0, otherwise 0.0. No reward model to hack, no label noise; the RL signal is exactly task
success.

- `arith_problems(n, seed, ...)`: `a op b =` prompts with their answers, deterministic in `seed`;
  `single_digit_additions()` enumerates all 100 sums a+b (0 ≤ a, b ≤ 9) — the tiny-scale task of the tests;
- `reasoning_gym_problems(name, n, seed)`: the same shape from the `reasoning-gym` generators
  (e.g. `basic_arithmetic`) when that package is installed (optional import), scored by its own checker;
- `arith_reward(problem, completion)`: the checker;
- `CharTokenizer`: a character vocabulary (digits, operators, "=", space, EOS, pad) so a model of a few
  thousand parameters can learn the task in seconds.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                             "*": lambda a, b: a * b}
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def arith_problems(n: int, seed: int = 0, max_operand: int = 9, ops: str = "+") -> list[Problem]:
    """n problems `a{op}b=` with 0 ≤ a, b ≤ max_operand, drawn with random.Random(seed)."""
    if n < 0 or max_operand < 0:
        raise ValueError(f"n={n} and max_operand={max_operand} must be >= 0")
    bad = [o for o in ops if o not in OPS]
    if not ops or bad:
        raise ValueError(f"ops={ops!r}: each must be one of {list(OPS)}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        out.append(Problem(f"{a}{op}{b}=", str(OPS[op](a, b))))
    return out


def single_digit_additions() -> list[Problem]:
    """All 100 problems a+b= for a, b in 0…9, in order."""
    return [Problem(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]


def split_problems(problems: Sequence[Problem], n_heldout: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) after a seeded shuffle."""
    order = list(problems)
    random.Random(seed).shuffle(order)
    return order[n_heldout:], order[:n_heldout]


def first_integer(text: str) -> str | None:
    m = _INT.search(text)
    return m.group(0) if m else None


def arith_reward(problem: Problem, completion: str) -> float:
    """1.0 when the completion's first integer equals the answer (a reasoning-gym problem uses its own
    scorer), else 0.0."""
    scorer = problem.meta.get("score")
    if scorer is not None:
        return float(scorer(completion.strip()))
    got = first_integer(completion)
    return 1.0 if got is not None and int(got) == int(problem.answer) else 0.0


def reasoning_gym_problems(name: str = "basic_arithmetic", n: int = 100, seed: int = 0,
                           **kwargs: Any) -> list[Problem]:
    """Problems from a reasoning-gym generator (ImportError with a hint when the package is missing)."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("reasoning_gym_problems needs the reasoning-gym package (pip install reasoning-gym)") from None
    ds = reasoning_gym.create_dataset(name, size=n, seed=seed, **kwargs)
    out = []
    for entry in ds:
        out.append(Problem(entry["question"], str(entry["answer"]),
                           {"score": (lambda ans, e=entry: ds.score_answer(ans, e)), "source": name}))
    return out


class CharTokenizer:
    """One id per character of a fixed alphabet, plus <eos> and <pad> (ids len(alphabet), len(alphabet)+1)."""

    def __init__(self, alphabet: str = "0123456789+-*= ") -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet={alphabet!r} repeats a character")
        self.alphabet = alphabet
        self.stoi = {c: i for i, c in enumerate(alphabet)}
        self.eos_token_id = len(alphabet)
        self.pad_token_id = len(alphabet) + 1
        self.vocab_size = len(alphabet) + 2

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the alphabet {self.alphabet!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))
