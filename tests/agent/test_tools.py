"""Tool registry: schemas equal LangChain's for the same function, validation agrees with a JSON Schema
validator, and a bad call is an error observation, never an exception."""

from __future__ import annotations

import json
import random
from typing import Literal

import pytest

from tinyllm.agent.tools import (
    Tool,
    ToolError,
    ToolRegistry,
    builtin_tools,
    parse_arguments,
    python_tool,
    read_file_tool,
    search_tool,
    tool,
    validate,
)


def get_weather(city: str, days: int = 1, unit: Literal["c", "f"] = "c", tags: list[str] | None = None,
                scale: float = 1.0, verbose: bool = False, extra: dict | None = None) -> str:
    """Current weather of a city.

    Longer text that is not part of the description.

    Args:
        city: the city's name, e.g. 北京
        days: how many days
            to forecast
        unit: c or f
        tags: labels
        scale: a factor
        verbose: say more
        extra: anything else
    """
    return f"{city}: sunny x{days} {unit} {tags} {scale} {verbose}"


def sphinx_style(a: int, b: str = "x") -> int:
    """Add things.

    :param a: the first
    :param b: the second
    """
    return a


@pytest.mark.parametrize("fn", [get_weather])
def test_schema_equals_langchain(fn):
    fc = pytest.importorskip("langchain_core.utils.function_calling")
    ours = tool(fn).schema()
    theirs = fc.convert_to_openai_tool(fn)
    assert ours["function"]["parameters"].pop("additionalProperties") is False
    assert ours == theirs


def test_docstring_continuation_and_description():
    s = tool(get_weather).schema()["function"]
    assert s["description"] == "Current weather of a city. Longer text that is not part of the description."
    assert s["parameters"]["properties"]["days"]["description"] == "how many days to forecast"
    assert s["parameters"]["required"] == ["city"]


def test_sphinx_docstring():
    # LangChain leaves `:param` lines in the description; we read them as parameter descriptions
    s = tool(sphinx_style).schema()["function"]
    assert s["description"] == "Add things."
    assert s["parameters"]["properties"]["b"] == {"type": "string", "description": "the second", "default": "x"}


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none", "list", "dict"] if depth < 2 else ["int", "str", "bool", "none"]
    k = rng.choice(kinds)
    return {"int": lambda: rng.randint(-5, 5), "float": lambda: rng.random(), "str": lambda: rng.choice("cfxy"),
            "bool": lambda: rng.random() < 0.5, "none": lambda: None,
            "list": lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 2))],
            "dict": lambda: {rng.choice(["a", "b"]): _random_value(rng, depth + 1)}}[k]()


def test_validation_agrees_with_jsonschema_validator():
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    schema = tool(get_weather).parameters
    ref = jsonschema_rs.validator_for(schema)
    rng = random.Random(0)
    names = [*list(schema["properties"]), "bogus"]
    seen = {True: 0, False: 0}
    for _ in range(3000):
        args = {n: _random_value(rng) for n in rng.sample(names, rng.randint(0, 4))}
        if rng.random() < 0.5:
            args["city"] = rng.choice(["x", 3, None])
        ours = not validate(args, schema)
        assert ours == ref.is_valid(args), args
        seen[ours] += 1
    assert seen[True] > 50 and seen[False] > 50


def test_bad_calls_are_observations():
    reg = ToolRegistry([get_weather])
    ok = reg.call("get_weather", '{"city": "北京", "days": 2}')
    assert ok.ok and ok.content.startswith("北京: sunny x2")
    cases = {"nope": ("{}", "unknown tool 'nope'"),
             "get_weather": ('{"city": 1}', "city must be string"),
             }
    for name, (args, msg) in cases.items():
        r = reg.call(name, args)
        assert not r.ok and msg in r.content
    assert "missing required argument 'city'" in reg.call("get_weather", {}).content
    assert "unknown argument 'town'" in reg.call("get_weather", {"city": "a", "town": "b"}).content
    assert "not valid JSON" in reg.call("get_weather", "{city: a").content
    assert "must be a JSON object" in reg.call("get_weather", "[1]").content
    assert "is not one of" in reg.call("get_weather", {"city": "a", "unit": "k"}).content
    assert reg.call("get_weather", {"city": "a", "scale": 2}).ok  # an int is a number
    assert not reg.call("get_weather", {"city": "a", "days": True}).ok  # a bool is not an integer

    def boom(x: int) -> int:
        """Fails."""
        raise RuntimeError("kaputt")

    r = tool(boom)({"x": 1})
    assert not r.ok and r.content == "error: RuntimeError: kaputt"


def test_definition_errors():
    def no_hint(x):
        """Doc."""

    def no_doc(x: int):
        pass

    def star(*a: int):
        """Doc."""

    def weird(x: complex):
        """Doc."""

    for fn, msg in [(no_hint, "needs a type hint"), (no_doc, "needs a description"), (star, r"\*args"),
                    (weird, "no JSON Schema mapping")]:
        with pytest.raises(ToolError, match=msg):
            tool(fn)
    with pytest.raises(ToolError, match="must match"):
        tool(get_weather, name="bad name!")
    reg = ToolRegistry([get_weather])
    with pytest.raises(ToolError, match="already registered"):
        reg.register(get_weather)
    assert parse_arguments("") == {} and parse_arguments(None) == {}


def test_builtin_calculator_and_python():
    reg = builtin_tools(["calc", "python"])
    assert [s["function"]["name"] for s in reg.schemas()] == ["calculator", "python"]
    assert reg.call("calculator", {"expression": "123456789123456789 + 987654321987654321"}).content == \
        "1111111111111111110"
    r = reg.call("calculator", {"expression": "__import__('os').system('ls')"})
    assert not r.ok and "not allowed" in r.content
    assert reg.call("python", {"code": "print(6 * 7)"}).content == "42"
    r = python_tool(timeout_s=1)({"code": "while True: pass"})
    assert not r.ok and ("[timeout]" in r.content or "[cpu_limit]" in r.content)
    with pytest.raises(ValueError, match="unknown built-in tool 'web'"):
        builtin_tools(["web"])


def test_read_file_only_under_allowed(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("no")
    (tmp_path / "ok" / "link").symlink_to(tmp_path / "secret.txt")
    t = read_file_tool([tmp_path / "ok"])
    assert t({"path": "a.txt"}).content == "hello"
    assert t({"path": str(tmp_path / "ok" / "a.txt")}).ok
    for bad in ["../secret.txt", str(tmp_path / "secret.txt"), "link", "/etc/passwd"]:
        r = t({"path": bad})
        assert not r.ok and "outside the allowed" in r.content, bad
    assert "not a file" in t({"path": "missing.txt"}).content


def test_search_tool_over_rag_store(tmp_path):
    from tinyllm.rag.store import RagStore

    with RagStore.open(tmp_path / "kb") as store:
        store.add([("a", "The Great Wall is in northern China."), ("b", "Paris is the capital of France.")])
        r = search_tool(store, k=1)({"query": "capital of France"})
    assert r.ok and "Paris" in r.content and "Great Wall" not in r.content


def test_tool_object_roundtrip():
    t = Tool("f", "d", {"type": "object", "properties": {}}, lambda: {"x": [1, "二"]})
    assert json.loads(t().content) == {"x": [1, "二"]}
    with pytest.raises(ToolError, match="type object"):
        Tool("f", "d", {"type": "array"}, lambda: 1)
