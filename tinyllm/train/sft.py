"""Supervised fine-tuning (notes ch.05 有监督微调): full fine-tuning on conversations, assistant tokens only.

`tinyllm sft --init-from runs/tiny/final --data data.jsonl --out-dir runs/sft` renders each conversation
with the checkpoint's chat template (ChatML when it has none), learns only the assistant replies
(tinyllm.data.sft), and trains with THE loop (tinyllm.train.loop). `--data` is a .json/.jsonl file in Alpaca,
ShareGPT or OpenAI-messages format, or `builtin:<task>[,<task>...]` for the derived offline sets of
tinyllm.data.corpora (title, sentiment, translate, qa).

Outputs: out_dir/sft_config.json (resolved), out_dir/final/ (HF checkpoint + tokenizer files), and the
loop's checkpoints/, metrics.jsonl and loss.png.

Parameter-efficient fine-tuning: `--peft lora|qlora|adapter|prefix|prompt|bitfit` applies that method of
tinyllm.train.peft to the loaded model (the base frozen; its hyper-parameters are the `--lora-*`,
`--target-modules`, `--num-virtual-tokens`, `--adapter-*` flags) and trains only its parameters with the
same task and loop. The result is an adapter directory, out_dir/adapter/ (PEFT's format for LoRA/QLoRA/
prefix/prompt, loadable with `peft.PeftModel.from_pretrained` on the transformers export of the base, and
with `tinyllm.load_model(base, adapter=...)`); the loop's checkpoints are adapter directories too.
`--save-merged` also writes out_dir/final/, the base with the LoRA update merged in (LoRA and QLoRA only).
"""

from __future__ import annotations

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
from tinyllm.train.parallel.config import ParallelFields
from tinyllm.train.pretrain import copy_tokenizer_files

PEFT_METHODS = ("none", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit")


@dataclass
class SFTConfig(TrainConfig, ParallelFields):
    init_from: str = field(default="", metadata={"help": "HF checkpoint (dir or GGUF) to fine-tune"})
    data: str = field(default="", metadata={"help": "json/jsonl conversations, or builtin:title,sentiment,..."})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer path (default: init_from)"})
    max_length: int = field(default=512, metadata={"help": "truncate each conversation to this many tokens"})
    max_examples: int = field(default=0, metadata={"help": "use at most this many examples per task (0: all)"})
    replay_data: str = field(default="", metadata={"help": "token shards of pretraining text to mix in (replay), "
                                                          "so fine-tuning keeps the language model"})
    replay_fraction: float = field(default=0.0, metadata={"help": "fraction of training examples that are replay "
                                                                  "windows of max_length tokens (all learned)"})
    val_fraction: float = field(default=0.02, metadata={"help": "held-out fraction for eval loss"})
    group_by_length: bool = field(default=False, metadata={"help": "batch examples of similar length together "
                                                                   "(shuffled in windows of 50 batches, the batches "
                                                                   "then shuffled): less padding, same examples "
                                                                   "per epoch"})
    peft: str = field(default="none", metadata={"help": "parameter-efficient method (none: full fine-tuning)",
                                                 "choices": list(PEFT_METHODS)})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA α (the update is scaled by α/r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input"})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      metadata={"help": "LoRA/BitFit targets: module names (suffix match), "
                                                        "all-linear, or one regular expression"})
    qlora_double_quant: bool = field(default=True, metadata={"help": "QLoRA: double-quantize the NF4 constants"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix/prompt tuning: virtual tokens P"})
    prefix_projection: bool = field(default=False, metadata={"help": "prefix tuning's MLP reparameterisation "
                                                                     "(off: P-tuning v2)"})
    prompt_init: str = field(default="random", metadata={"help": "prompt tuning init",
                                                          "choices": ["random", "vocab", "text"]})
    prompt_init_text: str = field(default="", metadata={"help": "prompt tuning: text whose tokens init the prompt"})
    adapter_size: int = field(default=64, metadata={"help": "bottleneck adapter width m"})
    adapter_variant: str = field(default="sequential", metadata={"help": "adapter placement",
                                                                  "choices": ["sequential", "parallel"]})
    adapter_scaling: float = field(default=1.0, metadata={"help": "parallel adapter scale s"})
    save_merged: bool = field(default=False, metadata={"help": "with LoRA/QLoRA also save the merged model "
                                                               "in final/"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"peft={self.peft!r} is not one of {list(PEFT_METHODS)}")
        self.parallel_config()  # validates the parallel fields
        if self.peft != "none" and self.parallel not in ("none", "dp"):
            raise ValueError(f"peft={self.peft!r} with parallel={self.parallel!r}: adapters train under --parallel "
                             "dp (their few parameters gain nothing from sharding)")
        if self.save_merged and self.peft not in ("lora", "qlora"):
            raise ValueError(f"save_merged=True needs peft lora or qlora, not {self.peft!r}")
        if not self.init_from:
            raise ValueError("init_from='' : pass the checkpoint to fine-tune (--init-from)")
        if not self.data:
            raise ValueError("data='' : pass a conversations file or builtin:<tasks> (--data)")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0 <= self.replay_fraction < 1:
            raise ValueError(f"replay_fraction={self.replay_fraction} must be in [0, 1)")
        if self.replay_fraction > 0 and not self.replay_data:
            raise ValueError(f"replay_fraction={self.replay_fraction} needs --replay-data (a token shards directory)")


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


def length_grouped_order(order: np.ndarray, lengths: Sequence[int], batch_size: int, window: int,
                         rng: np.random.Generator) -> np.ndarray:
    """`order` rearranged so that consecutive runs of `batch_size` hold examples of similar length: each window
    of `window` batches (in `order`) is sorted by length, longest first, and cut into batches; all whole batches
    are then shuffled, and a last partial batch stays last (so batches keep their boundaries across epochs).
    The same examples, once each — only which ones share a batch changes (transformers' LengthGroupedSampler
    idea: padding shrinks to the spread inside a batch)."""
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span].tolist(), key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    picked = [batches[i] for i in rng.permutation(len(batches))] + tail
    return np.array([i for b in picked for i in b], dtype=np.int64)


class SFTBatches:
    """Endless padded batches of examples, reshuffled each epoch from (seed, epoch); resumable.

    group_by_length: batch examples of similar length together (`length_grouped_order`)."""

    GROUP_WINDOW = 50  # batches per window that is sorted by length

    def __init__(self, examples: Sequence[SFTExample], batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True, group_by_length: bool = False) -> None:
        if not examples:
            raise ValueError("no SFT examples to batch")
        self.examples, self.batch_size, self.pad_id, self.seed, self.shuffle = (
            examples, batch_size, pad_id, seed, shuffle)
        self.group_by_length = group_by_length
        self.lengths = [len(e.ids) - 1 for e in examples]  # the width each takes in a batch (inputs are shifted)
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if not self.group_by_length:
            return order
        return length_grouped_order(order, self.lengths, self.batch_size, self.GROUP_WINDOW, rng)

    def _advance(self) -> int:
        if self.cursor == len(self.examples):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        i = int(self._order[self.cursor])
        self.cursor += 1
        return i

    def widths(self, steps: int) -> list[int]:
        """The padded width of each of the next `steps` batches, without drawing them (the state is kept)."""
        state = self.state_dict()
        try:
            return [max(self.lengths[self._advance()] for _ in range(self.batch_size)) for _ in range(steps)]
        finally:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = [self.examples[self._advance()] for _ in range(self.batch_size)]
        return pad_collate(picked, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()


class SFTTask:
    """Cross entropy on assistant tokens of padded conversation batches."""

    def __init__(self, train_examples: Sequence[SFTExample], val_examples: Sequence[SFTExample],
                 batch_size: int, pad_id: int, seed: int = 0, group_by_length: bool = False) -> None:
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.group_by_length = group_by_length

    def train_batches(self) -> Iterator[Any]:
        return SFTBatches(self.train_examples, self.batch_size, self.pad_id, self.seed,
                          group_by_length=self.group_by_length)

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


def replay_examples(shards_dir: str | Path, count: int, length: int, seed: int) -> list[SFTExample]:
    """`count` windows of `length` pretraining tokens at seeded random offsets, every token learned (replay: a
    share of plain language modelling during fine-tuning, against forgetting; cf. continual-pretraining replay)."""
    from tinyllm.data.text import TokenShards

    shards = TokenShards(shards_dir, "train")
    if len(shards) <= length:
        raise ValueError(f"replay_data={str(shards_dir)!r} holds {len(shards)} tokens, fewer than one window "
                         f"of max_length={length}")
    starts = np.random.default_rng(seed).integers(0, len(shards) - length, size=count)
    out = []
    for s in starts:
        ids = [int(t) for t in shards.read(int(s), length)]
        out.append(SFTExample(ids=ids, labels=list(ids)))
    return out


def split_examples(examples: list[SFTExample], val_fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = int(len(examples) * val_fraction)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def prepare_examples(cfg: SFTConfig, tokenizer: Any) -> tuple[list[SFTExample], list[SFTExample], int]:
    """(training examples with the replay windows appended, validation examples, number of replay windows)."""
    convs = load_conversations(cfg.data, cfg.max_examples, cfg.seed)
    examples = build_examples(convs, tokenizer, getattr(tokenizer, "chat_template", None), cfg.max_length)
    train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
    n_replay = 0
    if cfg.replay_fraction > 0:
        n_replay = round(len(train_ex) * cfg.replay_fraction / (1 - cfg.replay_fraction))
        train_ex = train_ex + replay_examples(cfg.replay_data, n_replay, cfg.max_length, cfg.seed)
    return train_ex, val_ex, n_replay


def sft_pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def run_sft(cfg: SFTConfig, prepared: tuple[list[SFTExample], list[SFTExample], int] | None = None) -> TrainResult:
    """Fine-tune `init_from` on the conversations; save out_dir/final with the tokenizer files.

    prepared: `prepare_examples(cfg, tokenizer)`'s result when the caller already has it (skips tokenizing)."""
    from tinyllm.model.hf import load_model, save_pretrained
    from tinyllm.tokenizer import load_tokenizer
    from tinyllm.utils import seed_everything

    seed_everything(cfg.seed)
    tok_path = cfg.tokenizer or cfg.init_from
    tokenizer = load_tokenizer(tok_path)
    model = load_model(cfg.init_from)
    if cfg.peft != "none":
        from tinyllm.train.peft.io import PeftModel

        model = PeftModel(apply_peft(model, cfg, tokenizer), base_path=str(cfg.init_from))
        if cfg.progress:
            from tinyllm.train.peft import print_trainable_parameters

            print_trainable_parameters(model.module)
    model.train()
    train_ex, val_ex, n_replay = prepared or prepare_examples(cfg, tokenizer)
    task = SFTTask(train_ex, val_ex, cfg.batch_size, sft_pad_id(tokenizer), cfg.seed, cfg.group_by_length)
    out = Path(cfg.out_dir)
    write_run_config(cfg, out, "sft_config.json", num_train_examples=len(train_ex), num_val_examples=len(val_ex),
                     num_replay_examples=n_replay,
                     trained_tokens_per_epoch=sum(e.num_trained for e in train_ex))
    result = train(model, task, TrainConfig(**cfg.train_fields()), parallel=cfg.parallel_config())
    if result.interrupted or result.model is None:  # result.model is None on ranks other than 0
        return result
    model = result.model
    if cfg.peft != "none":
        from tinyllm.train.peft.io import save_adapter

        adapted = model.module.cpu()
        save_adapter(adapted, out / "adapter", base_path=str(cfg.init_from))
        if not cfg.save_merged:
            return result
        from tinyllm.train.peft import merge_and_unload

        model = merge_and_unload(adapted)
    final = save_pretrained(model.cpu(), out / "final")
    copy_tokenizer_files(tok_path, final, tokenizer)
    return result


def _targets(names: list[str]) -> str | list[str]:
    """One item with regex metacharacters is a regular expression; otherwise names (or all-linear)."""
    if len(names) == 1 and (names[0] == "all-linear" or any(c in names[0] for c in ".*()[]|\\^$+?")):
        return names[0]
    return list(names)


def apply_peft(model: nn.Module, cfg: SFTConfig, tokenizer: Any = None) -> nn.Module:
    """The `--peft` method with its flags applied to `model` (base frozen); returns the adapted model."""
    from tinyllm.train import peft
    from tinyllm.train.peft.adapter import AdapterConfig, apply_adapters
    from tinyllm.train.peft.prompt import (
        PrefixTuningConfig,
        PromptTuningConfig,
        apply_prefix_tuning,
        apply_prompt_tuning,
    )

    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=_targets(cfg.target_modules))
    if cfg.peft == "lora":
        return peft.apply_lora(model, lora)
    if cfg.peft == "qlora":
        return peft.apply_qlora(model, lora, peft.QLoraConfig(double_quant=cfg.qlora_double_quant))
    if cfg.peft == "bitfit":
        return peft.apply_bitfit(model, peft.BitFitConfig(target_modules=_targets(cfg.target_modules)))
    if cfg.peft == "adapter":
        return apply_adapters(model, AdapterConfig(bottleneck_size=cfg.adapter_size, variant=cfg.adapter_variant,
                                                   scaling=cfg.adapter_scaling))
    if cfg.peft == "prefix":
        return apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                                                             prefix_projection=cfg.prefix_projection))
    if cfg.peft == "prompt":
        return apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                                                             init=cfg.prompt_init, init_text=cfg.prompt_init_text),
                                   tokenizer)
    raise ValueError(f"peft={cfg.peft!r} is not one of {list(PEFT_METHODS)}")
