"""Reward model (notes ch.07.2.a Bradley–Terry loss, 07.1.b the reward / critic roles; InstructGPT, Ouyang et al.
2022): a language model's trunk with a scalar head, trained on preference pairs.

    r_φ(x, y) = w · h_last          h_last = final hidden state at the last non-pad token of prompt ‖ response
    L_R = −E log σ(r_φ(x, y_c) − r_φ(x, y_r) − m)          (m: an optional margin, as TRL's `margin` column)

Bradley–Terry: P(y_c ≻ y_r) = σ(r_c − r_r), so the loss is the negative log-likelihood of the human choice;
with r_c = r_r it is log 2 ≈ 0.6931. Only differences of rewards are identified (adding a constant to every
reward changes nothing), which is why PPO uses the score relative to a KL penalty rather than its level.
Preference accuracy = fraction of held-out pairs with r_c > r_r (chance 0.5).

The same module with `values()` gives one scalar per token: the critic V(s_t) of PPO (7.1.b; DeepSpeed-Chat
initialises the critic from the reward model). Last real token of a right-padded row: attention_mask.sum(−1) − 1.

Files: `save_pretrained(dir)` writes the trunk as an HF causal-LM checkpoint (it still loads as a language
model) plus `score_head.safetensors` (`score.weight` [1, hidden]) and `reward_config.json`;
`load_reward_model(dir)` restores both. `tinyllm reward --init-from M --data builtin:title` trains one with THE
loop and reports held-out preference accuracy in out_dir/reward_metrics.json.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.atomic import atomic_dir, atomic_write_json, json_text
from tinyllm.train.loop import TrainConfig, TrainResult, train, write_run_config
from tinyllm.train.rl_common import PairBatches, last_token_index, pair_eval_batches

HEAD_FILE = "score_head.safetensors"


class RewardModel(nn.Module):
    """A causal LM's trunk + a linear scalar head (`score`, no bias, as transformers' *ForSequenceClassification)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = None  # not itself a tinyllm CausalLM: checkpoints go through save_pretrained below
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.score.weight, 0.0, 1.0 / (hidden + 1) ** 0.5)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids, hidden_only=True)

    def values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One scalar per position [B, T] (the critic's V(s_t))."""
        return self.score(self.hidden(input_ids)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence rewards [B]: the head at each right-padded row's last real token."""
        h = self.hidden(input_ids)
        last = (last_token_index(attention_mask) if attention_mask is not None
                else torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device))
        return self.score(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        from tinyllm.model.hf import save_pretrained

        directory = Path(directory)
        with atomic_dir(directory, keep_existing=True) as tmp:  # trunk, head and its config change together
            save_pretrained(self.backbone, tmp)
            save_file({"score.weight": self.score.weight.detach().cpu().contiguous()}, str(tmp / HEAD_FILE))
            head = {"head": "score", "pooling": "last_non_pad_token"}
            (tmp / "reward_config.json").write_text(json_text(head, indent=None))
        return directory

    def load_pretrained_weights(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        from tinyllm.train.checkpoint import load_model_weights

        load_model_weights(self.backbone, Path(directory))
        self.score.weight.data.copy_(load_file(str(Path(directory) / HEAD_FILE))["score.weight"])


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """A RewardModel saved by `save_pretrained` (trunk checkpoint + score head)."""
    from safetensors.torch import load_file

    from tinyllm.model.hf import load_model

    path = Path(path)
    if not (path / HEAD_FILE).exists():
        raise FileNotFoundError(f"{path}: no {HEAD_FILE}; not a reward model directory")
    rm = RewardModel(load_model(path))
    rm.score.weight.data.copy_(load_file(str(path / HEAD_FILE))["score.weight"])
    return rm.to(device).eval()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """−mean log σ(r_c − r_r − margin)."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pair_rewards(model: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) of a collate_pairs batch (chosen rows first)."""
    r = model(batch["input_ids"], batch["attention_mask"])
    return r.chunk(2)


@torch.no_grad()
def preference_accuracy(model: RewardModel, pairs: Sequence[Any], pad_id: int, batch_size: int = 16) -> dict:
    """Held-out preference accuracy (r_c > r_r), mean margin r_c − r_r, and the BT loss."""
    was = model.training
    model.eval()
    wins, margins, losses = [], [], []
    for batch in pair_eval_batches(pairs, batch_size, pad_id):
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        rc, rr = pair_rewards(model, batch)
        wins.append((rc > rr).float())
        margins.append(rc - rr)
        losses.append(-F.logsigmoid(rc - rr))
    model.train(was)
    return {"accuracy": float(torch.cat(wins).mean()), "margin": float(torch.cat(margins).mean()),
            "loss": float(torch.cat(losses).mean()), "pairs": len(pairs)}


class RewardTask:
    """Bradley–Terry loss on batches of pairs; every parameter of the reward model trains."""

    def __init__(self, train_pairs: Sequence[Any], val_pairs: Sequence[Any], batch_size: int, pad_id: int,
                 seed: int = 0, margin: float = 0.0) -> None:
        self.train_pairs, self.val_pairs = list(train_pairs), list(val_pairs)
        self.batch_size, self.pad_id, self.seed, self.margin = batch_size, pad_id, seed, margin

    def train_batches(self) -> Iterator[Any]:
        return PairBatches(self.train_pairs, self.batch_size, self.pad_id, self.seed)

    def eval_batches(self) -> Iterable[Any] | None:
        return pair_eval_batches(self.val_pairs, self.batch_size, self.pad_id) if self.val_pairs else None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rc, rr = pair_rewards(model, batch)
        loss = bradley_terry_loss(rc, rr, self.margin or None)
        rc, rr = rc.detach(), rr.detach()
        return loss, {"accuracy": float((rc > rr).float().mean()), "margin": float((rc - rr).mean()),
                      "tokens": int(batch["attention_mask"].sum())}

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------ CLI
@dataclass
class PreferenceRunConfig(TrainConfig):
    """Fields shared by `tinyllm reward` and `tinyllm dpo`."""

    init_from: str = field(default="", metadata={"help": "HF checkpoint (dir or GGUF) to start from"})
    data: str = field(default="builtin:title", metadata={
        "help": "builtin:title,sentiment (inews pairs) or a JSONL file with prompt/chosen/rejected"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer path (default: init_from)"})
    chat: bool = field(default=True, metadata={"help": "render prompts with the chat template (ChatML if none)"})
    max_length: int = field(default=256, metadata={"help": "max tokens of prompt + response (prompt cut left)"})
    max_pairs: int = field(default=0, metadata={"help": "use at most this many pairs per builder (0: all)"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out fraction for accuracy / eval loss"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate of cosine/wsd"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    eval_interval: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})
    save_interval: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init_from:
            raise ValueError("init_from='' : pass the checkpoint to start from (--init-from)")
        if not self.data:
            raise ValueError("data='' : pass builtin:<builders> or a JSONL file (--data)")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.max_pairs < 0:
            raise ValueError(f"max_pairs={self.max_pairs} must be >= 0")


@dataclass
class RewardConfig(PreferenceRunConfig):
    margin: float = field(default=0.0, metadata={"help": "margin m in −log σ(r_c − r_r − m)"})


def load_preference_data(cfg: PreferenceRunConfig) -> tuple[Any, Any, list, list, int]:
    """(model, tokenizer, train TokenPairs, held-out TokenPairs, pad id) for a preference run."""
    from tinyllm.data.preference import load_pairs, split_pairs, tokenize_pairs
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
    model = load_model(cfg.init_from)
    pairs = tokenize_pairs(load_pairs(cfg.data, "train", cfg.seed, cfg.max_pairs), tokenizer, cfg.chat,
                           cfg.max_length)
    if not pairs:
        raise ValueError(f"data={cfg.data!r}: no pair fits max_length={cfg.max_length}")
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return model, tokenizer, train_pairs, val_pairs, pad


def run_reward(cfg: RewardConfig) -> TrainResult:
    """Train a reward model on preference pairs; save out_dir/final and out_dir/reward_metrics.json."""
    from tinyllm.train.rl_common import copy_tokenizer_files
    from tinyllm.utils import seed_everything

    seed_everything(cfg.seed)
    lm, tokenizer, train_pairs, val_pairs, pad = load_preference_data(cfg)
    model = RewardModel(lm).train()
    out = Path(cfg.out_dir)
    write_run_config(cfg, out, "reward_config.json", num_train_pairs=len(train_pairs), num_val_pairs=len(val_pairs))
    before = preference_accuracy(model, val_pairs, pad) if val_pairs else None
    result = train(model, RewardTask(train_pairs, val_pairs, cfg.batch_size, pad, cfg.seed, cfg.margin),
                   TrainConfig(**cfg.train_fields()))
    if result.interrupted:
        return result
    model.cpu()
    after = preference_accuracy(model, val_pairs, pad) if val_pairs else None
    final = model.save_pretrained(out / "final")
    copy_tokenizer_files(cfg.tokenizer or cfg.init_from, final, tokenizer)
    atomic_write_json(out / "reward_metrics.json", {"before": before, "after": after})
    if cfg.progress and after is not None:
        print(f"held-out preference accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f}", flush=True)
    return result
