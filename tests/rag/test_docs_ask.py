"""`tinyllm ask`: sections and anchors equal the site's, citations resolve to a page and a heading that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tinyllm.cli import main
from tinyllm.rag.docs_ask import DocsAskConfig, DocsStore, ask, slugify, split_sections
from tinyllm.rag.pipeline import OpenAIChatLLM

markdown = pytest.importorskip("markdown")  # the docs extra (MkDocs) brings it

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

FIXTURE = {
    "01-kv.md": "# 第一章 KV cache\n\nintro text\n\n## KV cache 的大小 — `kv_cache.py`\n\n"
                "每个 token 的 KV cache 是 2·L·H·d 字节。\n\n```python\n# not a heading\nx = 1\n```\n\n"
                "## Examples\n\nfirst\n\n## Examples\n\nsecond: GQA shares K/V heads\n",
    "02-lora.md": "# Chapter 2 — LoRA (低秩适配)\n\n## **Rank** and [parameters](x.md)\n\nLoRA trains r·(d_in + d_out).\n",
}


def site_ids(text: str) -> set[str]:
    """Heading ids as the site renders them (Python-Markdown's toc, as MkDocs runs it)."""
    html = markdown.Markdown(extensions=["toc", "tables", "pymdownx.superfences"]).convert(text)
    return set(re.findall(r'<h[1-6] id="([^"]+)"', html))


@pytest.fixture
def fixture_docs(tmp_path: Path) -> Path:
    for name, text in FIXTURE.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def resolves(source: str, root: Path) -> bool:
    page, _, anchor = source.partition("#")
    path = root / page
    return path.exists() and (not anchor or anchor in site_ids(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_anchors_are_the_sites(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert {s.anchor for s in split_sections(page.name, text) if s.anchor} == site_ids(text)


def test_sections_of_a_fixture_page(fixture_docs: Path) -> None:
    secs = split_sections("01-kv.md", FIXTURE["01-kv.md"])
    assert [s.anchor for s in secs] == ["kv-cache", "kv-cache-kv_cachepy", "examples", "examples_1"]
    assert secs[1].title == "第一章 KV cache › KV cache 的大小 — kv_cache.py"
    assert "# not a heading" in secs[1].text            # a comment in a code block stays in its section
    assert slugify("**Rank** and parameters") == "rank-and-parameters"


def test_fixture_store_citations_resolve(fixture_docs: Path, tmp_path: Path) -> None:
    store = DocsStore.build([fixture_docs])
    saved = store.save(tmp_path / "store.json")
    loaded = DocsStore.load(saved)
    assert [s.source for s in loaded.sections] == [s.source for s in store.sections]
    out = ask("GQA 和 KV cache 有什么关系？", loaded, lambda prompt: "见 [1] 和 [2]，[9] 不存在。", k=3)
    assert [c.number for c in out.citations] == [1, 2]      # [9] names no source and is dropped
    for c in out.citations:
        assert resolves(c.hit.source, fixture_docs), c.hit.source
    assert out.hits[0].source == "01-kv.md#examples_1"       # "GQA" is only in the second Examples section
    assert "[1] 第一章 KV cache › Examples" in out.prompt


def test_real_docs_citations_resolve() -> None:
    store = DocsStore.build([ROOT / "docs", ROOT / "README.md"])
    assert not {s.page for s in store.sections} & {"index.md", "ask.md", "api.md"}   # navigation pages skipped
    top = store.search("KV cache 占多少显存？", k=1)[0]      # each interview question is its own unit
    assert top.source == "02-architecture.md#interview-questions" and "Q2. KV cache" in top.metadata["title"]
    for question in ("KV cache 占多少显存？", "LoRA rank parameters", "BM25 怎么打分", "DPO loss"):
        out = ask(question, store, lambda prompt: "[1][2][3]", k=3)
        assert len(out.citations) == 3
        for c in out.citations:
            root = ROOT if c.hit.source.startswith("README.md") else ROOT / "docs"
            assert resolves(c.hit.source, root), c.hit.source


def test_endpoint_answer(fixture_docs: Path) -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["messages"][-1]["content"])
        return httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": "r·(d_in+d_out) [1]"}}]})

    llm = OpenAIChatLLM("http://127.0.0.1:9/v1", model="m", transport=httpx.MockTransport(handler))
    out = ask("LoRA rank: how many parameters?", DocsStore.build([fixture_docs]), llm, k=2)
    assert out.citations[0].hit.source == "02-lora.md#rank-and-parameters"
    assert "LoRA trains r·(d_in + d_out)" in seen[0]


def test_cli_search_only_and_errors(fixture_docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.json"
    assert main(["ask", "rank parameters", "--docs", str(fixture_docs), "--save-store", str(store), "--search-only",
                 "--k", "1"]) == 0
    assert capsys.readouterr().out.strip() == ("[1] Chapter 2 — LoRA (低秩适配) › Rank and parameters — "
                                               "02-lora.md#rank-and-parameters (BM25 "
                                               f"{DocsStore.load(store).search('rank parameters', 1)[0].score:.2f})")
    assert main(["ask", "--question", "KV", "--store", str(store), "--search-only"]) == 0
    assert "01-kv.md#" in capsys.readouterr().out
    assert main(["ask", "KV", "--store", str(tmp_path / "missing.json"), "--search-only"]) == 2
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="question='' is empty"):
        DocsAskConfig(question=" ", search_only=True)
    with pytest.raises(ValueError, match="exactly one of --model"):
        DocsAskConfig(question="q")
    with pytest.raises(ValueError, match="not a docs store"):
        (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
        DocsStore.load(tmp_path / "bad.json")
