"""Preference data for reward models and DPO (notes ch.07.2 DPO, 07.6 RLHF Q2): (prompt, chosen, rejected)
triples, offline builders, JSONL files and tokenization.

Built-in builders (deterministic in `seed`, from the offline inews corpus of `tinyllm.data.corpora`):

- `title`: prompt = "为下面的新闻写一个标题。" + the article; chosen = its own title; rejected = the title of
  another article of the same split (drawn with random.Random(seed)). A model that reads the article can tell
  them apart, so preference accuracy measures whether it does.
- `sentiment`: prompt = the sentiment instruction + the news item (headline, then body); chosen = the correct
  label (积极/中性/消极); rejected = one of the two wrong labels, drawn from the seed.

Prompts use exactly the user text of the SFT tasks (`corpora.sft_examples`), so a model fine-tuned by the
recipe sees familiar inputs. A JSONL file works too: one object per line with string fields `prompt`,
`chosen`, `rejected`.

`ranking_to_pairs` turns one K-way human ranking into the C(K, 2) pairs of InstructGPT's reward-model data.

Tokenization (`tokenize_pairs`): with a chat template the prompt is a user turn rendered with the generation
prompt, and each response is what the template adds for the assistant turn (the reply and its end-of-turn
marker, e.g. `<|im_end|>`); without one, prompt and response are encoded as plain text and the response gets
the EOS token. Too-long pairs lose prompt tokens from the left; the responses are kept whole.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from tinyllm.atomic import atomic_open

PREFERENCE_BUILDERS = ("title", "sentiment")
TITLE_INSTRUCTION = "为下面的新闻写一个标题。"
SENTIMENT_INSTRUCTION = "判断下面这段新闻的情感倾向（积极、中性或消极）。"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class TokenPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def title_pairs(split: str = "train", seed: int = 0, max_chars: int = 120) -> list[PreferencePair]:
    """Correct title (chosen) vs another article's title (rejected) for every inews article of `split`."""
    from tinyllm.data.corpora import cut_text, inews

    arts = [a for a in inews(split) if a.title and a.content]
    rng = random.Random(seed)
    out = []
    for i, a in enumerate(arts):
        while True:
            j = rng.randrange(len(arts))
            if j != i and arts[j].title != a.title:
                break
        out.append(PreferencePair(f"{TITLE_INSTRUCTION}\n\n{cut_text(a.content, max_chars)}", a.title, arts[j].title))
    return out


def sentiment_pairs(split: str = "train", seed: int = 0, max_chars: int = 120) -> list[PreferencePair]:
    """Correct sentiment label (chosen) vs a wrong one (rejected) for every inews article of `split`."""
    from tinyllm.data.corpora import INEWS_LABELS, inews, news_text

    rng = random.Random(seed)
    out = []
    for a in inews(split):
        if not a.content:
            continue
        wrong = rng.choice([lab for i, lab in enumerate(INEWS_LABELS) if i != a.label])
        out.append(PreferencePair(f"{SENTIMENT_INSTRUCTION}\n\n{news_text(a, max_chars)}",
                                  INEWS_LABELS[a.label], wrong))
    return out


def read_pairs_jsonl(path: str | Path) -> list[PreferencePair]:
    """PreferencePairs from a JSONL file with `prompt`, `chosen`, `rejected` string fields."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such preference file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected an object with prompt/chosen/rejected")
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(rec.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: missing or non-string field(s) {missing}")
        out.append(PreferencePair(rec["prompt"], rec["chosen"], rec["rejected"]))
    if not out:
        raise ValueError(f"{path}: holds no preference pairs")
    return out


def load_pairs(spec: str, split: str = "train", seed: int = 0, max_pairs: int = 0) -> list[PreferencePair]:
    """`builtin:title,sentiment` (inews `split`, shuffled with `seed`) or a JSONL path; at most max_pairs
    (0: all) per builder."""
    if spec.startswith("builtin:"):
        names = [s for s in spec.removeprefix("builtin:").split(",") if s]
        bad = [s for s in names if s not in PREFERENCE_BUILDERS]
        if not names or bad:
            raise ValueError(f"data={spec!r}: builders must be among {list(PREFERENCE_BUILDERS)}")
        rng = random.Random(seed)
        out: list[PreferencePair] = []
        for name in names:
            pairs = (title_pairs if name == "title" else sentiment_pairs)(split, seed)
            rng.shuffle(pairs)
            out += pairs[:max_pairs] if max_pairs else pairs
        rng.shuffle(out)
        return out
    pairs = read_pairs_jsonl(spec)
    return pairs[:max_pairs] if max_pairs else pairs


def write_pairs_jsonl(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write pairs as JSONL, atomically."""
    path = Path(path)
    with atomic_open(path) as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected},
                               ensure_ascii=False) + "\n")
    return path


def ranking_to_pairs(prompt: str, ranked: Sequence[str]) -> list[PreferencePair]:
    """A best-first ranking of K responses → the C(K, 2) pairs (better, worse) (InstructGPT)."""
    if len(ranked) < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got {len(ranked)}")
    return [PreferencePair(prompt, ranked[i], ranked[j]) for i, j in combinations(range(len(ranked)), 2)]


def split_pairs(pairs: Sequence[Any], val_fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, held-out) after a seeded permutation; at least one held-out pair when val_fraction > 0."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(pairs) * val_fraction)) if val_fraction > 0 and len(pairs) > 1 else 0
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    def encode(text: str) -> list[int]:
        try:
            return list(tokenizer.encode(text, allowed_special="all"))
        except TypeError:  # tokenizers that keep special tokens whole take no such argument
            return list(tokenizer.encode(text))

    return encode


def prompt_and_reply_encoder(tokenizer: Any, chat: bool = True) -> tuple[Callable[[str], list[int]],
                                                                          Callable[[str, str], list[int]]]:
    """(encode_prompt(prompt), encode_reply(prompt, reply)) as described in the module docstring."""
    encode = _encoder(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if not chat:
        eos = getattr(tokenizer, "eos_token_id", None)
        return encode, lambda prompt, reply: encode(reply) + ([eos] if eos is not None else [])
    from tinyllm.tokenizer.chat import apply_chat_template

    def render_prompt(prompt: str) -> str:
        return apply_chat_template([{"role": "user", "content": prompt}], template, add_generation_prompt=True)

    def reply_ids(prompt: str, reply: str) -> list[int]:
        head = render_prompt(prompt)
        full = apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                   template, add_generation_prompt=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the reply after the generation prompt")
        return encode(full[len(head):].rstrip("\n"))

    return (lambda prompt: encode(render_prompt(prompt))), reply_ids


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, chat: bool = True,
                   max_length: int = 512) -> list[TokenPair]:
    """Token ids of each pair; prompts cut from the left so prompt + the longer response ≤ max_length."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2")
    enc_prompt, enc_reply = prompt_and_reply_encoder(tokenizer, chat)
    out = []
    for p in pairs:
        prompt = enc_prompt(p.prompt)
        chosen, rejected = enc_reply(p.prompt, p.chosen), enc_reply(p.prompt, p.rejected)
        room = max_length - max(len(chosen), len(rejected))
        if room < 1 or not chosen or not rejected:
            continue  # a response alone does not fit: drop the pair
        out.append(TokenPair(prompt[-room:], chosen, rejected))
    return out
