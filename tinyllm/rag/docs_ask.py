"""Asking the documentation: retrieval-augmented answers over tinyllm's chapter pages and the README's map of
the notes, with citations to page and section (notes ch.08.1 document QA with citations, applied to the
notes themselves).

Each Markdown page is cut into sections at its `##`/`###` headings (headings inside fenced code blocks are
code, not structure); a section is one retrievable unit whose citation is `page.md#anchor` — the anchor the
site gives that heading (MkDocs' `toc` slugify: inline markup dropped, NFKD to ASCII, lower case, runs of
spaces and hyphens to one hyphen, `_1`, `_2` … for repeats), so a citation opens the right place on the site
and in the source. Retrieval is BM25 over character bigrams and lower-cased words (`zh-bigram`: mixed
Chinese/English questions need no segmenter), answering goes through `rag.pipeline.answer` with either a local
model or an OpenAI-compatible endpoint, exactly as `tinyllm rag ask` does.

`DocsStore.build(paths)` indexes pages; `save`/`load` keep the sections as one JSON file (written atomically)
so a store can be built once and shipped, or used as a test fixture. Not covered: dense retrieval of the docs
(BM25 is enough for a few hundred sections) and pages outside Markdown.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyllm.atomic import atomic_write_json
from tinyllm.rag.bm25 import BM25Index
from tinyllm.rag.store import Hit

FORMAT = "tinyllm-docs-store/1"
NAVIGATION_PAGES = ("index.md", "ask.md", "api.md")
_HEADING = re.compile(r"^(#{1,3})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_ASKING = re.compile(r"是什么|什么是|为什么|什么|怎么样|怎么|如何|多少|哪些|有没有|吗|呢|？|\?")


@dataclass(frozen=True)
class Section:
    page: str       # file name relative to the indexed root, e.g. "06-inference.md"
    anchor: str     # "" for the text before the first section heading
    title: str      # "page title › section heading"
    text: str

    @property
    def source(self) -> str:
        return f"{self.page}#{self.anchor}" if self.anchor else self.page


def heading_text(markdown: str) -> str:
    """A heading as the rendered page shows it: links to their text, code/emphasis markers and HTML dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"`|\*\*|(?<!\w)\*|\*(?!\w)", "", text).strip()


def slugify(text: str, separator: str = "-") -> str:
    """MkDocs/Python-Markdown's default `toc` slug of a heading's text."""
    value = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(rf"[{separator}\s]+", separator, value)


def split_sections(page: str, markdown: str) -> list[Section]:
    """A page's sections; anchors follow the site's rule for repeated slugs (`x`, `x_1`, `x_2`)."""
    lines = markdown.splitlines()
    title, in_code, seen = page, False, set()
    chunks: list[tuple[str, str, list[str]]] = [("", "", [])]  # (anchor, heading, lines)
    for line in lines:
        if _FENCE.match(line):
            in_code = not in_code
        m = None if in_code else _HEADING.match(line)
        if m is None:
            chunks[-1][2].append(line)
            continue
        text = heading_text(m.group(2))
        slug = base = slugify(text)
        n = 0
        while slug in seen:
            n += 1
            slug = f"{base}_{n}"
        seen.add(slug)
        if len(m.group(1)) == 1 and title == page:
            title = text
        chunks.append((slug, text, [line]))
    out = []
    for anchor, heading, body in chunks:
        label = title if not heading or heading == title else f"{title} › {heading}"
        for part in _questions(body):
            text = "\n".join(part).strip()
            if not text:
                continue
            q = _QUESTION.match(part[0]) if part else None
            out.append(Section(page, anchor, f"{label} › {q.group(1).strip()}" if q else label, text))
    return out


_QUESTION = re.compile(r"^\*\*(Q\d+\..*?)\*\*")


def _questions(body: list[str]) -> list[list[str]]:
    """A section cut before each `**Qn. …**` paragraph: every interview question is its own retrievable unit
    (cited with its section's anchor), so a long question list does not drown the one question asked."""
    parts: list[list[str]] = [[]]
    in_code = False
    for line in body:
        if _FENCE.match(line):
            in_code = not in_code
        if not in_code and _QUESTION.match(line) and any(x.strip() for x in parts[-1]):
            parts.append([])
        parts[-1].append(line)
    return parts


class DocsStore:
    """Sections of Markdown pages behind `search(question, k, mode)`, as `rag.pipeline.answer` expects."""

    def __init__(self, sections: Sequence[Section]) -> None:
        if not sections:
            raise ValueError("no sections to index (no Markdown pages found)")
        self.sections = list(sections)
        self.by_id = {f"s{i}": s for i, s in enumerate(self.sections)}
        self.index = BM25Index(tokenizer="zh-bigram")
        self.index.add(list(self.by_id), [f"{s.title}\n{s.text}" for s in self.sections])

    @classmethod
    def build(cls, paths: Iterable[str | Path], skip: Sequence[str] = NAVIGATION_PAGES) -> DocsStore:
        """Index Markdown files and directories of them (not recursive; `hooks/`, `data/` have no pages).
        Directory pages named in `skip` are left out: the site's index, this tool's page and the API page quote
        questions and list pages, and would outrank the sections that answer."""
        sections: list[Section] = []
        for p in map(Path, paths):
            if not p.exists():
                raise ValueError(f"{p}: no such file or directory")
            files = [f for f in sorted(p.glob("*.md")) if f.name not in skip] if p.is_dir() else [p]
            for f in files:
                try:
                    sections += split_sections(f.name, f.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError) as e:
                    raise ValueError(f"{f}: cannot be read as UTF-8 Markdown ({e})") from None
        return cls(sections)

    def save(self, path: str | Path) -> Path:
        rows = [{"page": s.page, "anchor": s.anchor, "title": s.title, "text": s.text} for s in self.sections]
        return atomic_write_json(path, {"format": FORMAT, "sections": rows}, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> DocsStore:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a docs store ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a docs store (format {data.get('format') if isinstance(data, dict) else None!r}"
                             f", expected {FORMAT!r})")
        return cls([Section(r["page"], r["anchor"], r["title"], r["text"]) for r in data["sections"]])

    def search(self, question: str, k: int = 5, mode: str = "bm25") -> list[Hit]:
        if mode not in ("bm25", "hybrid"):
            raise ValueError(f"mode={mode!r}: the docs store searches with bm25 only")
        # question words carry no topic, and their bigrams (什么, 么是) would match every other question
        query = _ASKING.sub(" ", question).strip() or question
        hits = []
        for sid, score in self.index.search(query, k=k):
            s = self.by_id[sid]
            hits.append(Hit(doc_id=s.page, chunk_id=s.source, text=s.text, start=0, end=len(s.text), score=score,
                            source=s.source, metadata={"title": s.title}))
        return hits

    def close(self) -> None:  # the store interface `tinyllm rag` uses; nothing is held open
        pass


def default_paths() -> list[Path]:
    """`docs/` and `README.md` of the checkout this package runs from (or of the working directory)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "docs").is_dir():
            return [root / "docs", *([root / "README.md"] if (root / "README.md").exists() else [])]
    raise ValueError("no docs/ directory here or beside the package; pass --docs DIR")


def ask(question: str, store: DocsStore, llm: Any, k: int = 5, max_context_tokens: int = 1500,
        count_tokens: Any = None) -> Any:
    """`rag.pipeline.answer` over the docs: the Answer's citations carry `page.md#anchor` sources."""
    from tinyllm.rag.pipeline import answer

    return answer(question, store, llm, k=k, mode="bm25", max_context_tokens=max_context_tokens,
                  count_tokens=count_tokens)


# ------------------------------------------------------------------ command line
@dataclass
class DocsAskConfig:
    question: str = field(default="", metadata={"help": "the question, e.g. \"KV cache 占多少显存？\"",
                                                "positional": True})
    docs: list[str] = field(default_factory=list, metadata={"help": "Markdown files or directories to search "
                                                                    "(default: the checkout's docs/ and README.md)"})
    store: str = field(default="", metadata={"help": "a saved docs store (JSON) instead of --docs"})
    save_store: str = field(default="", metadata={"help": "write the indexed sections to this JSON file"})
    k: int = field(default=4, metadata={"help": "sections retrieved"})
    model: str = field(default="", metadata={"help": "a local checkpoint (HF directory, .gguf or short name)"})
    base_url: str = field(default="", metadata={"help": "an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"})
    api_key: str = field(default="", metadata={"help": "API key for --base-url (default: $OPENAI_API_KEY)"})
    served_model: str = field(default="", metadata={"help": "model name at --base-url"})
    max_tokens: int = field(default=256, metadata={"help": "answer length limit in tokens"})
    max_context_tokens: int = field(default=1500, metadata={"help": "token budget of the numbered sections"})
    search_only: bool = field(default=False, metadata={"help": "print the retrieved sections, call no model"})

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError("question='' is empty (tinyllm ask \"问题\")")
        if self.k < 1:
            raise ValueError(f"k={self.k!r} must be >= 1")
        if self.store and self.docs:
            raise ValueError(f"give --store ({self.store!r}) or --docs ({self.docs!r}), not both")
        if not self.search_only and bool(self.model) == bool(self.base_url):
            raise ValueError(f"give exactly one of --model ({self.model!r}) and --base-url ({self.base_url!r}), "
                             "or --search-only")


def run_docs_ask(cfg: DocsAskConfig) -> int:
    import os

    from tinyllm.rag.pipeline import LocalLLM, OpenAIChatLLM

    store = DocsStore.load(cfg.store) if cfg.store else DocsStore.build(cfg.docs or default_paths())
    if cfg.save_store:
        store.save(cfg.save_store)
    if cfg.search_only:
        for i, h in enumerate(store.search(cfg.question, k=cfg.k), start=1):
            print(f"[{i}] {h.metadata['title']} — {h.source} (BM25 {h.score:.2f})")
        return 0
    budget, count = cfg.max_context_tokens, None
    if cfg.model:
        llm: Any = LocalLLM(cfg.model, max_tokens=cfg.max_tokens)
        budget, count = llm.source_budget(cfg.question, budget), llm.count_tokens
    else:
        llm = OpenAIChatLLM(cfg.base_url, cfg.api_key or os.environ.get("OPENAI_API_KEY", ""), cfg.served_model,
                            max_tokens=cfg.max_tokens)
    out = ask(cfg.question, store, llm, k=cfg.k, max_context_tokens=budget, count_tokens=count)
    print(out.text)
    if out.hits:
        print("\nsources:")
        cited = {c.number for c in out.citations}
        for i, h in enumerate(out.hits, start=1):
            print(f"[{i}]{'*' if i in cited else ' '} {h.metadata['title']} — {h.source}")
    return 0
