"""How the segmenter cuts text into blocks before the dictionary sees it, and jieba's dictionary-file format
(notes ch.01 分词). `Patterns` holds the character classes (jieba's regexes by default, `CORPUS_PATTERNS` for a
model trained on People's Daily); `read_dict_file` reads `word freq [tag]` lines. Used by `nlp.segment`.

Text is first split into runs of "word" characters (Han, ASCII letters/digits, `+#&._%-`) and the rest; each
whitespace character (or a CR LF pair) is a token, and so is every other character."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Patterns:
    """The character classes that cut text into blocks (jieba's regexes by default).

    block: runs segmented by the dictionary; the rest is split by `skip` (each whitespace character or CR LF
    pair is a token; other characters become single tokens, or whole runs in full mode). hmm: inside an OOV
    buffer, runs given to the Viterbi decoder; the rest of the buffer is split into `hmm_skip` matches
    (numbers like 3.14%) and the characters between them. eng: characters glued together in the no-HMM precise and the full modes.
    number: if set, every match inside a block (a digit run like １９９８ or ５８．１) is replaced by the one
    placeholder character NUMBER before the dictionary and the HMM see it, and restored in the output — so a
    corpus-trained model learns "NUMBER年", "NUMBER万", "NUMBER％" once instead of every number it saw.
    """

    block: str = "[\u4e00-\u9fd5a-zA-Z0-9+#&\\._%\\-]+"
    skip: str = "\r\n|\\s"
    hmm: str = "[\u4e00-\u9fd5]+"
    hmm_skip: str = "[a-zA-Z0-9]+(?:\\.\\d+)?%?"
    eng: str = "a-zA-Z0-9"
    number: str | None = None

    def compile(self) -> tuple:
        return _compile(self)


NUMBER = "\ue000"  # placeholder character for a digit run (private-use code point, never in real text)


@functools.lru_cache(maxsize=8)
def _compile(p: Patterns) -> tuple:
    try:
        eng = re.compile(f"[{p.eng}]")
        compiled = [re.compile(f"({x})") for x in (p.block, p.skip, p.hmm, p.hmm_skip)]
        number = re.compile(p.number) if p.number else None
    except re.error as e:
        raise ValueError(f"bad segmentation pattern in {p}: {e}") from None
    eng_chars = frozenset(ch for ch in map(chr, range(0x10000)) if eng.match(ch))
    return (*compiled, eng_chars, number)


JIEBA_PATTERNS = Patterns()
# For a corpus-trained model: full-width digits/letters and the People's-Daily number and dash characters (．％·／—…－) join
# the dictionary blocks and the HMM, since the corpus (not a hand-made rule) knows how they form words.
_FW = "\uff10-\uff19\uff21-\uff3a\uff41-\uff5a"
_DIGIT = "0-9\uff10-\uff19"
CORPUS_PATTERNS = Patterns(
    block=f"[{NUMBER}\u3007\u4e00-\u9fd5{_FW}a-zA-Z0-9+#&\\._%\\-\uff0e\uff05\u00b7\uff0f\u2014\u2026\uff0d]+",
    hmm=f"[{NUMBER}\u3007\u4e00-\u9fd5{_FW}\uff0e\uff05\u00b7\uff0f]+",
    number=f"[{_DIGIT}]+(?:[.\uff0e\u00b7:\uff1a\uff0f/][{_DIGIT}]+)*")


def read_dict_file(path: str | os.PathLike) -> tuple[dict[str, int], int, dict[str, str]]:
    """jieba's `dict.txt` format: `word freq [tag]` per line. A repeated word keeps its last count, and every
    line adds to the total (as jieba's `gen_pfdict` does)."""
    freq: dict[str, int] = {}
    tags: dict[str, str] = {}
    total = 0
    text = Path(path).read_text(encoding="utf-8").lstrip("\ufeff")
    for lineno, line in enumerate(text.split("\n"), 1):
        parts = line.strip().split(" ")
        if parts == [""]:
            continue
        try:
            word, count = parts[0], int(parts[1])
        except (IndexError, ValueError):
            raise ValueError(f"invalid dictionary entry in {path} at line {lineno}: {line.strip()!r}") from None
        freq[word] = count
        total += count
        if len(parts) > 2:
            tags[word] = parts[2]
    return freq, total, tags


USERDICT = re.compile(r"^(.+?)( [0-9]+)?( [a-z]+)?$")
