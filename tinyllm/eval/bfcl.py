"""Berkeley Function Calling Leaderboard, AST categories (notes ch.08 function calling, ch.09 evaluation;
Patil et al., BFCL, https://gorilla.cs.berkeley.edu/leaderboard.html).

A BFCL entry gives a conversation, the functions the model may call (JSON schemas with BFCL's Python type
names: string, integer, float, boolean, array, tuple, dict, any) and, for the AST categories, the acceptable
arguments of each expected call: `{"func": {"param": [accepted values...]}}`, where "" in a list marks the
parameter optional. `check(category, functions, calls, answer)` gives the same verdict as bfcl-eval's
`ast_checker` (the tests compare them on every bundled answer and on thousands of perturbed ones):

- simple: exactly one call; multiple: one call, of the expected function among several offered;
  parallel / parallel_multiple: as many calls as expected, matched in any order (each expected call takes
  the first unmatched call that passes);
- a call passes when its name is the expected one, every required parameter is present, every given
  parameter is known to the schema and to the answer, each value has the schema's type (exactly: a bool is
  not an integer; an int is accepted for a float; a value of the answer's own type counts as a "variable"
  and is then compared as is), strings and string list items match after `normalise` (case, spaces and
  ",./-_*^" ignored, ' read as "), dicts key by key, and every answer parameter the call leaves out is
  optional;
- irrelevance: the model must not call anything (`check_irrelevance`).

`calls_from_tool_calls` turns OpenAI `tool_calls` into BFCL's `[{name: {args}}]`; `openai_tools` turns BFCL
functions into OpenAI tools (dict→object, float→number, tuple→array, any→string, as BFCL's own OpenAI
handler does, names' dots kept). `load_category` reads the questions and answers bundled in `bfcl-eval`
(the package's data files are read directly: importing the package needs its heavy dependencies).

Not covered: the executable, live, multi-turn, memory and web-search categories; Java/JavaScript typing.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CATEGORIES = {"simple": "simple_python", "multiple": "multiple", "parallel": "parallel",
              "parallel_multiple": "parallel_multiple", "irrelevance": "irrelevance"}
PY_TYPES: dict[str, type] = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
                             "tuple": list, "dict": dict, "any": str}
_OPENAI_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}
_STRIP = re.compile(r"[ ,./\-_*^]")


@dataclass
class Verdict:
    valid: bool
    error_type: str = ""
    errors: list[str] = field(default_factory=list)


def _fail(kind: str, msg: str) -> Verdict:
    return Verdict(False, kind, [msg])


def normalise(text: str) -> str:
    return _STRIP.sub("", text).lower().replace("'", '"')


def _answer_type(options: list) -> type | None:
    return next((type(o) for o in options if o != ""), None)


def _norm_items(items: Any) -> list:
    # an accepted list value, or "" for an optional one (iterates to []): string items normalised
    return [normalise(x) if isinstance(x, str) else x for x in items]


def _check_type(value: Any, options: list, want: type, inner: type | None) -> tuple[bool, bool]:
    """(type ok, the value is a 'variable' -- compared as is, without normalisation)."""
    declared = _answer_type(options)
    variable = declared is not None and declared is not want
    if type(value) is want:
        if inner is None:
            return True, variable
        for option in options:  # every item must have the inner type (or the option's own item type)
            if not isinstance(option, list):
                return True, variable
            item_type = _answer_type(option)
            if all(type(v) is inner or type(v) is item_type for v in value):
                return True, variable
        return False, variable
    if declared is not None and type(value) is declared:
        return True, True
    return False, variable


def _dict_ok(value: dict, options: list) -> bool:
    for option in options:
        if option == "":
            continue
        if all(k in option and (normalise(v) if isinstance(v, str) else v) in _norm_items(option[k])
               for k, v in value.items()) and all(k in value or "" in accepted for k, accepted in option.items()):
            return True
    return False


def check_call(function: dict[str, Any], call: dict[str, Any], answer: dict[str, Any],
               underscore_to_dot: bool = False) -> Verdict:
    """One model call `{name: {args}}` against one expected call `{name: {param: [accepted]}}`."""
    accepted = next(iter(answer.values()))
    name = function["name"]
    if underscore_to_dot and "." in name:
        name = name.replace(".", "_")
    if name not in call:
        return _fail("simple_function_checker:wrong_func_name", f"function {name!r} not called")
    args = call[name]
    schema = function["parameters"]["properties"]
    missing = [p for p in function["parameters"]["required"] if p not in args]
    if missing:
        return _fail("simple_function_checker:missing_required", f"missing required parameter {missing[0]!r}")
    for param, value in args.items():
        if param not in schema or param not in accepted:
            return _fail("simple_function_checker:unexpected_param", f"unexpected parameter {param!r}")
        kind = schema[param]["type"]
        want = PY_TYPES[kind]
        inner = PY_TYPES[schema[param]["items"]["type"]] if kind in ("array", "tuple") else None
        if kind == "float" and type(value) is int:
            value = float(value)
        options = accepted[param]
        type_ok, variable = _check_type(value, options, want, inner)
        if not type_ok:
            kind_err = "type_error:nested" if inner is not None and type(value) is want else "type_error:simple"
            return _fail(kind_err, f"{param!r}: {value!r} is not of type {kind}")
        if variable:
            ok = value in options
        elif want is dict:
            ok = _dict_ok(value, options)
        elif want is list and inner is dict:
            ok = any(len(value) == len(opt) and all(_dict_ok(v, [o]) for v, o in zip(value, opt, strict=False))
                     for opt in options)
        elif want is str:
            ok = normalise(value) in [normalise(o) for o in options if isinstance(o, str)]
        elif want is list:
            ok = _norm_items(value) in [_norm_items(o) for o in options]
        else:
            ok = value in options
        if not ok:
            return _fail("value_error", f"{param!r}: {value!r} is not one of {options!r}")
    for param, options in accepted.items():
        if param not in args and "" not in options:
            return _fail("simple_function_checker:missing_optional", f"parameter {param!r} left out")
    return Verdict(True)


def _describe(functions: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for f in functions:
        if f["name"] == name:
            return f
    raise ValueError(f"expected function {name!r} is not among the offered functions")


def check(category: str, functions: list[dict[str, Any]], calls: list[dict[str, Any]],
          answer: list[dict[str, Any]], underscore_to_dot: bool = False) -> Verdict:
    """BFCL's AST verdict for `calls` ([{name: {args}}]) in `category` (simple / multiple / parallel /
    parallel_multiple, or their live_ variants)."""
    simple = "parallel" not in category and "multiple" not in category
    if (len(calls) != 1) if simple else (len(calls) != len(answer)):
        return _fail("wrong_count", f"{len(calls)} calls, expected {1 if simple else len(answer)}")
    if "parallel" in category:
        used: set[int] = set()
        for expected in answer:
            function = _describe(functions, next(iter(expected)))
            hit = next((i for i, c in enumerate(calls) if i not in used
                        and check_call(function, c, expected, underscore_to_dot).valid), None)
            if hit is None:
                return _fail("parallel_function_checker_no_order:cannot_find_match",
                             f"no call matches {next(iter(expected))!r}")
            used.add(hit)
        return Verdict(True)
    function = functions[0] if "multiple" not in category else _describe(functions, next(iter(answer[0])))
    return check_call(function, calls[0], answer[0], underscore_to_dot)


def check_irrelevance(calls: Any) -> bool:
    """True when the output holds no function call (BFCL counts an empty or malformed decode as none)."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) and len(c) == 1 for c in calls):
        return True
    return len(calls) == 0 or (len(calls) == 1 and len(calls[0]) == 0)


def calls_from_tool_calls(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool_calls → [{name: {args}}]; arguments that are not a JSON object become {} (no match)."""
    out = []
    for c in tool_calls:
        fn = c.get("function") or {}
        args = fn.get("arguments")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            args = None
        out.append({fn.get("name", ""): args if isinstance(args, dict) else {}})
    return out


def _schema(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _schema(v) for k, v in node.items()}
        if isinstance(out.get("type"), str):
            out["type"] = _OPENAI_TYPES.get(out["type"], out["type"])
        return out
    if isinstance(node, list):
        return [_schema(v) for v in node]
    return node


def openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                              "parameters": _schema(f["parameters"])}} for f in functions]


def data_dir() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("bfcl-eval is not installed: pip install --no-deps bfcl-eval")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_category(category: str, version: str = "v4") -> list[dict[str, Any]]:
    """Entries of a category, each with its `ground_truth` attached (none for irrelevance)."""
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is not one of {sorted(CATEGORIES)}")
    stem = f"BFCL_{version}_{CATEGORIES[category]}.json"
    entries = _jsonl(data_dir() / stem)
    answers_path = data_dir() / "possible_answer" / stem
    if answers_path.exists():
        answers = {a["id"]: a["ground_truth"] for a in _jsonl(answers_path)}
        for e in entries:
            e["ground_truth"] = answers[e["id"]]
    return entries
