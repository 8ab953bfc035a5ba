"""Supervised fine-tuning (notes ch.05 有监督微调): full fine-tuning on conversations, assistant tokens only.

`tinyllm sft --init-from runs/tiny/final --data data.jsonl --out-dir runs/sft` renders each conversation
with the checkpoint's chat template (ChatML when it has none), learns only the assistant replies
(tinyllm.data.sft), and trains with THE loop (tinyllm.train.loop). `--data` is a .json/.jsonl file in Alpaca,
ShareGPT or OpenAI-messages format, or `builtin:<task>[,<task>...]` for the derived offline sets of
tinyllm.data.corpora (title, sentiment, translate, qa).

Outputs: out_dir/sft_config.json (resolved), out_dir/final/ (HF checkpoint + tokenizer files), and the
loop's checkpoints/, metrics.jsonl and loss.png. LoRA and the other PEFT methods plug into the same task
through `trainable_parameters` (the fine-tuning issue).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tinyllm.data.formats import Conversation, read_conversations, to_conversation
from tinyllm.data.sft import SFTExample, pad_collate, tokenize_conversation
from tinyllm.train.loop import TrainConfig, TrainResult, train, write_run_config
from tinyllm.train.losses import model_lm_loss
from tinyllm.train.pretrain import TOKENIZER_FILES


@dataclass
class SFTConfig(TrainConfig):
    init_from: str = field(default="", metadata={"help": "HF checkpoint (dir or GGUF) to fine-tune"})
    data: str = field(default="", metadata={"help": "json/jsonl conversations, or builtin:title,sentiment,..."})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer path (default: init_from)"})
    max_length: int = field(default=512, metadata={"help": "truncate each conversation to this many tokens"})
    max_examples: int = field(default=0, metadata={"help": "use at most this many examples per task (0: all)"})
    val_fraction: float = field(default=0.02, metadata={"help": "held-out fraction for eval loss"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init_from:
            raise ValueError("init_from='' : pass the checkpoint to fine-tune (--init-from)")
        if not self.data:
            raise ValueError("data='' : pass a conversations file or builtin:<tasks> (--data)")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")


def load_conversations(spec: str, max_examples: int = 0, seed: int = 0) -> list[Conversation]:
    """Conversations from a file or from `builtin:` derived offline tasks."""
    if spec.startswith("builtin:"):
        from tinyllm.data.corpora import sft_mixture

        tasks = tuple(t for t in spec.removeprefix("builtin:").split(",") if t)
        recs = sft_mixture("train", tasks, seed=seed, max_per_task=max_examples or None)
        return [to_conversation(r, f"builtin record {i}") for i, r in enumerate(recs)]
    convs = list(read_conversations(spec))
    return convs[:max_examples] if max_examples else convs


def chat_encoder(tokenizer: Any, template: str | None) -> tuple[Callable, Callable[[str], list[int]]]:
    """(render, encode) for tokenize_conversation: the template renderer and an encoder that keeps the
    template's special tokens (e.g. <|im_start|>) as single ids."""
    from tinyllm.tokenizer.chat import apply_chat_template

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return apply_chat_template(messages, template, add_generation_prompt=add_generation_prompt)

    def encode(text: str) -> list[int]:
        try:
            return tokenizer.encode(text, allowed_special="all")
        except TypeError:  # tokenizers that always keep specials whole take no such argument
            return tokenizer.encode(text)

    return render, encode


class SFTBatches:
    """Endless padded batches of examples, reshuffled each epoch from (seed, epoch); resumable."""

    def __init__(self, examples: Sequence[SFTExample], batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not examples:
            raise ValueError("no SFT examples to batch")
        self.examples, self.batch_size, self.pad_id, self.seed, self.shuffle = (
            examples, batch_size, pad_id, seed, shuffle)
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size):
            if self.cursor == len(self.examples):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
            picked.append(self.examples[int(self._order[self.cursor])])
            self.cursor += 1
        return pad_collate(picked, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()


class SFTTask:
    """Cross entropy on assistant tokens of padded conversation batches."""

    def __init__(self, train_examples: Sequence[SFTExample], val_examples: Sequence[SFTExample],
                 batch_size: int, pad_id: int, seed: int = 0) -> None:
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed

    def train_batches(self) -> Iterator[Any]:
        return SFTBatches(self.train_examples, self.batch_size, self.pad_id, self.seed)

    def eval_batches(self) -> Iterable[Any] | None:
        if not self.val_examples:
            return None
        exs = self.val_examples
        return [pad_collate(exs[i : i + self.batch_size], self.pad_id) for i in range(0, len(exs), self.batch_size)]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        labels = batch["labels"]
        loss = model_lm_loss(model, batch["input_ids"], labels)
        return loss, {"tokens": int((labels != -100).sum())}

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_examples(convs: Sequence[Conversation], tokenizer: Any, template: str | None,
                   max_length: int) -> list[SFTExample]:
    render, encode = chat_encoder(tokenizer, template)
    out = [tokenize_conversation(c, render, encode, max_length) for c in convs]
    return [e for e in out if e.num_trained > 0 and len(e.ids) >= 2]


def split_examples(examples: list[SFTExample], val_fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = int(len(examples) * val_fraction)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def run_sft(cfg: SFTConfig) -> TrainResult:
    """Fine-tune `init_from` on the conversations; save out_dir/final with the tokenizer files."""
    from tinyllm.model.hf import load_model, resolve_model_path, save_pretrained
    from tinyllm.tokenizer import load_tokenizer
    from tinyllm.utils import seed_everything

    seed_everything(cfg.seed)
    tok_path = cfg.tokenizer or cfg.init_from
    tokenizer = load_tokenizer(tok_path)
    model = load_model(cfg.init_from)
    model.train()
    convs = load_conversations(cfg.data, cfg.max_examples, cfg.seed)
    examples = build_examples(convs, tokenizer, getattr(tokenizer, "chat_template", None), cfg.max_length)
    train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    task = SFTTask(train_ex, val_ex, cfg.batch_size, pad_id, cfg.seed)
    out = Path(cfg.out_dir)
    write_run_config(cfg, out, "sft_config.json", num_train_examples=len(train_ex), num_val_examples=len(val_ex),
                     trained_tokens_per_epoch=sum(e.num_trained for e in train_ex))
    result = train(model, task, TrainConfig(**cfg.train_fields()))
    if result.interrupted:
        return result
    final = save_pretrained(model.cpu(), out / "final")
    src_dir = resolve_model_path(tok_path)
    if src_dir.is_dir():
        for name in TOKENIZER_FILES:
            if (src_dir / name).exists():
                shutil.copy2(src_dir / name, final / name)
    else:
        tokenizer.save(final)
    return result
