"""Safe calculator: equal to Python's own arithmetic (exact division) on random expressions; refuses
everything that is not arithmetic; big integers stay exact."""

from __future__ import annotations

import random

import pytest

from tinyllm.agent.calculator import CalculatorError, calculate, eval_naive, evaluate


def _expr(rng: random.Random, depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.3:
        n = rng.choice([rng.randint(0, 9), rng.randint(0, 10**25), round(rng.uniform(0, 100), 3)])
        return str(n)
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    left, right = _expr(rng, depth + 1), _expr(rng, depth + 1)
    if op == "**":
        right = str(rng.randint(0, 4))
    sign = rng.choice(["", "-", ""])
    return f"{sign}({left} {op} {right})"


def test_equals_python_arithmetic_on_random_expressions():
    rng = random.Random(0)
    checked = 0
    for _ in range(2000):
        e = _expr(rng)
        try:
            want = eval_naive(e)
        except (ZeroDivisionError, OverflowError, CalculatorError):
            with pytest.raises(CalculatorError):
                evaluate(e)
            continue
        assert evaluate(e) == want, e
        checked += 1
    assert checked > 1500


def test_long_addition_from_the_notes_is_exact():
    a, b = "98765432109876543210987654321", "12345678901234567890123456789"
    assert evaluate(f"{a} + {b}") == str(int(a) + int(b))
    assert evaluate("10**40 / 10**20") == "100000000000000000000"
    assert evaluate("1/8") == "0.125" and evaluate("3 × 4 ÷ 2") == "6" and evaluate("2^10") == "1024"


@pytest.mark.parametrize("bad", ["__import__('os').system('true')", "x + 1", "abs(-1)", "(1).real", "[1, 2]",
                                 "1 if 1 else 2", "lambda: 1", "'a' * 3", "9**9**9", "1/0", "5 % 0", "",
                                 "1 +", "2**0.5**-1000000", "10.0**400", "(-8)**0.5", "1 < 2", "True + 1"])
def test_refuses(bad):
    with pytest.raises(CalculatorError):
        calculate(bad)


def test_limits():
    with pytest.raises(CalculatorError, match="longer than"):
        calculate("1+" * 2000 + "1")
    with pytest.raises(CalculatorError, match="bits"):
        calculate("(10**20000) * (10**20000)")
    with pytest.raises(CalculatorError, match="must be a string"):
        calculate(12)  # type: ignore[arg-type]
