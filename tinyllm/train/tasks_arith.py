"""Verifiable-reward tasks for RL on language models (notes ch.07: reward design; GRPO's rule-based rewards in
DeepSeekMath / DeepSeek-R1): arithmetic problems from a deterministic generator and an answer checker.

A reward is *verifiable* when a program, not a learned model, decides it: the completion's first integer equals
the true answer → 1.0, otherwise 0.0. No reward model to hack, no label noise; the RL signal is exactly task
success.

- `arith_problems(n, seed, ...)`: `a op b =` prompts with their answers, deterministic in `seed`;
  `single_digit_additions()` enumerates all 100 sums a+b (0 ≤ a, b ≤ 9); `add_zero_problems()` the 90
  sums n+0 (10 ≤ n ≤ 99), the tiny-scale RL task of the tests (see its docstring);
- `reasoning_gym_problems(name, n, seed)`: the same shape from the `reasoning-gym` generators
  (e.g. `basic_arithmetic`) when that package is installed (optional import), scored by its own checker;
- `arith_reward(problem, completion)`: the checker;
- `CharTokenizer`: a character vocabulary (digits, operators, "=", space, EOS, pad) so a model of a few
  ten thousand parameters can learn the task in seconds; `tiny_policy` builds one, `sft_warmup` gives it the
  supervised stage that precedes RL (with THE training loop).

Why not single-digit addition at tiny scale: a 2-layer model that has memorised some sums has no shared
mechanism that RL on other sums could improve, so held-out rewards do not move within seconds (measured);
copying (n+0) is one mechanism for all prompts.
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


def distinct_arith_problems(n: int, seed: int = 0, max_operand: int = 9, ops: str = "+") -> list[Problem]:
    """Up to n problems with distinct prompts (fewer when the space is smaller), deterministic in `seed`: a
    held-out split of these never repeats a training prompt."""
    space = (max_operand + 1) ** 2 * len(set(ops))
    seen = dict.fromkeys(arith_problems(max(n, 1) * 4 + 4 * space, seed, max_operand, ops))
    return list(seen)[:n]


def single_digit_additions() -> list[Problem]:
    """All 100 problems a+b= for a, b in 0…9, in order."""
    return [Problem(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]


def add_zero_problems(lo: int = 10, hi: int = 99) -> list[Problem]:
    """`n+0=` → n for lo ≤ n ≤ hi: adding zero is copying the digits, one mechanism for every prompt (attend
    back a fixed distance), so a tiny model that learns it on some numbers gets it on unseen ones — the
    tiny-scale task on which RL's gains on held-out prompts show within seconds."""
    return [Problem(f"{n}+0=", str(n)) for n in range(lo, hi + 1)]


def split_problems(problems: Sequence[Problem], n_heldout: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) after a seeded shuffle."""
    order = list(problems)
    random.Random(seed).shuffle(order)
    return order[n_heldout:], order[:n_heldout]


def first_integer(text: str) -> str | None:
    m = _INT.search(text)
    return m.group(0) if m else None


def arith_reward(problem: Problem, completion: str, exact: bool = False) -> float:
    """1.0 when the completion's first integer equals the answer (exact: when the whole completion, stripped,
    is the answer; a reasoning-gym problem uses its own scorer), else 0.0."""
    scorer = problem.meta.get("score")
    if scorer is not None:
        return float(scorer(completion.strip()))
    if exact:
        return 1.0 if completion.strip() == problem.answer else 0.0
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


def tiny_policy(tokenizer: CharTokenizer, hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0) -> Any:
    """A randomly initialised LLaMA-style CausalLM over the character vocabulary (a few 10k parameters)."""
    import torch

    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
                      intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return build_model(cfg).train()


def sft_warmup(model: Any, tokenizer: CharTokenizer, problems: Sequence[Problem], steps: int, lr: float = 3e-3,
               batch_size: int = 32, seed: int = 0, out_dir: str | None = None) -> Any:
    """Supervised warm-up on `prompt answer<eos>` (loss on the answer and EOS only) with THE training loop:
    the SFT stage that precedes RL."""
    import tempfile

    from tinyllm.data.sft import IGNORE_INDEX, SFTExample
    from tinyllm.train.loop import TrainConfig, train
    from tinyllm.train.sft import SFTTask

    examples = []
    for p in problems:
        prompt, answer = tokenizer.encode(p.prompt), [*tokenizer.encode(p.answer), tokenizer.eos_token_id]
        examples.append(SFTExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    # SFTExample labels are unshifted; pad_collate shifts them for the loop's convention
    task = SFTTask(examples, [], batch_size, tokenizer.pad_token_id, seed)
    with tempfile.TemporaryDirectory() as tmp:
        train(model, task, TrainConfig(out_dir=out_dir or tmp, max_steps=steps, batch_size=batch_size, lr=lr,
                                       min_lr=lr / 10, warmup_steps=0, eval_interval=0, eval_steps=0,
                                       save_interval=0, log_interval=max(1, steps), seed=seed, progress=False,
                                       device="cpu", weight_decay=0.0))
    return model
