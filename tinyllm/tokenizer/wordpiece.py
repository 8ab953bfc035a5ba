"""WordPiece: BERT's tokenizer -- basic tokenization, greedy longest-match-first encoding and likelihood-score
training (notes ch.02.4 c; Schuster & Nakajima 2012, Wu et al. 2016 "GNMT", Devlin et al. 2019 "BERT").

Encoding (what BERT checkpoints expect; ids equal transformers' `BertTokenizerFast`):
1. basic tokenization (`BertNormalizer` + `BertPreTokenizer` in HF `tokenizers`), on characters, each remembering
   the original character it came from (so offsets point into the caller's string):
   - clean: drop NUL, U+FFFD and control, format, private-use and surrogate characters (Cc, Cf, Co, Cs; but
     keep \\t \\n \\r; unassigned code points stay, as in HF), turn
     every whitespace character into a space;
   - CJK: put spaces around each CJK ideograph (the CJK Unified Ideograph blocks and extensions, compatibility
     ideographs), so Chinese is split into single characters -- BERT's Chinese vocabulary is characters;
   - strip accents (default: when lower-casing): canonical decomposition (NFD), drop non-spacing marks (Mn):
     "Héllo" -> "Hello";
   - lower-case character by character (no context-dependent final sigma);
   - split on whitespace (dropped) and punctuation (kept as its own word): Unicode P* categories plus every ASCII
     symbol (`$ + < = > ^ \\` | ~` are symbols in Unicode but punctuation to BERT).
2. greedy longest-match-first per word: take the longest vocabulary entry that starts the rest of the word,
   continuation pieces spelled with `##` ("unaffable" -> un ##aff ##able); a word with a position no entry
   matches, or longer than `max_input_chars_per_word` (100) characters, becomes one [UNK].
3. post-processing: [CLS] A [SEP] (pairs: [CLS] A [SEP] B [SEP], token types 0 then 1).

Decoding joins pieces with spaces, glues `##` pieces to the previous one and (cleanup) removes the space before
`. ? ! ,` and English contractions, as HF's WordPiece decoder does. Lower-casing and accents are not undone.

Training (`wordpiece_train.train_wordpiece`): start from characters (word-initial `c`, continuation `##c`), repeatedly merge the
adjacent pair with the largest likelihood score

    score(a, b) = freq(ab) / (freq(a) * freq(b))

(the merge that raises the corpus log-likelihood Σ log P(t_i) most, relative to the parts' own frequencies:
log P(ab) - log P(a) - log P(b) up to a constant), unlike BPE which takes the most frequent pair. Ties: higher
pair frequency, then the lexicographically smallest pair. `train_wordpiece_naive` recounts everything each step
(the oracle); `train_wordpiece` updates counts only in the words a merge touches. HF's `WordPieceTrainer` is BPE
internally, so training is tested by hand-checked merges, not against it.

Not covered: the slow tokenizer's `never_split`, HF's non-special added tokens, truncation and padding.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tinyllm.atomic import atomic_write_files
from tinyllm.tokenizer.bpe import split_special

# Rust's char::is_whitespace (the Unicode White_Space property), which HF `tokenizers` uses
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                        + "".join(chr(c) for c in range(0x2000, 0x200B)))
_ASCII_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_REMOVED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs"})  # "other" except unassigned (Cn), which HF keeps
SPECIAL_NAMES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def is_cjk(ch: str) -> bool:
    """A CJK ideograph in BERT's sense (Hangul, kana and CJK punctuation are not)."""
    c = ord(ch)
    return any(lo <= c <= hi for lo, hi in _CJK_RANGES)


def is_punctuation(ch: str) -> bool:
    """BERT punctuation: any ASCII non-alphanumeric printable symbol, or a Unicode P* character."""
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _is_removed(ch: str) -> bool:
    return ch in "\x00\ufffd" or (ch not in "\t\n\r" and unicodedata.category(ch) in _REMOVED_CATEGORIES)


def normalize_aligned(text: str, lowercase: bool = True, strip_accents: bool | None = None,
                      clean_text: bool = True, handle_chinese_chars: bool = True) -> list[tuple[str, int]]:
    """BERT normalization as (character, index of the original character it came from) pairs, in the order
    HF's BertNormalizer applies them: clean, separate CJK, strip accents (NFD, drop Mn), lower-case.
    `strip_accents=None` follows `lowercase` (BERT's rule)."""
    strip = lowercase if strip_accents is None else strip_accents
    chars: list[tuple[str, int]] = []
    for i, ch in enumerate(text):
        if clean_text:
            if _is_removed(ch):
                continue
            if ch in _WHITESPACE:
                ch = " "
        if handle_chinese_chars and is_cjk(ch):
            chars += [(" ", i), (ch, i), (" ", i)]
        else:
            chars.append((ch, i))
    if strip:
        chars = _strip_accents(chars)
    if lowercase:
        chars = [(c, i) for ch, i in chars for c in ch.lower()]
    return chars


def _strip_accents(chars: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """NFD, then drop the non-spacing marks (category Mn).

    NFD decomposes each character (its first part replaces it, the others are inserted after it) and orders every
    run of combining marks by combining class (stable). Alignments follow HF's NormalizedString: walking the
    result, a replacing part takes the next input character's origin and an inserted part the origin of the last
    input character taken -- so a mark that moves keeps its kind, not its own origin. This only shows when a
    spacing mark (Mc) with a combining class survives the reordering, e.g. "â" + U+302E."""
    parts: list[tuple[str, bool]] = []  # (character, inserted?)
    for ch, _ in chars:
        d = unicodedata.normalize("NFD", ch)
        parts += [(d[0], False), *((c, True) for c in d[1:])]
    k = 0
    while k < len(parts):
        if unicodedata.combining(parts[k][0]):
            j = k
            while j < len(parts) and unicodedata.combining(parts[j][0]):
                j += 1
            parts[k:j] = sorted(parts[k:j], key=lambda p: unicodedata.combining(p[0]))
            k = j
        k += 1
    out, taken = [], 0
    for c, inserted in parts:
        if not inserted:
            taken += 1
        origin = chars[max(taken - 1, 0)][1]
        if unicodedata.category(c) != "Mn":
            out.append((c, origin))
    return out


def pre_tokenize(chars: Sequence[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """BertPreTokenizer: split on whitespace (dropped) and punctuation (each one its own word)."""
    words: list[list[tuple[str, int]]] = []
    cur: list[tuple[str, int]] = []
    for item in chars:
        ch = item[0]
        if ch in _WHITESPACE or is_punctuation(ch):
            if cur:
                words.append(cur)
                cur = []
            if ch not in _WHITESPACE:
                words.append([item])
        else:
            cur.append(item)
    if cur:
        words.append(cur)
    return words


def basic_tokenize(text: str, lowercase: bool = True, strip_accents: bool | None = None,
                   clean_text: bool = True, handle_chinese_chars: bool = True) -> list[str]:
    """The words BERT's basic tokenizer makes of `text` (normalized, split; before WordPiece)."""
    chars = normalize_aligned(text, lowercase, strip_accents, clean_text, handle_chinese_chars)
    return ["".join(c for c, _ in w) for w in pre_tokenize(chars)]


@dataclass
class WordPieceEncoding:
    """ids, token strings, (start, end) character offsets into the input (special tokens: (0, 0)), token types."""

    ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)
    type_ids: list[int] = field(default_factory=list)

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.ids)


class WordPieceTokenizer:
    """A WordPiece vocabulary (id = line of vocab.txt) with BERT's basic tokenization and special tokens.

    Interface as `interface.Tokenizer`: `encode(text, allowed_special, add_special_tokens)` -- special-token
    spellings are text unless allowed; add_special_tokens wraps the ids in [CLS] ... [SEP] --, `decode`, special
    ids, `save(dir)`; plus `encode_plus` (pairs, offsets, token types) and `tokenize` (piece strings)."""

    def __init__(self, vocab: Sequence[str] | Mapping[str, int], unk_token: str = "[UNK]",
                 continuing_subword_prefix: str = "##", max_input_chars_per_word: int = 100,
                 lowercase: bool = True, strip_accents: bool | None = None, clean_text: bool = True,
                 handle_chinese_chars: bool = True, special_tokens: Collection[str] | None = None,
                 cls_token: str | None = "[CLS]", sep_token: str | None = "[SEP]", pad_token: str | None = "[PAD]",
                 mask_token: str | None = "[MASK]", bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, cleanup: bool = True) -> None:
        if isinstance(vocab, Mapping):
            self.vocab = dict(vocab)
        else:
            self.vocab = {}
            for i, tok in enumerate(vocab):
                self.vocab.setdefault(tok, i)  # a repeated line keeps its first id (as HF does)
        if not self.vocab:
            raise ValueError("empty WordPiece vocabulary")
        if unk_token not in self.vocab:
            raise ValueError(f"unk_token={unk_token!r} is not in the vocabulary")
        if max_input_chars_per_word < 1:
            raise ValueError(f"max_input_chars_per_word={max_input_chars_per_word} must be >= 1")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.unk_token, self.prefix = unk_token, continuing_subword_prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self.clean_text, self.handle_chinese_chars, self.cleanup = clean_text, handle_chinese_chars, cleanup
        self.cls_token, self.sep_token, self.pad_token, self.mask_token = cls_token, sep_token, pad_token, mask_token
        names = SPECIAL_NAMES if special_tokens is None else tuple(special_tokens)
        names = (*names, *(t for t in (unk_token, cls_token, sep_token, pad_token, mask_token, bos_token, eos_token)
                           if t is not None))
        self._special = {t: self.vocab[t] for t in names if t in self.vocab}
        for name, tok in (("cls_token", cls_token), ("sep_token", sep_token), ("pad_token", pad_token),
                          ("mask_token", mask_token), ("bos_token", bos_token), ("eos_token", eos_token)):
            if tok is not None and tok not in self.vocab:
                if name in ("bos_token", "eos_token"):
                    raise ValueError(f"{name}={tok!r} is not in the vocabulary")
                setattr(self, name, None)  # a vocabulary without [MASK] etc.: that role is absent
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.add_bos_token = False
        self._longest = max(len(t[len(self.prefix):]) if t.startswith(self.prefix) else len(t) for t in self.vocab)

    # --- interface -----------------------------------------------------------------------------------------
    @property
    def special_tokens(self) -> Mapping[str, int]:
        return dict(self._special)

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def _id(self, tok: str | None) -> int | None:
        return None if tok is None else self.vocab[tok]

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int:
        return self.vocab[self.unk_token]

    @property
    def cls_token_id(self) -> int | None:
        return self._id(self.cls_token)

    @property
    def sep_token_id(self) -> int | None:
        return self._id(self.sep_token)

    # --- encoding ------------------------------------------------------------------------------------------
    def wordpiece(self, word: str) -> list[tuple[str, int, int]]:
        """Greedy longest-match-first on one word: [(piece, start, end)] in characters of the word;
        [(unk, 0, len)] when the word is too long or some position has no matching entry."""
        n = len(word)
        if n > self.max_input_chars_per_word:
            return [(self.unk_token, 0, n)]
        out, start, vocab = [], 0, self.vocab
        while start < n:
            for end in range(min(n, start + self._longest), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in vocab:
                    out.append((piece, start, end))
                    start = end
                    break
            else:
                return [(self.unk_token, 0, n)]
        return out

    def _encode_text(self, text: str, base: int, enc: WordPieceEncoding, type_id: int) -> None:
        chars = normalize_aligned(text, self.lowercase, self.strip_accents, self.clean_text,
                                  self.handle_chinese_chars)
        for word in pre_tokenize(chars):
            spelling = "".join(c for c, _ in word)
            for piece, s, e in self.wordpiece(spelling):
                enc.tokens.append(piece)
                enc.ids.append(self.vocab[piece])
                enc.offsets.append((base + word[s][1], base + word[e - 1][1] + 1))
                enc.type_ids.append(type_id)

    def _encode_segment(self, text: str, allowed_special: Collection[str] | Literal["all"], type_id: int,
                        enc: WordPieceEncoding) -> None:
        pos = 0
        for piece, special in split_special(text, allowed_special, self._special):
            if special is None:
                self._encode_text(piece, pos, enc, type_id)
            else:
                enc.ids.append(special)
                enc.tokens.append(piece)
                enc.offsets.append((pos, pos + len(piece)))
                enc.type_ids.append(type_id)
            pos += len(piece)

    def _add_special(self, enc: WordPieceEncoding, tok: str | None, type_id: int) -> None:
        if tok is None:
            raise ValueError("add_special_tokens needs cls_token and sep_token in the vocabulary")
        enc.ids.append(self.vocab[tok])
        enc.tokens.append(tok)
        enc.offsets.append((0, 0))
        enc.type_ids.append(type_id)

    def encode_plus(self, text: str, pair: str | None = None, add_special_tokens: bool = True,
                    allowed_special: Collection[str] | Literal["all"] = "all") -> WordPieceEncoding:
        """Everything BertTokenizerFast returns for one text or a pair: ids, tokens, offsets (into each text),
        token types. Defaults as HF: special tokens added, special-token spellings in the text recognised."""
        enc = WordPieceEncoding()
        if add_special_tokens:
            self._add_special(enc, self.cls_token, 0)
        self._encode_segment(text, allowed_special, 0, enc)
        if add_special_tokens:
            self._add_special(enc, self.sep_token, 0)
        if pair is not None:
            self._encode_segment(pair, allowed_special, 1, enc)
            if add_special_tokens:
                self._add_special(enc, self.sep_token, 1)
        return enc

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = (),
               add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token spellings are text unless `allowed_special` lists them ("all");
        `add_special_tokens` gives [CLS] ... [SEP], the input a BERT model expects."""
        return self.encode_plus(text, None, add_special_tokens, allowed_special).ids

    def tokenize(self, text: str) -> list[str]:
        """Piece strings of `text` (no [CLS]/[SEP])."""
        return self.encode_plus(text, None, False, ()).tokens

    # --- decoding ------------------------------------------------------------------------------------------
    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        try:
            return [self.id_to_token[i] for i in ids]
        except KeyError as e:
            raise ValueError(f"unknown token id {e.args[0]!r}") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Pieces joined by spaces, `##` pieces glued on, then HF's cleanup of spaces before punctuation."""
        specials = set(self._special.values())
        tokens = self.convert_ids_to_tokens(i for i in ids if not (skip_special_tokens and i in specials))
        out = []
        for k, tok in enumerate(tokens):
            if k > 0:
                tok = tok[len(self.prefix):] if tok.startswith(self.prefix) else " " + tok
            out.append(_cleanup(tok) if self.cleanup else tok)
        return "".join(out)

    # --- files ---------------------------------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, **kwargs: Any) -> WordPieceTokenizer:
        """A BERT `vocab.txt`: one token per line, the id is the line number."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls([line.rstrip("\r") for line in lines], **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordPieceTokenizer:
        """A BERT checkpoint directory (tokenizer.json, else vocab.txt; tokenizer_config.json beside), a BERT
        `tokenizer.json` or a `vocab.txt`. Raises ValueError for a tokenizer.json that is not BERT's pipeline
        (BertNormalizer, BertPreTokenizer, WordPiece model), so callers can fall back."""
        from tinyllm.tokenizer.bpe_io import read_tokenizer_config

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        cfg = read_tokenizer_config(directory)
        if path.is_dir():
            path = path / "tokenizer.json" if (path / "tokenizer.json").exists() else path / "vocab.txt"
        if not path.exists():
            raise ValueError(f"{path}: no such file")
        if path.suffix == ".json":
            return cls._from_tokenizer_json(path, cfg)
        options = _config_options(cfg)
        return cls.from_vocab_file(path, **options)

    @classmethod
    def _from_tokenizer_json(cls, file: Path, cfg: Mapping[str, Any]) -> WordPieceTokenizer:
        spec = json.loads(file.read_text(encoding="utf-8"))
        model, norm = spec.get("model") or {}, spec.get("normalizer") or {}
        if model.get("type") != "WordPiece":
            raise ValueError(f"{file}: model type {model.get('type')!r} is not WordPiece")
        if norm.get("type") != "BertNormalizer" or (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            raise ValueError(f"{file}: not BERT's pipeline (normalizer {norm.get('type')!r}, pre-tokenizer "
                             f"{(spec.get('pre_tokenizer') or {}).get('type')!r})")
        decoder = spec.get("decoder") or {"type": "WordPiece", "prefix": model.get("continuing_subword_prefix", "##"),
                                          "cleanup": True}
        if decoder.get("type") != "WordPiece":
            raise ValueError(f"{file}: decoder {decoder.get('type')!r} is not WordPiece")
        vocab = dict(model["vocab"])
        added = spec.get("added_tokens", [])
        for t in added:
            if vocab.get(t["content"]) != t["id"] or not t.get("special"):
                raise ValueError(f"{file}: added token {t['content']!r} is not a special token of the vocabulary")
        post = spec.get("post_processor") or {}
        cls_tok, sep_tok = "[CLS]", "[SEP]"
        if post.get("type") == "TemplateProcessing":
            single = [next(iter(p.values()))["id"] for p in post["single"]]
            if len(single) != 3 or single[1] != "A":
                raise ValueError(f"{file}: post-processor template {single} is not [CLS] A [SEP]")
            cls_tok, sep_tok = single[0], single[2]
        elif post.get("type") == "BertProcessing":
            sep_tok, cls_tok = post["sep"][0], post["cls"][0]
        elif post:
            raise ValueError(f"{file}: post-processor {post.get('type')!r} is not supported")
        options = _config_options(cfg)
        options.update(lowercase=bool(norm.get("lowercase", True)), strip_accents=norm.get("strip_accents"),
                       clean_text=bool(norm.get("clean_text", True)),
                       handle_chinese_chars=bool(norm.get("handle_chinese_chars", True)),
                       cls_token=cls_tok, sep_token=sep_tok, unk_token=model.get("unk_token", "[UNK]"))
        return cls(vocab, continuing_subword_prefix=model.get("continuing_subword_prefix", "##"),
                   max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
                   special_tokens=[t["content"] for t in added] or None, cleanup=bool(decoder.get("cleanup", True)),
                   **options)

    def to_hf_json(self) -> dict[str, Any]:
        """HF `tokenizers` serialization of this pipeline (BertNormalizer, BertPreTokenizer, WordPiece, template)."""
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t, i in sorted(self._special.items(), key=lambda x: x[1])]
        post = None
        if self.cls_token is not None and self.sep_token is not None:
            c, s = self.cls_token, self.sep_token
            post = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": c, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                               {"SpecialToken": {"id": s, "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": c, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": s, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                             {"SpecialToken": {"id": s, "type_id": 1}}],
                    "special_tokens": {t: {"id": t, "ids": [self.vocab[t]], "tokens": [t]} for t in (c, s)}}
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": {"type": "BertNormalizer", "clean_text": self.clean_text,
                               "handle_chinese_chars": self.handle_chinese_chars,
                               "strip_accents": self.strip_accents, "lowercase": self.lowercase},
                "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": post,
                "decoder": {"type": "WordPiece", "prefix": self.prefix, "cleanup": self.cleanup},
                "model": {"type": "WordPiece", "unk_token": self.unk_token,
                          "continuing_subword_prefix": self.prefix,
                          "max_input_chars_per_word": self.max_input_chars_per_word, "vocab": self.vocab}}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write vocab.txt, tokenizer.json and tokenizer_config.json (together, atomically);
        transformers' AutoTokenizer and `WordPieceTokenizer.load` read the directory."""
        by_id = sorted(self.vocab.items(), key=lambda x: x[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("vocab.txt needs ids 0..n-1 without gaps")
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
                  "strip_accents": self.strip_accents, "tokenize_chinese_chars": self.handle_chinese_chars,
                  "unk_token": self.unk_token, "cls_token": self.cls_token, "sep_token": self.sep_token,
                  "pad_token": self.pad_token, "mask_token": self.mask_token, "clean_up_tokenization_spaces": False}
        for name in ("bos_token", "eos_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = {"vocab.txt": "".join(t + "\n" for t, _ in by_id),
                 "tokenizer.json": json.dumps(self.to_hf_json(), ensure_ascii=False),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
        return atomic_write_files(directory, files)  # all three change together


def _cleanup(s: str) -> str:
    """HF's `clean_up_tokenization`: no space before . ? ! , and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        s = s.replace(a, b)
    return s


def _config_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """WordPieceTokenizer keyword arguments from a BERT tokenizer_config.json."""
    from tinyllm.tokenizer.bpe_io import token_text

    out: dict[str, Any] = {"lowercase": bool(cfg.get("do_lower_case", True)),
                           "strip_accents": cfg.get("strip_accents"),
                           "handle_chinese_chars": bool(cfg.get("tokenize_chinese_chars", True)),
                           "chat_template": cfg.get("chat_template")}
    for key in ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token", "bos_token", "eos_token"):
        value = token_text(cfg.get(key))
        if value is not None:
            out[key] = value
    return out
