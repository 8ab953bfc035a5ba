"""Supervised fine-tuning data: conversations → token ids with assistant-only labels, padding and packing
(notes ch.03 and ch.05 有监督微调).

Only the assistant's replies are learned: every other token's label is IGNORE_INDEX (−100), which
cross-entropy skips. The spans are found by rendering the chat template incrementally: for the assistant
message i, render(messages[:i], add_generation_prompt=True) is the prompt and render(messages[:i+1]) the prompt
plus the reply; the difference — the reply and the template's end-of-turn marker (e.g. `<|im_end|>`) — is what
the model learns to produce. Each text segment is tokenized separately, so a label boundary never splits a
token (chat templates put special tokens at those boundaries anyway).

Batches use the convention of the training loop: `input_ids[t]` predicts `labels[t]` (labels are already shifted
by one position).

- `pad_collate`: right-pads a list of examples to the longest one (labels padded with −100).
- `pack_examples`: concatenates examples into fixed-length rows; each row carries `positions` restarting at 0
  per example and `doc_ids`, and `block_causal_mask(doc_ids)` builds the mask that keeps attention inside one
  example (Llama 3's document masking), so packing gives the same loss as padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tinyllm.data.formats import Conversation
from tinyllm.tokenizer.chat import ChatTemplateError, chat_segments

IGNORE_INDEX = -100
Render = Callable[[list[dict[str, str]], bool], str]
Encode = Callable[[str], list[int]]


@dataclass
class SFTExample:
    ids: list[int]
    labels: list[int]  # aligned with ids (not shifted); IGNORE_INDEX where not learned

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


TemplateError = ChatTemplateError  # the template does not render conversations as growing prefixes


def segments(conv: Conversation, render: Render) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, learned?) segments (the logic lives with the chat templates)."""
    return chat_segments(conv.as_dicts(), render)


def tokenize_conversation(conv: Conversation, render: Render, encode: Encode,
                          max_length: int | None = None) -> SFTExample:
    """Ids and assistant-only labels; truncated to `max_length` tokens from the right."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learn in segments(conv, render):
        piece = encode(text)
        ids += piece
        labels += piece if learn else [IGNORE_INDEX] * len(piece)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return SFTExample(ids, labels)


def _shifted(ex: SFTExample) -> tuple[list[int], list[int]]:
    return ex.ids[:-1], ex.labels[1:]


def pad_collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids [B, T], labels [B, T] (−100 on padding and non-assistant tokens)."""
    if not examples:
        raise ValueError("pad_collate got an empty list of examples")
    pairs = [_shifted(e) for e in examples]
    width = max(len(i) for i, _ in pairs)
    inp = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    lab = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for r, (i, lb) in enumerate(pairs):
        inp[r, : len(i)] = torch.tensor(i, dtype=torch.long)
        lab[r, : len(lb)] = torch.tensor(lb, dtype=torch.long)
    return {"input_ids": inp, "labels": lab}


def pack_examples(examples: Sequence[SFTExample], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Greedy first-fit packing into rows of `seq_len` tokens (examples longer than a row are truncated)."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for ex in examples:
        i, lb = _shifted(ex)
        i, lb = i[:seq_len], lb[:seq_len]
        if not i:
            continue
        for r, free in enumerate(room):
            if free >= len(i):
                rows[r].append((i, lb))
                room[r] -= len(i)
                break
        else:
            rows.append([(i, lb)])
            room.append(seq_len - len(i))
    out = []
    for row in rows:
        inp = torch.full((seq_len,), pad_id, dtype=torch.long)
        lab = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros(seq_len, dtype=torch.long)
        doc = torch.full((seq_len,), -1, dtype=torch.long)
        at = 0
        for d, (i, lb) in enumerate(row):
            n = len(i)
            inp[at : at + n] = torch.tensor(i)
            lab[at : at + n] = torch.tensor(lb)
            pos[at : at + n] = torch.arange(n)
            doc[at : at + n] = d
            at += n
        out.append({"input_ids": inp, "labels": lab, "positions": pos, "doc_ids": doc})
    return out


def stack_packed(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: query i reads key j iff j ≤ i and both belong to the same document.

    Padding (doc id −1) reads only itself, so no softmax row is empty.
    """
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    eye = torch.eye(t, dtype=torch.bool, device=doc_ids.device)
    return ((same & causal) | eye)[:, None]
