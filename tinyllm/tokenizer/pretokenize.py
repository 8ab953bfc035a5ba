"""Regex pre-tokenization for byte-level BPE (notes ch.02.4; GPT-2 paper, Radford et al. 2019, sec. 2.2).

Before any merge is learned or applied, text is cut into chunks with a regular expression, and BPE merges never
cross a chunk boundary. This keeps "dog." and "dog!" from becoming separate tokens, keeps numbers apart from
words, and bounds the work (and the cache key) of encoding one chunk.

Patterns (all for the `regex` package, which knows `\\p{L}` and possessive quantifiers):

- ``gpt2``: GPT-2 / RoBERTa / SmolLM2. Contractions, ``" ?"`` + a run of letters, ``" ?"`` + a run of digits (any
  length), ``" ?"`` + a run of punctuation, trailing whitespace.
- ``gpt4``: OpenAI cl100k_base (GPT-3.5/4), exactly as tiktoken ships it. Case-insensitive contractions; one
  optional non-letter (a space, a quote, a CJK full stop...) glued in front of a letter run; digits in groups of
  1-3; newlines kept with the whitespace before them.
- ``llama3``: LLaMA-3's spelling of cl100k without possessive quantifiers (differs only on whitespace runs).
- ``qwen``: Qwen/Qwen2/Qwen2.5 (its ``tiktoken`` file ships with this regex). Like ``gpt4`` but digits are split
  one by one, so "2024" is always 4 tokens and numbers are tokenized consistently.

Chinese: Han characters are letters (``\\p{Lo}``), so in every pattern a run of Han characters with no punctuation
between them is *one* chunk -- in the Qwen pattern a whole clause such as "今天天气很好" up to the next "，" or
"。" (``\\p{P}``; one such mark is glued to the front of the following run: "，用Python写代码"), Latin letters
touching it included. BPE can then learn
multi-character words and frequent phrases as single tokens (a Chinese character is 3 UTF-8 bytes, so the first
merges of a Chinese corpus rebuild whole characters, later ones build words). The cost is long chunks (a word cache hits less often on Chinese than on English). We pick ``qwen`` as
the training default: clause-level chunks for Chinese, single digits for arithmetic-friendly numbers.

Not covered: SentencePiece-style whitespace handling (``▁``) and Unicode normalization (the tokenizer applies
NFC itself when an imported vocabulary asks for it).
"""

from __future__ import annotations

import functools

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s"""
)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# LLaMA-3's tokenizer.json form of cl100k (no possessives), used by GGUF files that say pre="llama-bpe"
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "cl100k": GPT4_PATTERN,
                            "qwen": QWEN_PATTERN, "llama3": LLAMA3_PATTERN}
DEFAULT_PATTERN = "qwen"

# an atom followed by a possessive interval, e.g. \p{N}{1,3}+ (possessive in `regex`, Java and Rust's
# fancy-regex; in Oniguruma's default Ruby syntax "{1,3}+" means "repeat the interval", which is a different regex)
_POSSESSIVE_INTERVAL = regex.compile(r"(\\p\{\w+\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\\[\]{}()|])\{(\d+(?:,\d*)?)\}\+")


def resolve_pattern(pattern: str) -> str:
    """The regex a preset name stands for, or the pattern itself when it is not a preset name."""
    return PATTERNS.get(pattern, pattern)


@functools.lru_cache(maxsize=32)
def compile_pattern(pattern: str) -> regex.Pattern:
    """Compile a preset name or a custom pattern; a bad pattern raises ValueError naming it."""
    source = resolve_pattern(pattern)
    try:
        return regex.compile(source)
    except regex.error as e:
        raise ValueError(f"bad pre-tokenizer pattern {pattern!r}: {e}") from e


def pretokenize(text: str, pattern: str = DEFAULT_PATTERN) -> list[str]:
    """Cut text into the chunks BPE works on; "".join(result) == text for every pattern above."""
    return compile_pattern(pattern).findall(text)


def to_oniguruma(pattern: str) -> str:
    """Rewrite a pattern for the Oniguruma engine behind HF `tokenizers`' Split pre-tokenizer.

    Oniguruma accepts ``?+``, ``*+`` and ``++`` as possessive, but reads ``X{1,3}+`` as "one or more repetitions
    of X{1,3}". An atomic group ``(?>X{1,3})`` is the possessive interval in any engine, so we write that.
    """
    return _POSSESSIVE_INTERVAL.sub(r"(?>\1{\2})", resolve_pattern(pattern))
