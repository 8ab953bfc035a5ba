"""Retrieval-augmented generation (notes ch.08): chunking, BM25 and dense indexes, a persistent store, retrieval.

Modules: `chunk` (fixed, sentence-aware recursive and Markdown-heading splitters with exact character offsets),
`bm25` and `dense` (re-exported by `index`, with rank fusion: BM25 variants over sparse postings, exact and
faiss vector search), `store` (`RagStore`: SQLite documents and chunks plus index files, atomic updates),
`embed`, `retrieve`, `pipeline`, `cli`.
"""

from tinyllm.rag.store import Hit, RagStore

__all__ = ["Hit", "RagStore"]
