"""Tools for function calling (notes ch.08 "tool use", ch.10 LangChain tools; the OpenAI `tools` format).

A typed Python function becomes a tool:

    @tool
    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> str:
        '''Current weather of a city.

        Args:
            city: the city's name, e.g. 北京
            unit: c for Celsius, f for Fahrenheit
        '''

`get_weather.schema()` is the OpenAI tool JSON (`{"type": "function", "function": {"name", "description",
"parameters": <JSON Schema>}}`), the same as LangChain's `convert_to_openai_tool` plus
`additionalProperties: false`: the docstring's prose before `Args:` is the description, its `Args:` (Google) or
`:param x:` (Sphinx) lines describe the parameters, the type hints give the types (str, int, float, bool,
list[T], dict, Literal[...] as enum, `T | None`), and parameters without a default are required.

`ToolRegistry.call(name, arguments)` is what a loop runs for each model tool call: it parses the arguments
(a JSON string or a dict), validates them against the schema (`validate`: types, enums, required, no unknown
names -- an int is accepted for a float, nothing else is coerced), calls the function and returns a
`ToolResult`. Nothing a model sends raises: an unknown tool, bad JSON, a wrong argument or an exception in the
tool all come back as `ToolResult(ok=False, content="error: ...")`, which the loop shows the model as the
observation, so it can correct itself.

Built-ins (`builtin_tools`): `calculator` (safe AST arithmetic, `calculator.py`), `python` (the sandbox,
`sandbox.py`), `search` (retrieval over a `tinyllm.rag` store) and `read_file` (only under the directories the
user allows). Not covered: nested object parameters from dataclasses/TypedDicts, async tools.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tinyllm.agent import calculator
from tinyllm.agent.sandbox import run_python

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


class ToolError(ValueError):
    """A tool definition that cannot become a schema (raised when the tool is defined, not when it is called)."""


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    content: str

    def __str__(self) -> str:
        return self.content


def _type_schema(hint: Any, where: str) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is dict or origin is dict:
        return {"type": "object", "additionalProperties": True}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in _JSON_TYPES:
            raise ToolError(f"{where}: Literal values must share one JSON type, got {args!r}")
        return {"type": _JSON_TYPES[next(iter(kinds))], "enum": list(args)}
    if origin in (list, Sequence, tuple) or origin is typing.get_origin(list[int]):
        item = args[0] if args else None
        return {"type": "array", **({"items": _type_schema(item, where)} if item is not None else {})}
    if origin in (typing.Union, types.UnionType):
        # `T | None` as anyOf [T, null], the way pydantic (and so LangChain) writes it
        return {"anyOf": [{"type": "null"} if a is type(None) else _type_schema(a, where) for a in args]}
    raise ToolError(f"{where}: type {hint!r} has no JSON Schema mapping (use str, int, float, bool, list, dict, "
                    "Literal or an optional of those)")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    doc = inspect.cleandoc(doc or "")
    # the description is all prose before the parameter section, as LangChain reads it
    head = re.split(r"^\s*(?:args:|arguments:|parameters:|:param\b|returns?:|raises:)", doc, maxsplit=1,
                    flags=re.I | re.M)[0]
    description = " ".join(head.split())
    params: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        m = re.match(r"^:param\s+(?:\w+\s+)?(\w+)\s*:\s*(.*)$", stripped)
        if m:
            params[m.group(1)] = m.group(2).strip()
            continue
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m and line.startswith((" ", "\t")):
                params[m.group(1)] = m.group(2).strip()
            elif stripped and not line.startswith((" ", "\t")):
                in_args = False
            elif stripped and params:  # a continuation line
                last = next(reversed(params))
                params[last] = f"{params[last]} {stripped}"
    return description, params


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ToolError(f"tool name {self.name!r} must match {_NAME_RE.pattern}")
        if self.parameters.get("type") != "object":
            raise ToolError(f"tool {self.name!r}: parameters must be a JSON Schema of type object")

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: str | dict[str, Any] | None = None) -> ToolResult:
        """Run the tool on a model's arguments; every failure is an error ToolResult, never an exception."""
        try:
            args = parse_arguments(arguments)
            errors = validate(args, self.parameters)
        except ValueError as e:
            return ToolResult(False, f"error: {e}")
        if errors:
            return ToolResult(False, f"error: bad arguments for {self.name}: " + "; ".join(errors))
        try:
            value = self.fn(**args)
        except Exception as e:  # the tool's own failure is information for the model, not a crash
            return ToolResult(False, f"error: {type(e).__name__}: {e}")
        if isinstance(value, ToolResult):
            return value
        return ToolResult(True, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                                                 default=str))


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Decorator (bare or with arguments): a typed, documented function → `Tool`."""

    def make(f: Callable[..., Any]) -> Tool:
        doc_description, doc_params = _parse_docstring(f.__doc__ or "")
        hints = typing.get_type_hints(f)
        props: dict[str, Any] = {}
        required = []
        for pname, p in inspect.signature(f).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ToolError(f"{f.__name__}: *args/**kwargs cannot be described to a model")
            if pname not in hints:
                raise ToolError(f"{f.__name__}: parameter {pname!r} needs a type hint")
            prop = _type_schema(hints[pname], f"{f.__name__}({pname})")
            if pname in doc_params:
                prop["description"] = doc_params[pname]
            if p.default is p.empty:
                required.append(pname)
            else:
                prop["default"] = p.default
            props[pname] = prop
        params = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
        text = description if description is not None else doc_description
        if not text:
            raise ToolError(f"{f.__name__}: a tool needs a description (a docstring or description=...)")
        return Tool(name or f.__name__, text, params, f)

    return make(fn) if fn is not None else make


def parse_arguments(arguments: str | dict[str, Any] | None) -> dict[str, Any]:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments are not valid JSON ({e.msg} at {e.pos}): {arguments[:200]!r}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "array": list,
                              "null": type(None)}[kind])


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Errors of `value` against the JSON Schema subset tools use (type, enum, items, properties, required,
    additionalProperties, anyOf); [] when valid."""
    where = path or "arguments"
    if "anyOf" in schema:
        if all(validate(value, s, path) for s in schema["anyOf"]):
            return [f"{where}={value!r} matches none of the allowed types"]
        return []
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if kinds and not any(_is_type(value, k) for k in kinds):
        return [f"{where} must be {' or '.join(kinds)}, got {type(value).__name__} {json.dumps(value)[:60]}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}={value!r} is not one of {schema['enum']!r}"]
    errors = []
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]" if path else f"[{i}]")
    if isinstance(value, dict) and (kinds == ["object"] or "properties" in schema):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"missing required argument {name!r}")
        if schema.get("additionalProperties") is False:
            errors += [f"unknown argument {k!r} (expected one of {sorted(props)})" for k in value if k not in props]
        for name, item in value.items():
            if name in props:
                errors += validate(item, props[name], f"{path}.{name}" if path else name)
    return errors


class ToolRegistry:
    """Tools by name; `schemas()` for the request, `call()` for each tool call the model makes."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, t: Tool | Callable[..., Any]) -> Tool:
        t = t if isinstance(t, Tool) else tool(t)
        if t.name in self.tools:
            raise ToolError(f"a tool named {t.name!r} is already registered")
        self.tools[t.name] = t
        return t

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def call(self, name: str, arguments: str | dict[str, Any] | None = None) -> ToolResult:
        t = self.tools.get(name)
        if t is None:
            return ToolResult(False, f"error: unknown tool {name!r}; available: {', '.join(self.tools) or 'none'}")
        return t(arguments)


# ---------------------------------------------------------------- built-in tools
@tool(name="calculator")
def calculator_tool(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (big integers; + - * / // % ** and parentheses; no names).

    Args:
        expression: the expression, e.g. 123456789 * 987654321 or (3.5 * 1000) / 60
    """
    return calculator.evaluate(expression)


def python_tool(timeout_s: float = 10.0, memory_mb: int = 512) -> Tool:
    def python(code: str) -> ToolResult:
        result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
        return ToolResult(result.ok, result.observation())

    return Tool("python", "Run Python 3 code in a sandbox (no network, no files outside a temp dir, "
                f"{timeout_s:g} s) and return what it prints. Use print() to show results.",
                {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                 "required": ["code"], "additionalProperties": False}, python)


def search_tool(store: Any, k: int = 3, mode: str | None = None, max_chars: int = 600) -> Tool:
    """Retrieval over a `RagStore` (anything with `search(query, k, mode)` returning hits with text/source)."""

    def search(query: str) -> str:
        hits = store.search(query, k=k, mode=mode) if mode else store.search(query, k=k)
        if not hits:
            return "no results"
        lines = []
        for i, h in enumerate(hits, 1):
            label = getattr(h, "source", "") or getattr(h, "doc_id", "")
            lines.append(f"[{i}] {label}\n{h.text[:max_chars]}")
        return "\n\n".join(lines)

    return Tool("search", "Search the knowledge base and return the most relevant passages.",
                {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                 "required": ["query"], "additionalProperties": False}, search)


def read_file_tool(allowed: Sequence[str | os.PathLike], max_chars: int = 20_000) -> Tool:
    """Read a text file, only under the `allowed` directories (symlinks resolved before the check)."""
    roots = [Path(a).resolve() for a in allowed]
    if not roots:
        raise ToolError("read_file needs at least one allowed directory")

    def read_file(path: str) -> ToolResult:
        target = Path(path)
        if not target.is_absolute():
            target = roots[0] / target
        real = target.resolve()
        if not any(real == r or r in real.parents for r in roots):
            return ToolResult(False, f"error: {path!r} is outside the allowed directories")
        if not real.is_file():
            return ToolResult(False, f"error: {path!r} is not a file")
        with open(real, encoding="utf-8", errors="replace") as f:
            text = f.read(max_chars + 1)
        return ToolResult(True, text if len(text) <= max_chars else text[:max_chars] + "\n...[truncated]")

    where = ", ".join(str(r) for r in roots)
    return Tool("read_file", f"Read a text file under {where} (relative paths start there).",
                {"type": "object", "properties": {"path": {"type": "string", "description": "the file's path"}},
                 "required": ["path"], "additionalProperties": False}, read_file)


BUILTIN_NAMES = ("calc", "python", "rag", "file")


def builtin_tools(names: Iterable[str], store: Any = None, allowed_dirs: Sequence[str] = ()) -> ToolRegistry:
    """A registry of the named built-ins: calc, python, rag (needs `store`), file (needs `allowed_dirs`)."""
    reg = ToolRegistry()
    for n in names:
        if n == "calc":
            reg.register(calculator_tool)
        elif n == "python":
            reg.register(python_tool())
        elif n == "rag":
            if store is None:
                raise ValueError("tool 'rag' needs a store (a RagStore directory)")
            reg.register(search_tool(store))
        elif n == "file":
            reg.register(read_file_tool(allowed_dirs))
        else:
            raise ValueError(f"unknown built-in tool {n!r}; choose from {', '.join(BUILTIN_NAMES)}")
    return reg
