"""`tinyllm rag index|search|ask` through the command table: every file type, skipped files listed with their
reason (and nothing else lost), re-indexing skips unchanged files, search output, ask through a fake endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyllm.cli import main
from tinyllm.rag.cli import AskConfig, IndexConfig, html_to_text, load_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _pdf_bytes(text: str) -> bytes:
    """A one-page PDF whose content stream shows `text` in Helvetica (xref offsets computed)."""
    stream = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("检索增强生成先检索文档，再让大模型根据文档回答问题。", encoding="utf-8")
    (root / "b.md").write_text("# BM25\n\nBM25 是关键词检索的打分函数，考虑词频和逆文档频率。\n", encoding="utf-8")
    (root / "sub" / "c.html").write_text(
        "<html><head><title>向量数据库</title><style>p{color:red}</style></head><body><p>向量数据库存储嵌入向量"
        "</p><script>var x = 1;</script><div>支持近邻搜索 &amp; 过滤</div></body></html>", encoding="utf-8")
    (root / "sub" / "d.jsonl").write_text(
        json.dumps({"id": "n1", "title": "新闻", "text": "今天北京下雨，气温下降。"}, ensure_ascii=False) + "\n\n"
        + json.dumps({"text": "上海明天晴天。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (root / "e.pdf").write_bytes(_pdf_bytes("Reciprocal rank fusion merges rankings"))
    (root / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "broken.jsonl").write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("never indexed", encoding="utf-8")
    return root


def test_loaders_per_type(corpus: Path):
    text, title = html_to_text((corpus / "sub" / "c.html").read_text(encoding="utf-8"))
    assert text == "向量数据库存储嵌入向量\n支持近邻搜索 & 过滤" and title == "向量数据库"
    docs = load_file(corpus / "sub" / "d.jsonl")
    assert [d["id"] for d in docs] == [f"{corpus / 'sub' / 'd.jsonl'}:n1", f"{corpus / 'sub' / 'd.jsonl'}:3"]
    assert docs[0]["metadata"] == {"title": "新闻"}
    pytest.importorskip("pypdf")
    (pdf,) = load_file(corpus / "e.pdf")
    assert pdf["text"] == "Reciprocal rank fusion merges rankings"
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_file(corpus / "broken.jsonl")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_file(corpus / "bad.txt")
    with pytest.raises(ValueError, match=r"unsupported file type '\.png'"):
        load_file(corpus / "image.png")


def test_index_search_and_reindex(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    store = str(tmp_path / "kb")
    argv = ["rag", "index", "--paths", str(corpus), str(tmp_path / "missing"), "--store", store,
            "--embedder", "hashing", "--dim", "512", "--progress", "false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    n_docs = 6 if "pypdf" not in out else 5  # a.txt b.md c.html d.jsonl×2 (+ e.pdf with pypdf)
    assert f"indexed {n_docs} new or changed document(s) of {n_docs} read" in out
    skipped = {line.split(":")[0].removeprefix("skipped ") for line in out.splitlines() if line.startswith("skipped")}
    assert skipped == {str(corpus / "bad.txt"), str(corpus / "broken.jsonl"), str(corpus / "image.png"),
                       str(tmp_path / "missing")}
    assert "line 2: invalid JSON" in out and "unsupported file type '.png'" in out and "hidden" not in out

    assert main(argv) == 0  # nothing changed: nothing re-embedded
    assert f"indexed 0 new or changed document(s) of {n_docs} read" in capsys.readouterr().out

    assert main(["rag", "search", "--query", "关键词检索的打分函数", "--store", store, "--mode", "bm25", "--k", "2",
                 "--json", "true"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["doc_id"] == str(corpus / "b.md") and rows[0]["rank"] == 1 and len(rows) == 2
    assert main(["rag", "search", "--query", "北京下雨", "--store", store, "--mode", "hybrid"]) == 0
    assert "d.jsonl" in capsys.readouterr().out.splitlines()[0]


def test_ask_through_an_openai_endpoint(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]):
    from tinyllm.rag import pipeline

    store = str(tmp_path / "kb")
    assert main(["rag", "index", "--paths", str(corpus / "a.txt"), str(corpus / "b.md"), "--store", store,
                 "--dim", "256", "--progress", "false"]) == 0
    capsys.readouterr()
    seen = {}

    def fake_call(self, prompt):
        seen["prompt"], seen["base_url"] = prompt, str(self.client.base_url)
        return "BM25 按词频和逆文档频率打分 [1]。"

    monkeypatch.setattr(pipeline.OpenAIChatLLM, "__call__", fake_call)
    assert main(["rag", "ask", "--question", "BM25 怎么打分？", "--store", store, "--base-url",
                 "http://127.0.0.1:8000/v1", "--served-model", "m", "--mode", "bm25", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BM25 按词频和逆文档频率打分 [1]。")
    assert f"[1]* {corpus / 'b.md'}" in out and seen["base_url"].rstrip("/") == "http://127.0.0.1:8000/v1"
    assert "[1] " in seen["prompt"] and "BM25 怎么打分？" in seen["prompt"]


def test_bad_configs_name_the_value(tmp_path: Path, capsys):
    with pytest.raises(ValueError, match=r"paths=\[\]"):
        IndexConfig()
    with pytest.raises(ValueError, match="exactly one of --model"):
        AskConfig(question="q", model="m", base_url="http://x")
    assert main(["rag", "search", "--query", "x", "--store", str(tmp_path / "nothing")]) == 2
    assert "holds no store" in capsys.readouterr().err
