"""Chunkers: exact offsets, size and overlap limits, coverage, sentence and Markdown structure."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.rag.chunk import (
    DEFAULT_SEPARATORS,
    Chunk,
    chunk_document,
    chunk_fixed,
    chunk_markdown,
    chunk_recursive,
    sentence_spans,
    split_sentences,
    token_spans,
)

ZH = ("检索增强生成（RAG）先检索再生成。它把外部知识放进提示词里，减少幻觉！为什么要切块？"
      "因为嵌入模型的输入长度有限；太长的文本向量会模糊。\n\n第二段：块太小则缺少上下文，"
      "块太大则噪声多。常见做法是按句子切分，再合并到固定长度，并保留一定重叠。\n"
      "English sentences also appear. They end with a period! Do they? Yes.")

TEXT = st.lists(st.sampled_from([*list("ab c。，！？；\n.xy中文"), "\n\n", ". "]), max_size=150).map("".join)


def _check_invariants(text: str, chunks: list[Chunk], size: int, overlap: int) -> None:
    for c in chunks:
        assert c.text == text[c.start:c.end]
        assert 0 < c.end - c.start <= size
        assert c.text == c.text.strip()
    for a, b in itertools.pairwise(chunks):
        assert a.start < b.start and a.end < b.end  # strictly advancing
        assert a.end - b.start <= overlap  # consecutive overlap never exceeds the budget
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    # every non-whitespace character lands in some chunk: nothing is lost
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


@settings(max_examples=150, deadline=None)
@given(text=TEXT, size=st.integers(1, 40), overlap_frac=st.floats(0, 0.9))
def test_recursive_invariants(text: str, size: int, overlap_frac: float) -> None:
    overlap = min(int(size * overlap_frac), size - 1)
    _check_invariants(text, chunk_recursive(text, size, overlap), size, overlap)


MARKDOWN = st.lists(st.sampled_from(["# ", "## ", "### ", "```\n", "标题", "正文。", "text. ", "\n", "\n\n", "a"]),
                    max_size=80).map("".join)


@settings(max_examples=100, deadline=None)
@given(text=MARKDOWN, size=st.integers(1, 40), overlap_frac=st.floats(0, 0.9))
def test_markdown_invariants(text: str, size: int, overlap_frac: float) -> None:
    overlap = min(int(size * overlap_frac), size - 1)
    chunks = chunk_markdown(text, size, overlap)
    for c in chunks:
        assert c.text == text[c.start:c.end] and 0 < len(c.text) <= size
        assert isinstance(c.metadata["headings"], list)
    covered = {i for c in chunks for i in range(c.start, c.end)}
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200), size=st.integers(1, 30), overlap=st.integers(0, 29))
def test_fixed_windows_tile_the_text(text: str, size: int, overlap: int) -> None:
    overlap = min(overlap, size - 1)
    chunks = chunk_fixed(text, size, overlap)
    assert [c.start for c in chunks] == list(range(0, len(chunks) * (size - overlap), size - overlap))
    assert all(c.text == text[c.start:c.end] and len(c.text) <= size for c in chunks)
    assert (chunks[-1].end if chunks else 0) == len(text)
    assert all(len(c.text) == size for c in chunks[:-1])


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_sentences_tile_the_text(text: str) -> None:
    assert "".join(split_sentences(text)) == text
    spans = sentence_spans(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_sentence_rules_chinese_english_quotes() -> None:
    assert split_sentences("今天下雨了。我们去哪？“走吧！”他说……真的吗？！是的；好") == [
        "今天下雨了。", "我们去哪？", "“走吧！”", "他说……", "真的吗？！", "是的；", "好"]
    assert split_sentences('He said "hi!" Then (he left.) Pi is 3.14 here. End') == [
        'He said "hi!" ', "Then (he left.) ", "Pi is 3.14 here. ", "End"]


def test_recursive_prefers_coarse_separators() -> None:
    chunks = chunk_recursive(ZH, 60, 10)
    _check_invariants(ZH, chunks, 60, 10)
    # a chunk ends at a sentence end whenever one fits: no chunk stops mid-sentence when a 。 was available
    enders = tuple("。！？；.!?")
    assert sum(c.text.endswith(enders) for c in chunks) >= len(chunks) - 2
    # the paragraph break is a boundary: no chunk spans "\n\n"
    assert not any("\n\n" in c.text for c in chunks)
    assert DEFAULT_SEPARATORS[-1] == "" and "。" in DEFAULT_SEPARATORS


def test_recursive_overlap_repeats_whole_pieces() -> None:
    text = "一二三。四五六。七八九。十百千。"
    chunks = chunk_recursive(text, 8, 4)
    assert [c.text for c in chunks] == ["一二三。四五六。", "四五六。七八九。", "七八九。十百千。"]


def test_token_windows_with_jieba_and_bpe() -> None:
    jieba = pytest.importorskip("jieba")
    text = "我们在北京大学学习自然语言处理。"
    chunks = chunk_fixed(text, 3, 1, unit="tokens", tokenizer=jieba.lcut)
    assert [c.text for c in chunks] == ["我们在北京大学", "北京大学学习自然语言", "自然语言处理。"]
    from tinyllm.tokenizer.bpe_train import train_bpe

    tok = train_bpe([ZH] * 3, 300, show_progress=False)
    spans = token_spans(ZH, tok)
    assert spans[0][0] == 0 and spans[-1][1] == len(ZH)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    for c in chunk_fixed(ZH, 20, 5, unit="tokens", tokenizer=tok):
        assert c.text == ZH[c.start:c.end]
        assert len(tok.encode(c.text)) <= 20 + 2  # byte tokens split across a character boundary may merge


def test_markdown_sections_and_heading_path() -> None:
    md = ("# 安装\n先装依赖。\n## 从源码\n```bash\n# 这不是标题\nmake\n```\n克隆仓库后构建。\n"
          "### 测试\n运行测试。\n# 使用\n导入即可。\n")
    chunks = chunk_markdown(md, 60, 0)
    got = [(c.text.splitlines()[0], c.metadata["headings"]) for c in chunks]
    assert got == [("# 安装", ["安装"]), ("## 从源码", ["安装", "从源码"]),
                   ("### 测试", ["安装", "从源码", "测试"]), ("# 使用", ["使用"])]
    assert all(c.text == md[c.start:c.end] for c in chunks)
    assert "# 这不是标题" in chunks[1].text  # a '#' line inside a code fence is not a heading


def test_chunk_document_ids_and_validation() -> None:
    chunks = chunk_document("d1", ZH, strategy="recursive", size=50, overlap=5, source="notes.md")
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.doc_id for c in chunks} == {"d1"} and chunks[1].chunk_id == "d1#1"
    assert chunks[0].source == "notes.md"
    assert chunk_document("e", "", size=10, overlap=0) == []
    with pytest.raises(ValueError, match="strategy='semantic'"):
        chunk_document("d", "x", strategy="semantic")
    with pytest.raises(ValueError, match="overlap=10"):
        chunk_recursive("x", 10, 10)
    with pytest.raises(ValueError, match="size=0"):
        chunk_fixed("x", 0)
    with pytest.raises(ValueError, match="unit='words'"):
        chunk_fixed("x", 3, unit="words")
