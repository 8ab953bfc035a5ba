"""A safe calculator for agents (notes ch.08 tool use: "let the model call a calculator instead of doing
long arithmetic in its head" -- the long-addition example).

`calculate("123456789123456789 + 987654321987654321")` parses the expression with `ast` and evaluates only
number literals, `+ - * / // % **`, unary signs and parentheses: no names, no calls, no attributes, so nothing
but arithmetic can run. Integers are Python's arbitrary-precision ints and `/` between exact numbers is an
exact fraction (`fractions.Fraction`), so `10**30 / 4 * 4` stays exact; a float anywhere makes the result a
float. `format_number` writes an exact non-integer as a decimal when it terminates within 30 digits, else
as a 17-significant-digit float. Guards: expression length, operator count, the size of a power's result
(estimated from bit lengths before it is computed) and of any intermediate integer.

`eval_naive` is the twin used by the tests: Python's own `eval` of the same text with no builtins and `/`
rewritten to exact division -- fine for trusted test input, never for model output.
"""

from __future__ import annotations

import ast
import math
import operator
from decimal import Decimal, localcontext
from fractions import Fraction

Number = int | Fraction | float
MAX_CHARS = 2000
MAX_NODES = 500
MAX_BITS = 100_000  # ~30,000 decimal digits


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


def _check(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise CalculatorError(f"result has more than {MAX_BITS} bits")
    if isinstance(value, Fraction) and max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError(f"result has more than {MAX_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def _simplify(value: Number) -> Number:
    return value.numerator if isinstance(value, Fraction) and value.denominator == 1 else value


def _pow(a: Number, b: Number) -> Number:
    if isinstance(b, Fraction):
        b = float(b)
    if isinstance(b, int) and not isinstance(a, float):
        size = abs(b) * max(1, (a.numerator if isinstance(a, Fraction) else a).bit_length(),
                            a.denominator.bit_length() if isinstance(a, Fraction) else 1)
        if size > MAX_BITS and abs(a) != 1 and a != 0:
            raise CalculatorError(f"power too large: about {size} bits")
        if b < 0:
            if a == 0:
                raise CalculatorError("division by zero (0 to a negative power)")
            return Fraction(1) / Fraction(a) ** -b
        return a**b
    result = float(a) ** float(b)
    if isinstance(result, complex):
        raise CalculatorError("a negative number to a fractional power is not real")
    return result


def _div(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("division by zero")
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    return Fraction(a) / Fraction(b)


def _floordiv(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("division by zero")
    return a // b


def _mod(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("modulo by zero")
    return a % b


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: _div,
           ast.FloorDiv: _floordiv, ast.Mod: _mod, ast.Pow: _pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        try:
            return _check(_simplify(_BINOPS[type(node.op)](left, right)))
        except OverflowError:
            raise CalculatorError("result is too large for a float") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"name {node.id!r}"
    elif isinstance(node, ast.Call):
        what = "function call"
    raise CalculatorError(f"{what} is not allowed: only numbers, + - * / // % ** and parentheses")


def _normalise(expression: str) -> str:
    # what people and small models write: ×, ÷, ^ for power, full-width digits and operators; a comma stays an
    # error (thousands separator or tuple? ambiguous)
    table = str.maketrans({"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")", "＋": "+", "－": "-", "＊": "*",
                           "／": "/"})
    text = expression.translate(table).replace("^", "**")
    return "".join(chr(ord(c) - 0xFEE0) if "０" <= c <= "９" else c for c in text).strip()


def calculate(expression: str) -> Number:
    """The value of an arithmetic expression (int, Fraction or float); CalculatorError when refused."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    text = _normalise(expression)
    if not text:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not an arithmetic expression: {e.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    return _eval(tree)


def format_number(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Fraction):
        d = value.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        if d == 1:  # terminating decimal: exact
            with localcontext() as ctx:
                ctx.prec = max(50, len(str(value.numerator)) + 40)
                text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
            if len(text.split(".")[-1]) <= 30:
                return text
        value = float(value)
    return repr(value) if abs(value) >= 1e-4 or value == 0 else f"{value:.17g}"


def evaluate(expression: str) -> str:
    """The calculator tool's answer: the formatted value."""
    return format_number(calculate(expression))


def eval_naive(expression: str) -> str:
    """Test twin: Python's eval with exact division (trusted input only)."""
    tree = ast.parse(_normalise(expression), mode="eval")

    class Exact(ast.NodeTransformer):
        def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
            self.generic_visit(node)
            if isinstance(node.op, ast.Div):
                return ast.Call(ast.Name("_div", ast.Load()), [node.left, node.right], [])
            return node

    tree = ast.fix_missing_locations(Exact().visit(tree))
    value = eval(compile(tree, "<naive>", "eval"), {"__builtins__": {}, "_div": _div})
    return format_number(_simplify(value) if isinstance(value, Fraction) else value)
