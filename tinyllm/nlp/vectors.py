"""Word vectors after training: cosine similarity, nearest neighbours, analogies, word2vec file formats
(notes ch.01 词向量 / Word2Vec).

A trained embedding table is a lookup: row i of the V×N input matrix W is the vector of word i (one-hot × W
selects that row). Similarity is the cosine cos(a, b) = a·b / (|a||b|). Nearest neighbours rank every word by
its cosine to a query; an analogy a : b :: c : ? is answered with 3CosAdd — the word closest to
unit(b) − unit(a) + unit(c), the inputs excluded (king − man + woman ≈ queen).

Files use the original word2vec C tool's formats, which gensim's `KeyedVectors.load_word2vec_format` reads:
- text: a header line "V N", then one line per word "word v1 v2 ... vN";
- binary: the same header line, then per word the UTF-8 word, one space, N little-endian float32s, "\\n".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tinyllm.atomic import atomic_open


class KeyedVectors:
    """Words and their vectors (`vectors[i]` belongs to `words[i]`), with gensim-like queries."""

    def __init__(self, words: list[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ValueError(f"vectors shape {vectors.shape} does not match {len(words)} words")
        self.words = list(words)
        self.vectors = vectors
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("duplicate words in the vocabulary")
        self._unit: np.ndarray | None = None

    @property
    def vector_size(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def _id(self, word: str) -> int:
        try:
            return self.index[word]
        except KeyError:
            raise KeyError(f"word {word!r} is not in the vocabulary") from None

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self._id(word)]

    @property
    def unit_vectors(self) -> np.ndarray:
        """Rows scaled to length 1 (zero rows stay zero); cached — call `reset_cache()` after editing vectors."""
        if self._unit is None:
            norm = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = self.vectors / np.where(norm > 0, norm, 1.0)
        return self._unit

    def reset_cache(self) -> None:
        self._unit = None

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two words' vectors."""
        u = self.unit_vectors
        return float(u[self._id(a)] @ u[self._id(b)])

    def most_similar(self, positive: str | Iterable[str] = (), negative: Iterable[str] = (),
                     topn: int = 10) -> list[tuple[str, float]]:
        """The `topn` words nearest by cosine to mean(unit(positive)) − mean-weighted unit(negative), the query
        words excluded (3CosAdd; with one positive word this is plain nearest neighbours)."""
        positive = [positive] if isinstance(positive, str) else list(positive)
        negative = list(negative)
        if not positive and not negative:
            raise ValueError("most_similar needs at least one positive or negative word")
        u = self.unit_vectors
        ids = [self._id(w) for w in positive + negative]
        weights = np.array([1.0] * len(positive) + [-1.0] * len(negative), dtype=np.float32)
        query = (u[ids] * weights[:, None]).mean(axis=0)
        query /= max(float(np.linalg.norm(query)), 1e-12)
        scores = u @ query
        scores[ids] = -np.inf
        k = min(topn, len(self.words) - len(set(ids)))
        top = np.argpartition(-scores, k - 1)[:k] if k > 0 else np.array([], dtype=np.int64)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.words[i], float(scores[i])) for i in top]

    def analogy(self, a: str, b: str, c: str, topn: int = 1) -> list[tuple[str, float]]:
        """a : b :: c : ? — e.g. analogy('man', 'king', 'woman') → [('queen', ...)]."""
        return self.most_similar(positive=[b, c], negative=[a], topn=topn)

    # ------------------------------------------------------------------ files
    def save_word2vec_format(self, path: str | Path, binary: bool = False) -> None:
        """Write the word2vec text (or binary) format, atomically."""
        path = Path(path)
        for w in self.words:
            if not w or any(ch.isspace() for ch in w):
                raise ValueError(f"word {w!r} is empty or contains whitespace: the word2vec format cannot hold it")
        with atomic_open(path, "wb") as f:
            f.write(f"{len(self.words)} {self.vector_size}\n".encode())
            vecs = self.vectors.astype("<f4")
            for w, v in zip(self.words, vecs):
                if binary:
                    f.write(w.encode("utf-8") + b" " + v.tobytes() + b"\n")
                else:
                    f.write((w + " " + " ".join(f"{x:.9g}" for x in v) + "\n").encode("utf-8"))

    @classmethod
    def load_word2vec_format(cls, path: str | Path, binary: bool = False) -> KeyedVectors:
        """Read a file written by `save_word2vec_format`, the word2vec C tool or gensim."""
        with open(path, "rb") as f:
            header = f.readline().split()
            if len(header) != 2:
                raise ValueError(f"{path}: first line {header!r} is not 'vocab_size vector_size'")
            n, dim = int(header[0]), int(header[1])
            words: list[str] = []
            vectors = np.empty((n, dim), dtype=np.float32)
            for i in range(n):
                if binary:
                    word = bytearray()
                    while (ch := f.read(1)) != b" ":
                        if not ch:
                            raise ValueError(f"{path}: file ends inside word {i}")
                        if ch != b"\n":  # the newline that ends the previous vector
                            word += ch
                    raw = f.read(4 * dim)
                    if len(raw) != 4 * dim:
                        raise ValueError(f"{path}: file ends inside the vector of word {i}")
                    words.append(word.decode("utf-8"))
                    vectors[i] = np.frombuffer(raw, dtype="<f4")
                else:
                    parts = f.readline().decode("utf-8").rstrip("\n").split(" ")
                    if len(parts) != dim + 1:
                        raise ValueError(f"{path}: line {i + 2} has {len(parts) - 1} numbers, expected {dim}")
                    words.append(parts[0])
                    vectors[i] = np.array(parts[1:], dtype=np.float32)
        return cls(words, vectors)
