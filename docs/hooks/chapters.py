"""The site index's chapter table, written at build time from the pages that exist (MkDocs hook).

`docs/index.md` holds the marker `<!-- chapters -->`; it becomes one row per note chapter with a link to each
page whose file name starts with that chapter's number (`03-04-…` belongs to 03), titled by the page's own
`# heading`. A chapter page added later joins the index (and, through the file-name nav, the menu) without
anyone editing a list, and a link can never point at a page that is not there.
"""

from __future__ import annotations

import re

MARKER = "<!-- chapters -->"
CHAPTERS = {
    "01": "01 大语言模型基础 · fundamentals",
    "02": "02 大语言模型架构 · architecture",
    "03": "03 训练数据集 · data",
    "04": "04 分布式训练 · distributed training",
    "05": "05 有监督微调 · fine-tuning",
    "06": "06 推理 · inference",
    "07": "07 强化学习 · RLHF",
    "08": "08 检索增强 · RAG and agents",
    "09": "09 大语言模型评估 · evaluation",
    "10": "10 大语言模型应用 · applications",
    "98": "98 清华大模型公开课 · Tsinghua course",
}
_NUMBER = re.compile(r"^(\d\d)(?:-\d\d)?-")


def page_title(markdown: str, fallback: str) -> str:
    m = re.search(r"^#\s+(.+)$", markdown, re.M)
    title = m.group(1).strip() if m else fallback
    return re.sub(r"^(Chapters?|Ch\.?)\s+[\d.–-]+\s*[—:·-]\s*|^\d\d\s*·\s*", "", title)


def chapter_table(pages: dict[str, str]) -> str:
    """pages: file name → Markdown text. Rows in chapter order; a chapter without a page says so."""
    rows = ["| chapter | pages |", "|---|---|"]
    for number, label in CHAPTERS.items():
        links = [f"[{page_title(text, name)}]({name})" for name, text in sorted(pages.items())
                 if (m := _NUMBER.match(name)) and m.group(1) == number]
        rows.append(f"| {label} | {' · '.join(links) if links else 'no page yet'} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):  # MkDocs hook
    if MARKER not in markdown:
        return markdown
    pages = {f.src_uri: f.content_string for f in files.documentation_pages() if "/" not in f.src_uri}
    return markdown.replace(MARKER, chapter_table(pages))
