"""Sentence embeddings for `/v1/embeddings` (notes ch.08 RAG "embedding models"; Reimers & Gurevych 2019
"Sentence-BERT" mean pooling).

An encoder checkpoint (BERT: `BertModel.embed`, mean over real tokens, L2-normalised, tokenised with the
checkpoint's own `tokenizer.json` so [CLS]/[SEP] are added exactly as sentence-transformers does) or a decoder
(the mean of `model.model(ids)`, the final hidden states, L2-normalised; each input runs alone so no padding
enters causal attention). Inputs longer than the model's positions are refused, not truncated.

Not covered: instruction prefixes (E5/BGE), last-token pooling, Matryoshka `dimensions` (refused).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _text_ids(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text → ids as a transformers tokenizer gives them: BOS/CLS added, special-token spellings matched whole."""
    return lambda text: tokenizer.encode(text, allowed_special="all", add_special_tokens=True)


class Embedder:
    """`embed(list of token-id lists) -> [B, d]` unit vectors; `encode(text) -> ids` as the model expects."""

    def __init__(self, model: torch.nn.Module, encode: Callable[[str], list[int]], name: str) -> None:
        self.model = model.eval()
        self.encode = encode
        self.name = name
        cfg = model.config
        self.is_encoder = bool(getattr(cfg, "is_encoder", False))
        self.max_len = int(cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, name: str | None = None) -> Embedder:
        from tinyllm.model.hf import load_model, resolve_model_path
        from tinyllm.tokenizer import load_tokenizer

        resolved = resolve_model_path(path)
        model = load_model(resolved)
        if getattr(model.config, "is_encoder", False) and (resolved / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(resolved / "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()
            return cls(model, lambda text: tok.encode(text).ids, name or resolved.name)
        tokenizer = load_tokenizer(resolved)
        return cls(model, _text_ids(tokenizer), name or Path(resolved).name)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, name: str) -> Embedder:
        return cls(model, _text_ids(tokenizer), name)

    def check(self, ids: list[int], index: int) -> None:
        if not ids:
            raise ValueError(f"input[{index}] is empty")
        if len(ids) > self.max_len:
            raise ValueError(f"input[{index}] has {len(ids)} tokens; this model's maximum context length is "
                             f"{self.max_len} tokens")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"input[{index}] holds token ids outside [0, {self.vocab_size})")

    @torch.no_grad()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if self.is_encoder:
            width = max(len(ids) for ids in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            return self.model.embed(ids, mask, pooling="mean", normalize=True).float()
        out = []
        for row in batch:
            h = self.model.model(torch.tensor([row], device=device))  # [1, T, d] final hidden states
            out.append(h[0].float().mean(0))
        return F.normalize(torch.stack(out), p=2, dim=-1)
