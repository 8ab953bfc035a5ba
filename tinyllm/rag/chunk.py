"""Text chunking for retrieval (notes ch.08.1.b "Text chunking (splitters)").

A retriever indexes pieces of documents, not whole documents: an embedding of a 5,000-character article is a
blur of its topics, and an LLM prompt has room for a few passages only. The notes' recipe: split the text
into semantic units (paragraphs, sentences), merge neighbouring units until `chunk_size`, and start the next
chunk with an overlap of `chunk_overlap`, so a fact cut at a boundary still appears whole in one chunk.

Every chunk keeps exact character offsets into its document: `chunk.text == document[chunk.start:chunk.end]`
always holds, so a hit can be highlighted in the source and chunks can be re-derived from a stored document.

Strategies:
- `chunk_fixed`: windows of `size` characters (or tokens) moving by `size - overlap`; blind to meaning but
  predictable (the ChatGPT retrieval plugin uses 200-token chunks).
- `chunk_recursive`: LangChain's RecursiveCharacterTextSplitter idea with a Chinese-aware separator list
  ["\\n\\n", "\\n", "。", "！", "？", "；", "，", ". ", " ", ""]: split on the coarsest separator present, merge
  the pieces greedily up to `size`, and split any piece that is still too long with the next finer separator.
  The last separator "" splits between characters, so every chunk fits. Unlike LangChain the separator stays
  at the *end* of its piece (a Chinese sentence keeps its 。) and chunks are trimmed of surrounding whitespace
  by moving their offsets, never by editing the text.
- `split_sentences`: Chinese (。！？；…) and English (. ! ?) sentence ends, with closing quotes and brackets
  kept on the sentence they close.
- `chunk_markdown`: one section per ATX heading (outside fenced code), each section chunked recursively, with
  the heading path ("Install > From source") in `chunk.metadata["headings"]`.

Sizes count characters of the Python string (a Chinese character is one), or tokens with `unit="tokens"`.
Not covered: semantic (embedding-similarity) chunking, code-aware separators, parent/child chunk hierarchies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", "，", ". ", " ", ""]
STRATEGIES = ("fixed", "recursive", "markdown")

Span = tuple[int, int]


@dataclass
class Chunk:
    """One piece of a document; `text == document[start:end]`."""

    text: str
    start: int
    end: int
    doc_id: str = ""
    source: str = ""
    index: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_id(self) -> str:
        """`"{doc_id}#{index}"`, the id a store and its indexes use."""
        return f"{self.doc_id}#{self.index}"


def _check_size(size: int, overlap: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size={size!r} must be an integer >= 1")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < size:
        raise ValueError(f"overlap={overlap!r} must be an integer with 0 <= overlap < size={size}")


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return text


def _trim(text: str, start: int, end: int) -> Span:
    """Move `start`/`end` inward past whitespace (the text itself is never edited)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _make(text: str, spans: Sequence[Span], base: int = 0, **meta: Any) -> list[Chunk]:
    return [Chunk(text[s:e], s + base, e + base, metadata=dict(meta)) for s, e in spans]


# ---------------------------------------------------------------------------------------------------- fixed


def token_spans(text: str, tokenizer: Any) -> list[Span]:
    """Character span of every token of `text`.

    `tokenizer` is either a callable returning string pieces that concatenate to the text (e.g. `jieba.lcut`),
    or an object with `encode(text) -> ids` and `decode_bytes(ids)` / `decode(ids)` (tinyllm's byte-level BPE).
    A byte-level token that ends inside a multi-byte character is extended to the end of that character, so
    spans stay on character boundaries (a few tokens then have empty spans and are merged into neighbours).
    """
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
        if hasattr(tokenizer, "decode_bytes"):
            pieces = [tokenizer.decode_bytes([i]) for i in ids]
        else:
            pieces = [tokenizer.decode([i]).encode("utf-8") for i in ids]
        char_at_byte = []  # byte offset -> index of the character that starts at or contains it
        for ci, ch in enumerate(text):
            char_at_byte.extend([ci] * len(ch.encode("utf-8")))
        n_bytes = len(char_at_byte)
        spans, b, prev = [], 0, 0
        for p in pieces:
            b += len(p)
            if b > n_bytes:
                raise ValueError("tokenizer pieces do not decode back to the text (lossy tokenizer?)")
            end = len(text) if b == n_bytes else char_at_byte[b] + (char_at_byte[b - 1] == char_at_byte[b])
            end = max(end, prev)
            spans.append((prev, end))
            prev = end
        if prev != len(text):
            raise ValueError("tokenizer pieces do not cover the text")
        return spans
    if callable(tokenizer):
        spans, pos = [], 0
        for piece in tokenizer(text):
            at = text.find(piece, pos)
            if at < 0 or not piece:
                continue
            spans.append((at, at + len(piece)))
            pos = at + len(piece)
        return spans
    raise ValueError(f"tokenizer={tokenizer!r} is neither callable nor has encode()")


def chunk_fixed(text: str, size: int, overlap: int = 0, unit: str = "chars", tokenizer: Any = None) -> list[Chunk]:
    """Windows of `size` units starting every `size - overlap` units; the last window ends at the text's end.

    With `unit="tokens"` the windows count tokens of `tokenizer` (see `token_spans`) and each chunk spans from
    its first token's start to its last token's end.
    """
    text = _check_text(text)
    _check_size(size, overlap)
    if unit == "chars":
        if not text:
            return []
        step = size - overlap
        starts = range(0, max(len(text) - overlap, 1), step)
        return _make(text, [(s, min(s + size, len(text))) for s in starts])
    if unit == "tokens":
        if tokenizer is None:
            raise ValueError("unit='tokens' needs a tokenizer")
        bounds = token_spans(text, tokenizer)
    else:
        raise ValueError(f"unit={unit!r} must be 'chars' or 'tokens'")
    spans: list[Span] = []
    step = size - overlap
    for first in range(0, len(bounds), step):
        last = min(first + size, len(bounds)) - 1
        spans.append((bounds[first][0], bounds[last][1]))
        if last == len(bounds) - 1:
            break
    return _make(text, spans)


# ------------------------------------------------------------------------------------------------ sentences

_CLOSERS = "\"'”’）)】」』》]"
# a sentence ends after a run of Chinese terminators, or English !/? runs, or a period before whitespace/end,
# then any closing quotes/brackets, then trailing whitespace (which belongs to the sentence it follows)
_SENTENCE_END = re.compile(
    rf"(?:[。！？；…!?]+|\.+(?=[\s{re.escape(_CLOSERS)}]|$))[{re.escape(_CLOSERS)}]*\s*|\n+")


def sentence_spans(text: str) -> list[Span]:
    """Spans of the sentences of `text`; they tile the text exactly (no gaps, no overlaps)."""
    text = _check_text(text)
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > start:
            spans.append((start, m.end()))
            start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def split_sentences(text: str) -> list[str]:
    """Sentences of Chinese/English text; `"".join(split_sentences(t)) == t`.

    >>> split_sentences("今天下雨了。我们去哪？“走吧！”他说. OK")
    ['今天下雨了。', '我们去哪？', '“走吧！”', '他说. ', 'OK']
    """
    return [text[s:e] for s, e in sentence_spans(text)]


# ------------------------------------------------------------------------------------------------ recursive


def _split_on(text: str, lo: int, hi: int, sep: str) -> list[Span]:
    """Contiguous pieces of text[lo:hi], each ending with (and including) one occurrence of `sep`."""
    if sep == "":
        return [(i, i + 1) for i in range(lo, hi)]
    pieces, start = [], lo
    while True:
        at = text.find(sep, start, hi)
        if at < 0:
            break
        pieces.append((start, at + len(sep)))
        start = at + len(sep)
    if start < hi:
        pieces.append((start, hi))
    return pieces


def _merge(pieces: list[Span], size: int, overlap: int) -> list[Span]:
    """Greedy merge of contiguous pieces (each <= size) into windows <= size that overlap by <= overlap."""
    out: list[Span] = []
    window: list[Span] = []
    for piece in pieces:
        if window and piece[1] - window[0][0] > size:
            out.append((window[0][0], window[-1][1]))
            # keep a tail of at most `overlap` units that still leaves room for the new piece
            while window and (window[-1][1] - window[0][0] > overlap
                              or piece[1] - window[0][0] > size):
                window.pop(0)
        window.append(piece)
    if window:
        out.append((window[0][0], window[-1][1]))
    return out


def _recursive(text: str, lo: int, hi: int, size: int, overlap: int, separators: Sequence[str]) -> list[Span]:
    i = next((i for i, s in enumerate(separators) if s == "" or text.find(s, lo, hi) >= 0), len(separators))
    if i == len(separators):  # no separator applies (a list without ""): fall back to characters
        return _recursive(text, lo, hi, size, overlap, [""])
    sep, finer = separators[i], separators[i + 1:]
    spans: list[Span] = []
    good: list[Span] = []
    for a, b in _split_on(text, lo, hi, sep):
        if b - a <= size:
            good.append((a, b))
            continue
        if good:
            spans.extend(_merge(good, size, overlap))
            good = []
        spans.extend(_recursive(text, a, b, size, overlap, finer or [""]))
    if good:
        spans.extend(_merge(good, size, overlap))
    return spans


def recursive_spans(text: str, size: int, overlap: int = 0,
                    separators: Sequence[str] = DEFAULT_SEPARATORS) -> list[Span]:
    """Spans of `chunk_recursive` (whitespace-trimmed, empty ones dropped)."""
    text = _check_text(text)
    _check_size(size, overlap)
    if not separators or not all(isinstance(s, str) for s in separators):
        raise ValueError(f"separators={separators!r} must be a non-empty list of strings")
    out = []
    for s, e in _recursive(text, 0, len(text), size, overlap, list(separators)):
        s, e = _trim(text, s, e)
        if e <= s:
            continue
        if out and out[-1][0] <= s and e <= out[-1][1]:
            continue  # trimming left it inside the previous chunk
        if out and s <= out[-1][0]:
            out.pop()  # trimming left the previous chunk inside this one
        out.append((s, e))
    return out


def chunk_recursive(text: str, size: int, overlap: int = 0,
                    separators: Sequence[str] = DEFAULT_SEPARATORS) -> list[Chunk]:
    """Separator-aware chunks of at most `size` characters, consecutive ones overlapping by <= `overlap`."""
    return _make(text, recursive_spans(text, size, overlap, separators))


# ------------------------------------------------------------------------------------------------- markdown

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_sections(text: str) -> list[tuple[Span, list[str]]]:
    """(span, heading path) of each section; a section runs from its heading line to the next heading."""
    text = _check_text(text)
    sections: list[tuple[Span, list[str]]] = []
    path: list[tuple[int, str]] = []
    start, current, in_fence, pos = 0, [], False, 0
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line.rstrip("\r\n"))
        if m:
            if pos > start:
                sections.append(((start, pos), current))
            level = len(m.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2).strip())]
            start, current = pos, [t for _, t in path]
        pos += len(line)
    if pos > start:
        sections.append(((start, pos), current))
    return sections


def chunk_markdown(text: str, size: int, overlap: int = 0) -> list[Chunk]:
    """Heading-aware chunks: never across a heading; `metadata["headings"]` is the heading path."""
    _check_size(size, overlap)
    chunks = []
    for (lo, hi), headings in markdown_sections(text):
        for s, e in recursive_spans(text[lo:hi], size, overlap):
            chunks.append(Chunk(text[lo + s:lo + e], lo + s, lo + e, metadata={"headings": list(headings)}))
    return chunks


# ----------------------------------------------------------------------------------------------- dispatcher


def chunk_document(doc_id: str, text: str, strategy: str = "recursive", size: int = 500, overlap: int = 50,
                   source: str = "", unit: str = "chars", tokenizer: Any = None,
                   separators: Sequence[str] | None = None) -> list[Chunk]:
    """Chunks of one document with `doc_id`, `source` and `index` filled in (ids `"{doc_id}#{index}"`).

    `strategy`: "fixed" (`unit`/`tokenizer` apply), "recursive" (`separators` apply) or "markdown".
    """
    text = _check_text(text)
    if strategy == "fixed":
        chunks = chunk_fixed(text, size, overlap, unit=unit, tokenizer=tokenizer)
    elif strategy == "recursive":
        chunks = chunk_recursive(text, size, overlap, separators or DEFAULT_SEPARATORS)
    elif strategy == "markdown":
        chunks = chunk_markdown(text, size, overlap)
    else:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    for i, c in enumerate(chunks):
        c.doc_id, c.source, c.index = str(doc_id), source, i
    return chunks

