"""Every ```python block in docs/*.md runs and its asserts hold (the docs' examples are tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in sorted(DOCS.glob("*.md")):
        for i, m in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            out.append((page.name, i, m.group(1)))
    return out


@pytest.mark.parametrize(("page", "index", "code"), _blocks(), ids=lambda v: str(v)[:40])
def test_doc_example_runs(page: str, index: int, code: str) -> None:
    namespace: dict = {"__name__": f"docs_{page}_{index}"}
    exec(compile(code, f"{page}[{index}]", "exec"), namespace)


def test_docs_have_examples() -> None:
    assert _blocks(), "docs/ has no runnable python examples"
