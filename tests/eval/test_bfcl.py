"""Our BFCL AST checker gives bfcl-eval's verdict on every bundled answer and on perturbed ones.

bfcl-eval's checker module imports `bfcl_eval.constants.model_config`, which pulls in every model handler and
their SDKs (anthropic, google, ...). The test loads the checker with that one module replaced by a stub whose
mapping answers `underscore_to_dot=False` for any model name; everything else is bfcl-eval's own code."""

from __future__ import annotations

import copy
import random
import sys
import types

import pytest

pytest.importorskip("bfcl_eval.eval_checker")

from tinyllm.eval.bfcl import (
    CATEGORIES,
    calls_from_tool_calls,
    check,
    check_irrelevance,
    load_category,
    normalise,
    openai_tools,
)


@pytest.fixture(scope="module")
def theirs():
    stub = types.ModuleType("bfcl_eval.constants.model_config")

    class Config:
        underscore_to_dot = False

    class Mapping(dict):
        def __missing__(self, key):
            return Config()

    stub.MODEL_CONFIG_MAPPING = Mapping()
    saved = sys.modules.get("bfcl_eval.constants.model_config")
    sys.modules["bfcl_eval.constants.model_config"] = stub
    try:
        from bfcl_eval.constants.enums import Language
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        from bfcl_eval.utils import is_empty_output
    finally:
        if saved is not None:
            sys.modules["bfcl_eval.constants.model_config"] = saved

    def verdict(category, functions, calls, answer):
        return ast_checker(functions, calls, answer, Language.PYTHON, category, "stub")["valid"]

    return verdict, is_empty_output


def _pick(value):
    # inside a dict answer each key again lists its accepted values
    if isinstance(value, dict):
        return {k: _first(v) for k, v in value.items() if isinstance(v, list) and any(o != "" for o in v)}
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return [_pick(x) for x in value]
    return value


def _first(options):
    return _pick(next(o for o in options if o != ""))


def gold_calls(answer: list[dict]) -> list[dict]:
    """The ground truth's first accepted value for every non-optional-only parameter."""
    calls = []
    for expected in answer:
        name, params = next(iter(expected.items()))
        calls.append({name: {p: copy.deepcopy(_first(v)) for p, v in params.items() if any(o != "" for o in v)}})
    return calls


def _mutate_value(v, rng):
    if isinstance(v, bool):
        return rng.choice([not v, int(v), str(v)])
    if isinstance(v, int):
        return rng.choice([v + 1, float(v), str(v), True, -v])
    if isinstance(v, float):
        return rng.choice([v + 0.5, int(v), str(v), round(v)])
    if isinstance(v, str):
        return rng.choice([v + "x", v.upper(), f" {v}. ", v.replace(" ", "_"), "", 5, v[::-1], [v]])
    if isinstance(v, list):
        if v and rng.random() < 0.5:
            return [_mutate_value(v[0], rng), *v[1:]]
        return rng.choice([v[::-1], [*v, v[0]] if v else [1], v[1:], str(v), {}])
    if isinstance(v, dict):
        if v:
            k = rng.choice(list(v))
            return rng.choice([{**v, k: _mutate_value(v[k], rng)}, {kk: vv for kk, vv in v.items() if kk != k},
                               {**v, "extra_key": 1}, list(v.values())])
        return {"k": 1}
    return v


def perturb(calls: list[dict], functions: list[dict], rng: random.Random) -> list[dict]:
    calls = copy.deepcopy(calls)
    if not calls:
        return calls
    i = rng.randrange(len(calls))
    name, args = next(iter(calls[i].items()))
    op = rng.choice(["value", "value", "value", "drop", "extra", "rename", "order", "dup", "remove", "optional"])
    if op == "value" and args:
        k = rng.choice(list(args))
        args[k] = _mutate_value(args[k], rng)
    elif op == "drop" and args:
        del args[rng.choice(list(args))]
    elif op == "extra":
        args[rng.choice(["unknown", *[p for f in functions for p in f["parameters"]["properties"]]])] = 1
    elif op == "rename":
        calls[i] = {rng.choice([f["name"] for f in functions] + [name + "_x", name.upper()]): args}
    elif op == "order":
        rng.shuffle(calls)
    elif op == "dup":
        calls.append(copy.deepcopy(calls[i]))
    elif op == "remove":
        calls.pop(i)
    elif op == "optional":
        fn = next((f for f in functions if f["name"] == name), None)
        if fn:
            for p, spec in fn["parameters"]["properties"].items():
                if p not in args:
                    args[p] = {"integer": 0, "float": 0.0, "boolean": False, "string": "default"}.get(
                        spec.get("type"), "")
                    break
    return calls


@pytest.mark.parametrize("category", ["simple", "multiple", "parallel", "parallel_multiple"])
def test_same_verdict_as_bfcl_eval(theirs, category):
    verdict, _ = theirs
    rng = random.Random(hash(category) % 1000)
    entries = load_category(category)
    counts = {True: 0, False: 0}
    for e in entries:
        functions, answer = e["function"], e["ground_truth"]
        gold = gold_calls(answer)
        assert check(category, functions, gold, answer).valid == verdict(category, functions, gold, answer), e["id"]
        for _ in range(12):
            calls = perturb(gold, functions, rng)
            ours = check(category, functions, calls, answer).valid
            assert ours == verdict(category, functions, calls, answer), (e["id"], calls)
            counts[ours] += 1
    # the perturbations reach both verdicts often
    assert counts[True] > 0.05 * sum(counts.values()) and counts[False] > 0.3 * sum(counts.values())


def test_gold_answers_pass():
    # a handful of bundled answers name a parameter their function's schema lacks (parallel_multiple_12:
    # "permeability"): such a call can never pass, in bfcl-eval either (the parity test checks every one)
    for category in ("simple", "multiple", "parallel", "parallel_multiple"):
        entries = load_category(category)
        bad = [e["id"] for e in entries if not check(category, e["function"], gold_calls(e["ground_truth"]),
                                                     e["ground_truth"]).valid]
        assert len(bad) <= 0.02 * len(entries), bad


def test_irrelevance_same_as_bfcl_eval(theirs):
    _, is_empty_output = theirs
    outputs = [[], [{}], [{"f": {}}], [{"f": {"a": 1}}, {"g": {}}], "text", [1], [{"f": {}, "g": {}}], None,
               [{"f": {"a": 1}}], [[]]]
    for out in outputs:
        assert check_irrelevance(out) == is_empty_output(out), out
    assert len(load_category("irrelevance")) == 240 and "ground_truth" not in load_category("irrelevance")[0]


def test_helpers():
    assert normalise("April 1, 2024") == normalise("april 1 2024") == "april12024"
    calls = calls_from_tool_calls([{"function": {"name": "f", "arguments": '{"a": 1}'}},
                                   {"function": {"name": "g", "arguments": "not json"}}])
    assert calls == [{"f": {"a": 1}}, {"g": {}}]
    tools = openai_tools(load_category("simple")[0]["function"])
    assert tools[0]["function"]["parameters"]["type"] == "object"
    assert set(CATEGORIES) == {"simple", "multiple", "parallel", "parallel_multiple", "irrelevance"}
    with pytest.raises(ValueError, match="category 'exec'"):
        load_category("exec")
