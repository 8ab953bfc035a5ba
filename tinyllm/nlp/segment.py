"""Chinese word segmentation the jieba way: prefix dictionary → DAG → max-probability route → HMM for OOV runs.

Notes ch.01 分词 / jieba分词用法及原理. The mechanism, step by step:

1. **Prefix dictionary.** `freq[w]` is the corpus count of word `w`; every proper prefix of a word is also a key
   (freq 0 unless it is a word itself), so "is there any dictionary word that starts with this fragment?" is one
   dict lookup. `total = Σ freq`.
2. **DAG.** For a block `s` and every start `k`, extend `i` while `s[k:i+1]` is a key; each end `i` whose freq is
   > 0 is an edge k → i+1. A position with no word gets the single character as its only edge.
3. **Route.** Unigram model: a segmentation's probability is Π freq(w)/total. Right to left,
   `route[k] = max_{i ∈ DAG[k]} (log(freq(s[k:i+1]) or 1) − log total + route[i+1])`, ties broken toward the
   larger end (jieba compares `(logprob, i)` tuples). Then walk `k → end(k)` from the left.
4. **HMM for unknown words.** Consecutive single characters of the route form a buffer; if the buffer (length ≥ 2)
   is not itself a dictionary word it is re-segmented by a BMES hidden Markov model: hidden states B(egin)
   M(iddle) E(nd) S(ingle), observations = characters, Viterbi over log start/transition/emission probabilities
   (unseen emission = −3.14e100; allowed predecessors B:{E,S} M:{M,B} S:{S,E} E:{B,M}; the path ends in E or S).
   This is how 杭研 in 他来到了网易杭研大厦 is found although no dictionary has it.
5. **Blocks** (`seg_blocks.Patterns`): word-character runs go through steps 1–4, every other character is a token;
   without HMM, adjacent single ASCII letters/digits of the route are glued back ("iPhone", "2024").

Modes: precise (the route), full (every dictionary word of the DAG — jieba's `cut_all`), search (precise, plus
every dictionary 2-gram of words longer than 2 and 3-gram of words longer than 3, emitted before the word).

`Segmenter.from_jieba()` reads jieba's own `dict.txt` and `finalseg/prob_*.py` as data and reproduces
`jieba.cut` token for token; `Segmenter.from_corpus(sentences)` estimates the dictionary and the HMM from a
segmented corpus (e.g. People's Daily 1998). `route_reference` is the literal DAG + tuple-max twin of the fused
fast route; tests check they agree.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tinyllm.atomic import atomic_open
from tinyllm.nlp.seg_blocks import CORPUS_PATTERNS, JIEBA_PATTERNS, NUMBER, USERDICT, Patterns, read_dict_file
from tinyllm.nlp.seg_eval import PRF, read_segmented, segmentation_prf  # noqa: F401 (re-exported)
from tinyllm.nlp.seg_hmm import HMM, MIN_FLOAT, STATES, _bmes, _package_dir, jieba_hmm  # noqa: F401

MODES = ("precise", "full", "search")
FORMAT = "tinyllm-segmenter"


@functools.lru_cache(maxsize=1)
def _jieba_prototype() -> Segmenter:
    freq, total, tags = read_dict_file(_package_dir("jieba") / "dict.txt")
    return Segmenter(freq, jieba_hmm(), total=total, tags=tags)


class Segmenter:
    """Dictionary + HMM word segmenter (jieba's algorithm). See the module docstring for the mechanism."""

    def __init__(self, freq: dict[str, int], hmm: HMM | None = None, *, total: int | None = None,
                 tags: dict[str, str] | None = None, patterns: Patterns = JIEBA_PATTERNS) -> None:
        bad = next(((w, f) for w, f in freq.items() if not isinstance(f, int) or f < 0), None)
        if bad is not None:
            raise ValueError(f"frequency of {bad[0]!r} is {bad[1]!r}; expected an int >= 0")
        self.freq: dict[str, int] = dict(freq)
        self.total = sum(freq.values()) if total is None else int(total)
        self.tags: dict[str, str] = dict(tags or {})
        self.hmm = hmm
        self.force_split: set[str] = set()
        fr = self.freq
        for w in freq:
            for i in range(1, len(w)):
                if w[:i] not in fr:
                    fr[w[:i]] = 0
        # log frequencies for the route: log(freq) for words, None for prefix-only keys
        log = math.log
        self._logf: dict[str, float | None] = {w: (log(f) if f else None) for w, f in fr.items()}
        self._set_patterns(patterns)

    def _set_patterns(self, patterns: Patterns) -> None:
        self.patterns = patterns
        (self._re_block, self._re_skip, self._re_hmm, self._re_hmm_skip, self._eng,
         self._re_number) = patterns.compile()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict_file(cls, path: str | os.PathLike, hmm: HMM | None = None,
                       patterns: Patterns = JIEBA_PATTERNS) -> Segmenter:
        """A dictionary in jieba's `dict.txt` format: one `word freq [tag]` per line (UTF-8)."""
        freq, total, tags = read_dict_file(path)
        return cls(freq, hmm, total=total, tags=tags, patterns=patterns)

    @classmethod
    def from_jieba(cls) -> Segmenter:
        """jieba's `dict.txt` (349,046 words) and `finalseg` HMM tables, read from the installed jieba package.
        The parsed files are cached per process; each call returns an independent segmenter (edits to one do
        not leak into another)."""
        return _jieba_prototype().copy()

    def copy(self) -> Segmenter:
        """An independent copy (dictionary, tags, forced splits; the HMM tables are shared, read-only)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.freq, new._logf, new.tags = dict(self.freq), dict(self._logf), dict(self.tags)
        new.force_split = set(self.force_split)
        return new

    @classmethod
    def from_corpus(cls, sentences: Iterable[Iterable[str]], min_freq: int = 1, hmm: str | None = "oov",
                    folds: int = 5, mix: float = 0.01, emit_alpha: float = 0.0,
                    patterns: Patterns = CORPUS_PATTERNS, progress: bool = False) -> Segmenter:
        """Dictionary and HMM estimated from segmented text (a list of word lists per sentence).

        freq(w) = corpus count of w (words seen fewer than `min_freq` times are dropped, except single
        characters). The HMM (BMES, `HMM.estimate`):
        - hmm="all": counted on every word of the corpus (the textbook estimate);
        - hmm="oov" (default): counted where it will be used — on the single-character buffers the route leaves
          for unknown words. The corpus is cut into `folds` parts; each part is segmented (no HMM) with a
          dictionary built from the other parts, and the gold words inside its OOV buffers are counted. A model
          counted on all words learns that 一 starts words (一九九八年) and glues 一/年 back together; a model
          counted on real OOV buffers learns names, numbers and new words instead. The all-words counts are
          added with weight `mix` so that every character has an emission. `progress` shows a bar over folds.
        - hmm=None: no HMM (OOV buffers stay single characters).
        """
        if min_freq < 1:
            raise ValueError(f"min_freq={min_freq} must be >= 1")
        if hmm not in ("oov", "all", None):
            raise ValueError(f"hmm={hmm!r} is not one of ['oov', 'all', None]")
        if folds < 2:
            raise ValueError(f"folds={folds} must be >= 2")
        num = patterns.compile()[-1]
        sents = [[(num.sub(NUMBER, w) if num is not None else w) for w in s if w and not w.isspace()]
                 for s in sentences]
        counts = Counter(w for s in sents for w in s)
        if not counts:
            raise ValueError("from_corpus got no words")

        def dictionary(c: Counter) -> dict[str, int]:
            return {w: n for w, n in c.items() if n >= min_freq or len(w) == 1}

        model = None
        if hmm == "all":
            model = HMM.estimate(sents, alpha=emit_alpha)
        elif hmm == "oov":
            buffers: list[list[str]] = []
            from tqdm import tqdm

            for f in tqdm(range(folds), desc="HMM folds", unit="fold", disable=not progress):
                part = [s for i, s in enumerate(sents) if i % folds == f]
                rest = counts - Counter(w for s in part for w in s)
                if not rest:
                    continue
                seg = cls(dictionary(rest), None, patterns=patterns)
                for words in part:
                    buffers.extend(seg._gold_in_buffers(words))
            start, trans, emit = HMM.count(buffers)
            a_start, a_trans, a_emit = HMM.count(sents)
            for mine, allc in ((start, a_start), *zip(trans.values(), a_trans.values()),
                               *zip(emit.values(), a_emit.values())):
                for k, v in allc.items():
                    mine[k] += mix * v
            model = HMM.from_counts(start, trans, emit, alpha=emit_alpha)
        return cls(dictionary(counts), model, patterns=patterns)

    def oov_buffers(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of the runs the HMM would decode: ≥ 2 consecutive single characters of the route inside
        a dictionary block that are not themselves a dictionary word. `text` is taken as the dictionary sees it
        (with a number pattern: digit runs already replaced by NUMBER, see `normalize_numbers`)."""
        out = []
        offset = 0
        for i, blk in enumerate(self._re_block.split(text)):
            if i % 2 and blk:
                ends = self.route(blk)
                x, run = 0, -1
                n = len(blk)
                while x <= n:
                    y = ends[x] if x < n else n + 1
                    if y - x == 1 and x < n:
                        run = x if run < 0 else run
                    else:
                        if run >= 0 and x - run >= 2 and not self.freq.get(blk[run:x]):
                            out.append((offset + run, offset + x))
                        run = -1
                    if x == n:
                        break
                    x = y
            offset += len(blk)
        return out

    def _gold_in_buffers(self, words: list[str]) -> list[list[str]]:
        """The gold words inside each OOV buffer of the joined sentence (words cut at the buffer's edges)."""
        text = "".join(words)
        bounds = [0]
        for w in words:
            bounds.append(bounds[-1] + len(w))
        out = []
        for a, b in self.oov_buffers(text):
            inside = bounds[bisect.bisect_right(bounds, a):bisect.bisect_left(bounds, b)]
            cuts = [a, *inside, b]
            out.append([text[i:j] for i, j in itertools.pairwise(cuts)])
        return out

    # ------------------------------------------------------------------ dictionary edits
    @property
    def num_words(self) -> int:
        return sum(1 for f in self.freq.values() if f)

    def add_word(self, word: str, freq: int | None = None, tag: str | None = None) -> None:
        """Add (or re-weight) a word. Without `freq`, `suggest_freq(word)` — just enough to be cut out whole.
        Like jieba, `total` grows by `freq` and every prefix becomes a key; freq 0 deletes the word and forces
        the HMM to split it too. With a number pattern, digit runs are stored as the placeholder."""
        if not word:
            raise ValueError("add_word needs a non-empty word")
        freq = int(freq) if freq is not None else self.suggest_freq(word)
        if freq < 0:
            raise ValueError(f"freq={freq} must be >= 0")
        word = self.normalize_numbers(word)
        self.freq[word] = freq
        self._logf[word] = math.log(freq) if freq else None
        self.total += freq
        if tag:
            self.tags[word] = tag
        for i in range(1, len(word)):
            if word[:i] not in self.freq:
                self.freq[word[:i]] = 0
                self._logf[word[:i]] = None
        if freq == 0:
            self.force_split.add(word)
        else:
            self.force_split.discard(word)

    def del_word(self, word: str) -> None:
        self.add_word(word, 0)

    def suggest_freq(self, segment: str | Iterable[str], tune: bool = False) -> int:
        """jieba's frequency suggestion. A string: the smallest freq that makes it beat its current no-HMM
        segmentation, max(int(total·Π p(piece)) + 1, freq(word)). A sequence of pieces: the largest freq that
        lets the pieces win, min(int(total·Π p(piece)), freq(word)). `tune=True` also applies it."""
        ftotal = float(self.total)
        p = 1.0
        norm = self.normalize_numbers
        if isinstance(segment, str):
            word = segment
            for piece in self.cut(word, hmm=False):
                p *= self.freq.get(norm(piece), 1) / ftotal
            freq = max(int(p * self.total) + 1, self.freq.get(norm(word), 1))
        else:
            pieces = tuple(segment)
            word = "".join(pieces)
            for piece in pieces:
                p *= self.freq.get(norm(piece), 1) / ftotal
            freq = min(int(p * self.total), self.freq.get(norm(word), 0))
        if tune:
            self.add_word(word, freq)
        return freq

    def load_userdict(self, source: str | os.PathLike | Iterable[str]) -> None:
        """Lines `word [freq] [tag]` (a path or an iterable of lines); omitted freq = suggest_freq(word)."""
        lines = Path(source).read_text(encoding="utf-8").splitlines() if isinstance(source, (str, os.PathLike)) \
            else source
        for line in lines:
            line = line.strip().lstrip("\ufeff")
            if not line:
                continue
            word, freq, tag = USERDICT.match(line).groups()  # type: ignore[union-attr]
            self.add_word(word, int(freq) if freq else None, tag.strip() if tag else None)

    # ------------------------------------------------------------------ DAG and route
    def get_dag(self, sentence: str) -> dict[int, list[int]]:
        """{start: [inclusive end of every dictionary word starting there]} (jieba's `get_DAG`)."""
        dag: dict[int, list[int]] = {}
        n = len(sentence)
        for k in range(n):
            ends = []
            i = k
            frag = sentence[k]
            while i < n and frag in self.freq:
                if self.freq[frag]:
                    ends.append(i)
                i += 1
                frag = sentence[k:i + 1]
            dag[k] = ends or [k]
        return dag

    def dag_lists(self, sentence: str) -> list[list[int]]:
        """`get_dag` as a list, one lookup per fragment in the log-frequency table (the fast twin; tests check
        equality)."""
        get = self._logf.get
        n = len(sentence)
        out = []
        for k in range(n):
            ends = []
            j = k + 1
            lf = get(sentence[k], False)
            while lf is not False:
                if lf is not None:
                    ends.append(j - 1)
                if j == n:
                    break
                j += 1
                lf = get(sentence[k:j], False)
            out.append(ends or [k])
        return out

    def route_reference(self, sentence: str) -> list[tuple[float, int]]:
        """route[k] = max over (log p(word k..x) + route[x+1], x), built from the explicit DAG (the naive twin)."""
        n = len(sentence)
        dag = self.get_dag(sentence)
        route: list[tuple[float, int]] = [(0.0, 0)] * (n + 1)
        logtotal = math.log(self.total)
        for k in range(n - 1, -1, -1):
            route[k] = max((math.log(self.freq.get(sentence[k:x + 1]) or 1) - logtotal + route[x + 1][0], x)
                           for x in dag[k])
        return route

    def route(self, sentence: str) -> list[int]:
        """ends[k] = exclusive end of the best word starting at k. DAG construction and the right-to-left DP fused
        into one pass over precomputed log frequencies; same floats and tie-break as `route_reference`."""
        n = len(sentence)
        score = [0.0] * (n + 1)
        ends = [0] * (n + 1)
        get = self._logf.get
        logtotal = math.log(self.total)
        for k in range(n - 1, -1, -1):
            best = None
            bend = k + 1
            j = k + 1
            lf = get(sentence[k], False)
            while lf is not False:
                if lf is not None:
                    p = lf - logtotal + score[j]
                    if best is None or p >= best:  # >= : later ends win ties, as in jieba's tuple max
                        best = p
                        bend = j
                if j == n:
                    break
                j += 1
                lf = get(sentence[k:j], False)
            if best is None:
                best = 0.0 - logtotal + score[k + 1]
            score[k] = best
            ends[k] = bend
        return ends

    # ------------------------------------------------------------------ block cutters
    def _hmm_cut(self, buf: str, out: list[str]) -> None:
        """An OOV buffer: Viterbi over its HMM-able runs; numbers/latin runs and other characters pass through."""
        if self.hmm is None:
            out.extend(buf)
            return
        parts = self._re_hmm.split(buf)
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2:
                tags = self.hmm.viterbi(part)
                begin = 0
                for j, t in enumerate(tags):
                    if t == "B":
                        begin = j
                    elif t == "E" or t == "S":
                        w = part[begin:j + 1] if t == "E" else part[j]
                        if w in self.force_split:
                            out.extend(w)
                        else:
                            out.append(w)
            else:
                out.extend(x for x in self._re_hmm_skip.split(part) if x)

    def _cut_hmm(self, block: str, out: list[str]) -> None:
        ends = self.route(block)
        n = len(block)
        freq = self.freq
        x = 0
        buf_start = -1
        while x < n:
            y = ends[x]
            if y - x == 1:
                if buf_start < 0:
                    buf_start = x
            else:
                if buf_start >= 0:
                    buf = block[buf_start:x]
                    if len(buf) == 1:
                        out.append(buf)
                    elif not freq.get(buf):
                        self._hmm_cut(buf, out)
                    else:
                        out.extend(buf)
                    buf_start = -1
                out.append(block[x:y])
            x = y
        if buf_start >= 0:
            buf = block[buf_start:]
            if len(buf) == 1:
                out.append(buf)
            elif not freq.get(buf):
                self._hmm_cut(buf, out)
            else:
                out.extend(buf)

    def _cut_no_hmm(self, block: str, out: list[str]) -> None:
        ends = self.route(block)
        n = len(block)
        eng = self._eng
        x = 0
        buf_start = -1
        while x < n:
            y = ends[x]
            if y - x == 1 and block[x] in eng:
                if buf_start < 0:
                    buf_start = x
            else:
                if buf_start >= 0:
                    out.append(block[buf_start:x])
                    buf_start = -1
                out.append(block[x:y])
            x = y
        if buf_start >= 0:
            out.append(block[buf_start:])

    def _cut_full(self, block: str, out: list[str], src: str = "", pos: list[int] | None = None) -> None:
        """jieba's cut_all walk: every dictionary word of the DAG; a position covered by no longer word gives its
        single character, and such single latin letters/digits are glued into one token. With `pos` (number
        placeholders) the word block[a:b] is emitted as src[pos[a]:pos[b]]."""
        dag = self.dag_lists(block)
        eng = self._eng
        last = -1  # inclusive end of the last emitted word
        eng_buf = None
        for k in range(len(block)):
            ends = dag[k]
            if eng_buf is not None and block[k] not in eng:
                out.append(eng_buf)
                eng_buf = None
            if len(ends) == 1 and k > last:
                e = ends[0] + 1
                word = block[k:e] if pos is None else src[pos[k]:pos[e]]
                if block[k] in eng:
                    eng_buf = word if eng_buf is None else eng_buf + word
                else:
                    out.append(word)
                last = e - 1
            else:
                for j in ends:
                    if j > k:
                        out.append(block[k:j + 1] if pos is None else src[pos[k]:pos[j + 1]])
                        last = j
        if eng_buf is not None:
            out.append(eng_buf)

    def _cut_numbers(self, block: str, cut_block, out: list[str], full: bool) -> None:
        """Replace each digit run by NUMBER, segment, and give every word its original characters back."""
        runs = list(self._re_number.finditer(block))
        if not runs:
            cut_block(block, out)
            return
        pieces: list[str] = []
        pos: list[int] = []  # pos[i] = index in `block` of normalized character i
        last = 0
        for m in runs:
            pieces.append(block[last:m.start()])
            pos.extend(range(last, m.start()))
            pieces.append(NUMBER)
            pos.append(m.start())
            last = m.end()
        pieces.append(block[last:])
        pos.extend(range(last, len(block) + 1))
        norm = "".join(pieces)
        if full:
            self._cut_full(norm, out, block, pos)
            return
        words: list[str] = []
        cut_block(norm, words)
        a = 0
        for w in words:
            b = a + len(w)
            out.append(w if NUMBER not in w else block[pos[a]:pos[b]])
            a = b

    def normalize_numbers(self, word: str) -> str:
        """A word as the dictionary stores it: digit runs replaced by NUMBER (unchanged without `number`)."""
        return self._re_number.sub(NUMBER, word) if self._re_number is not None else word

    # ------------------------------------------------------------------ public API
    def cut(self, text: str, mode: str = "precise", hmm: bool = True) -> list[str]:
        """Words of `text`. mode: "precise" | "full" | "search"; `hmm` (precise/search) decodes OOV buffers.
        Equal to `jieba.lcut(text, cut_all=mode == "full", HMM=hmm)` / `jieba.lcut_for_search` with jieba's
        resources, except that full mode never emits the empty strings jieba's `cut_all` yields around spaces."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
        if mode == "search":
            return self._search(self.cut(text, "precise", hmm))
        full = mode == "full"
        if self.total <= 0:
            raise ValueError("the dictionary is empty (total frequency 0)")
        cut_block = self._cut_full if full else (self._cut_hmm if hmm else self._cut_no_hmm)
        out: list[str] = []
        re_skip = self._re_skip
        for i, blk in enumerate(self._re_block.split(text)):
            if not blk:
                continue
            if i % 2:
                if self._re_number is None:
                    cut_block(blk, out)
                else:
                    self._cut_numbers(blk, cut_block, out, full)
                continue
            for j, x in enumerate(re_skip.split(blk)):
                if not x:
                    continue
                if j % 2 or full:
                    out.append(x)
                else:
                    out.extend(x)
        return out

    def _search(self, words: list[str]) -> list[str]:
        freq = self.freq
        out: list[str] = []
        for w in words:
            n = len(w)
            if n > 2:
                out.extend(g for g in (w[i:i + 2] for i in range(n - 1)) if freq.get(g))
            if n > 3:
                out.extend(g for g in (w[i:i + 3] for i in range(n - 2)) if freq.get(g))
            out.append(w)
        return out

    def lcut(self, text: str, mode: str = "precise", hmm: bool = True) -> list[str]:
        return self.cut(text, mode, hmm)

    def tokenize(self, text: str, mode: str = "precise", hmm: bool = True) -> list[tuple[str, int, int]]:
        """(word, start, end) character offsets. "precise": the cut, tiling the text; "search": also the
        dictionary 2/3-grams inside long words, at their own offsets (jieba's `tokenize(mode="search")`)."""
        if mode == "default":
            mode = "precise"
        if mode not in ("precise", "search"):
            raise ValueError(f"tokenize mode={mode!r} is not one of ['precise', 'search']")
        out: list[tuple[str, int, int]] = []
        start = 0
        freq = self.freq
        for w in self.cut(text, "precise", hmm):
            n = len(w)
            if mode == "search":
                if n > 2:
                    out.extend((w[i:i + 2], start + i, start + i + 2) for i in range(n - 1) if freq.get(w[i:i + 2]))
                if n > 3:
                    out.extend((w[i:i + 3], start + i, start + i + 3) for i in range(n - 2) if freq.get(w[i:i + 3]))
            out.append((w, start, start + n))
            start += n
        return out

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        implied = set()
        for w, f in self.freq.items():
            if f:
                implied.update(w[:i] for i in range(1, len(w)))
        return {"format": FORMAT, "version": 1, "total": self.total,
                "words": [[w, f] for w, f in self.freq.items() if f],
                "zero": sorted(w for w, f in self.freq.items() if not f and w not in implied),
                "tags": self.tags, "force_split": sorted(self.force_split),
                "patterns": vars(self.patterns), "hmm": self.hmm.to_json() if self.hmm else None}

    @classmethod
    def from_json(cls, data: dict) -> Segmenter:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saved segmenter (format={data.get('format')!r}, expected {FORMAT!r})")
        freq = {w: int(f) for w, f in data["words"]}
        for w in data.get("zero", []):
            freq[w] = 0
        hmm = HMM(**data["hmm"]) if data.get("hmm") else None
        seg = cls(freq, hmm, total=int(data["total"]), tags=data.get("tags"), patterns=Patterns(**data["patterns"]))
        seg.force_split = set(data.get("force_split", []))
        return seg

    def save(self, path: str | os.PathLike) -> Path:
        """gzip-compressed JSON, written atomically."""
        path = Path(path)
        payload = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        with atomic_open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(payload)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Segmenter:
        path = Path(path)
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a segmenter from {path}: {e}") from None
        return cls.from_json(data)

    def __repr__(self) -> str:
        return f"Segmenter(words={self.num_words:,}, total={self.total:,}, hmm={self.hmm is not None})"
