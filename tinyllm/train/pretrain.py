"""Pretraining: next-token prediction on packed token shards (notes ch.01.1 language modelling, ch.03 data).

`tinyllm pretrain --data-dir shards/ --model-preset tiny --max-steps 2000 --out-dir runs/tiny` builds a
decoder from a preset (any field overridable), streams packed windows from the shards written by
`tinyllm.data.text.write_shards`, minimises the causal-LM cross entropy (+ the MoE auxiliary loss when the
model has experts) with THE training loop, and writes

  out_dir/pretrain_config.json   the resolved config (training fields + the exact ModelConfig)
  out_dir/final/                 HF checkpoint (loads in transformers.AutoModelForCausalLM), with the
                                 tokenizer files copied in when `tokenizer` names a directory
  out_dir/checkpoints/, metrics.jsonl, loss.png   from the loop

The tokenizer is an input: shards are already token ids, and the model's vocabulary defaults to the shards'.
Not covered: data mixing across several shard directories, curriculum or sequence-length warm-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.atomic import atomic_copy_files
from tinyllm.data.text import PackedBatches, TokenShards
from tinyllm.model.attention import document_attn_meta
from tinyllm.train.loop import TrainConfig, TrainResult, train, write_run_config
from tinyllm.train.losses import model_lm_loss
from tinyllm.train.parallel.config import ParallelFields

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike, tokenizer: Any = None) -> None:
    """Put the tokenizer next to a saved model: copy the source checkpoint's tokenizer files into `dst` (one
    atomic change of `dst`), or, when `src` is no directory, let `tokenizer` save itself there."""
    from tinyllm.model.hf import resolve_model_path

    try:
        src_dir = resolve_model_path(src)
    except Exception:  # a short name that does not resolve: treat it as a path
        src_dir = Path(src)
    if src_dir.is_dir():
        atomic_copy_files(src_dir, dst, TOKENIZER_FILES)
    elif tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(dst)


MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")


@dataclass
class PretrainConfig(TrainConfig, ParallelFields):
    data_dir: str = field(default="", metadata={"help": "directory of token shards (index.json + *.bin)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training window"})
    model_preset: str = field(default="tiny", metadata={"help": "ModelConfig preset the fields below override"})
    init_from: str | None = field(default=None, metadata={"help": "start from this HF checkpoint instead"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory copied into final/"})
    vocab_size: int | None = field(default=None, metadata={"help": "default: the shards' vocabulary size"})
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = field(default=None, metadata={"help": "default: ≥ seq_len"})
    tie_word_embeddings: bool | None = None
    zero_init_residual: bool = field(default=False, metadata={
        "help": "start each residual branch's output projection (o_proj, down_proj) at zero, so every block "
                "begins as the identity (a fresh model only, not --init-from)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_init_residual and self.init_from:
            raise ValueError(f"zero_init_residual=True would wipe half of init_from={self.init_from!r}'s "
                             "trained weights; it applies to a fresh model only")
        if not self.data_dir:
            raise ValueError("data_dir='' : pass the directory of token shards (--data-dir)")
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ValueError(f"seq_len={self.seq_len!r} must be a positive integer")
        self.parallel_config()  # validates the parallel fields

    def model_config(self, shards_vocab: int, eos_token_id: int) -> Any:
        from tinyllm.model.config import preset

        overrides = {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}
        overrides.setdefault("vocab_size", shards_vocab)
        base = preset(self.model_preset)
        overrides.setdefault("max_position_embeddings", max(base.max_position_embeddings, self.seq_len))
        if overrides["vocab_size"] < shards_vocab:
            raise ValueError(f"vocab_size={overrides['vocab_size']} is smaller than the shards' vocabulary "
                             f"({shards_vocab})")
        if overrides["max_position_embeddings"] < self.seq_len:
            raise ValueError(f"max_position_embeddings={overrides['max_position_embeddings']} < "
                             f"seq_len={self.seq_len}")
        return base.replace(eos_token_id=eos_token_id, **overrides)


class PretrainTask:
    """Packed next-token prediction: loss = CE(model(x), y) (+ MoE aux loss), labels already shifted."""

    def __init__(self, data_dir: str | Path, batch_size: int, seq_len: int, seed: int, eval_batch_size: int,
                 document_mask: bool = False) -> None:
        self.train_shards = TokenShards(data_dir, "train")
        self.val_shards = TokenShards(data_dir, "val")
        self.batch_size, self.seq_len, self.seed, self.eval_batch_size = batch_size, seq_len, seed, eval_batch_size
        # attention stays inside each packed document (`document_attn_meta`), as held-out scoring reads them
        self.document_mask = document_mask
        if document_mask and self.train_shards.eos_token_id is None:
            raise ValueError(f"document_mask needs the shards' end-of-text id, and {data_dir} records none")

    def train_batches(self) -> Iterator[Any]:
        return PackedBatches(self.train_shards, self.batch_size, self.seq_len, self.seed)

    def eval_batches(self) -> Iterable[Any] | None:
        if len(self.val_shards) <= self.seq_len:
            return None
        # in order, from the start: every evaluation sees the same held-out windows
        return PackedBatches(self.val_shards, self.eval_batch_size, self.seq_len, shuffle=False)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        meta = document_attn_meta(x, self.train_shards.eos_token_id) if self.document_mask else None
        ce = model_lm_loss(model, x, y, attn_meta=meta)  # the lm_head fused into the loss: no [B, T, V] logits
        aux_fn = getattr(model, "aux_loss", None) or getattr(getattr(model, "_orig_mod", None), "aux_loss", None)
        aux = aux_fn() if aux_fn is not None else None
        if aux is None:
            return ce, {"tokens": y.numel()}
        return ce + aux, {"tokens": y.numel(), "ce_loss": ce.item(), "aux_loss": aux.item()}

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_pretrain_model(cfg: PretrainConfig, shards: TokenShards) -> nn.Module:
    if cfg.init_from:
        from tinyllm.model.hf import load_model

        model = load_model(cfg.init_from)
        if model.config.vocab_size < shards.vocab_size:
            raise ValueError(f"init_from={cfg.init_from!r} has vocab_size={model.config.vocab_size} < the "
                             f"shards' {shards.vocab_size}")
        return model
    from tinyllm.model.hf import build_model

    model = build_model(cfg.model_config(shards.vocab_size, shards.eos_token_id))
    if cfg.zero_init_residual:
        zero_init_residual(model)
    return model


RESIDUAL_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")


def zero_init_residual(model: nn.Module) -> int:
    """Zero the weights (and biases) of the projections that write into the residual stream, attention's o_proj
    and the MLP's down_proj: each block then starts as the identity and the embeddings reach the head unchanged
    (modded-nanogpt's "zero-init output projections"). Their gradients are not zero (their inputs are not), so
    they leave zero on the first step; the layers before them start learning one step later. Returns the number
    of matrices zeroed (2 per layer; an error if the model has none, e.g. a MoE MLP named otherwise)."""
    hit = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.endswith(RESIDUAL_OUTPUTS):
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
                hit += 1
    if not hit:
        raise ValueError(f"zero_init_residual found none of {RESIDUAL_OUTPUTS} in {type(model).__name__}")
    return hit


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    """Build the model, train it on the shards, save `out_dir/final` (HF format) and the resolved config."""
    from tinyllm.utils import seed_everything

    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    task = PretrainTask(cfg.data_dir, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.batch_size)
    model = build_pretrain_model(cfg, task.train_shards)
    out = Path(cfg.out_dir)
    write_run_config(cfg, out, "pretrain_config.json", model=model.config.to_dict(),
                     num_parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
    result = train(model, task, TrainConfig(**cfg.train_fields()), parallel=cfg.parallel_config())
    if result.interrupted or result.model is None:  # result.model is None on ranks other than 0
        return result
    from tinyllm.model.hf import save_pretrained

    final = save_pretrained(result.model.cpu(), out / "final")
    if cfg.tokenizer:
        copy_tokenizer_files(cfg.tokenizer, final)
    return result
