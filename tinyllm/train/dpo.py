"""Direct Preference Optimization and IPO (notes ch.07.2.c; Rafailov et al. 2023; Azar et al. 2023 for IPO;
Mitchell 2023 for conservative DPO).

With π_θ the policy, π_ref the frozen reference (the SFT model) and log-ratios
ρ_c = log π_θ(y_c|x) − log π_ref(y_c|x), ρ_r = log π_θ(y_r|x) − log π_ref(y_r|x) (sums over response tokens):

    sigmoid (DPO):  L = −log σ(β (ρ_c − ρ_r))                          β = 0.1 by default (paper, TRL)
    cDPO:           L = −(1−ε) log σ(β Δ) − ε log σ(−β Δ)              label_smoothing ε: labels flipped w.p. ε
    robust:         L = [−(1−ε) log σ(β Δ) + ε log σ(−β Δ)] / (1 − 2ε)   (Chowdhury et al. 2024, TRL "robust")
    hinge (SLiC):   L = max(0, 1 − β Δ)
    ipo:            L = (ρ̄_c − ρ̄_r − 1/(2β))²                           ρ̄ = ρ / number of response tokens

Δ = ρ_c − ρ_r. The implicit rewards are β ρ_c and β ρ_r: DPO's policy *is* a reward model, r(x, y) =
β log π_θ(y|x)/π_ref(y|x) + β log Z(x), so no reward model and no sampling are needed (the note's "compute the
KL divergence of the two differences" is this log-ratio margin, not a KL). At π_θ = π_ref the sigmoid loss is
log 2. The gradient, −β σ(−βΔ) (∇log π(y_c) − ∇log π(y_r)), raises the chosen response and lowers the rejected
one, weighted by how wrong the implicit reward model currently is. IPO's squared loss regresses the margin to
1/(2β) instead of pushing it to infinity, so it does not overfit deterministic preferences; its length
normalisation follows TRL (confirmed there with the IPO authors).

Reference log-probs are computed once before training (the reference never changes), so the reference model
is not kept in memory during training. Metrics: preference accuracy = fraction of pairs with ρ_c > ρ_r, and the
mean reward margin β(ρ_c − ρ_r). `dpo_loss` equals TRL 1.16's `DPOTrainer` loss on the same log-probs (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.atomic import atomic_write_json
from tinyllm.train.loop import TrainConfig, TrainResult, train, write_run_config
from tinyllm.train.reward import PreferenceRunConfig, load_preference_data
from tinyllm.train.rl_common import (
    PairBatches,
    masked_sum,
    model_token_logprobs,
    pair_eval_batches,
)

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses [B], chosen rewards β ρ_c [B], rejected rewards β ρ_r [B]) from sequence log-probs."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5)")
    rho_c = policy_chosen.float() - ref_chosen.float()
    rho_r = policy_rejected.float() - ref_rejected.float()
    delta = rho_c - rho_r
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (response token counts)")
        avg = rho_c / chosen_lengths.float().clamp(min=1.0) - rho_r / rejected_lengths.float().clamp(min=1.0)
        losses = (avg - 1 / (2 * beta)) ** 2
    return losses, beta * rho_c.detach(), beta * rho_r.detach()


def pair_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y_c|x) [B], log π(y_r|x) [B]) of a collate_pairs batch (chosen rows first)."""
    logp = model_token_logprobs(model, batch["input_ids"])
    return masked_sum(logp, batch["response_mask"][:, 1:]).chunk(2)


@torch.no_grad()
def reference_logprobs(ref: nn.Module, pairs: Sequence[Any], pad_id: int,
                       batch_size: int = 16) -> list[tuple[float, float]]:
    """(log π_ref(y_c|x), log π_ref(y_r|x)) of every pair, computed once."""
    from tinyllm.train.rl_common import collate_pairs

    was = ref.training
    ref.eval()
    device = next(ref.parameters()).device
    out: list[tuple[float, float]] = []
    for s in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[s:s + batch_size], pad_id).items()}
        c, r = pair_logprobs(ref, batch)
        out += list(zip(c.tolist(), r.tolist()))
    ref.train(was)
    return out


@dataclass(frozen=True)
class RefPair:
    """A TokenPair with its reference log-probs attached (so batches carry them)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float
    ref_rejected: float


def attach_reference(ref: nn.Module, pairs: Sequence[Any], pad_id: int) -> list[RefPair]:
    logps = reference_logprobs(ref, pairs, pad_id)
    return [RefPair(p.prompt, p.chosen, p.rejected, c, r) for p, (c, r) in zip(pairs, logps)]


class _RefBatches(PairBatches):
    def collate(self, picked: Sequence[RefPair]) -> dict[str, torch.Tensor]:
        return _with_ref(super().collate(picked), picked)


def _with_ref(batch: dict[str, torch.Tensor], pairs: Sequence[RefPair]) -> dict[str, torch.Tensor]:
    batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float32)
    return batch


class DPOTask:
    """DPO/IPO loss of the policy against precomputed reference log-probs."""

    def __init__(self, train_pairs: Sequence[RefPair], val_pairs: Sequence[RefPair], batch_size: int, pad_id: int,
                 beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, seed: int = 0) -> None:
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, loss_type, label_smoothing,
                 torch.ones(1), torch.ones(1))  # validates the settings now, not at the first step
        self.train_pairs, self.val_pairs = list(train_pairs), list(val_pairs)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def train_batches(self) -> Iterator[Any]:
        return _RefBatches(self.train_pairs, self.batch_size, self.pad_id, self.seed)

    def eval_batches(self) -> Iterable[Any] | None:
        if not self.val_pairs:
            return None
        batches = pair_eval_batches(self.val_pairs, self.batch_size, self.pad_id)
        return [_with_ref(b, self.val_pairs[i * self.batch_size:(i + 1) * self.batch_size])
                for i, b in enumerate(batches)]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pc, pr = pair_logprobs(model, batch)
        lengths = batch["response_mask"].sum(-1)
        lc, lr = lengths.chunk(2)
        losses, rc, rr = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], self.beta, self.loss_type,
                                  self.label_smoothing, lc, lr)
        return losses.mean(), {"accuracy": float((rc > rr).float().mean()), "margin": float((rc - rr).mean()),
                               "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean()),
                               "tokens": int(batch["attention_mask"].sum())}

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def dpo_metrics(model: nn.Module, pairs: Sequence[RefPair], pad_id: int, beta: float = 0.1,
                batch_size: int = 16) -> dict[str, float]:
    """Held-out preference accuracy (ρ_c > ρ_r), mean reward margin β(ρ_c − ρ_r), DPO loss, and the accuracy
    of the raw log-likelihoods (log π(y_c) > log π(y_r))."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    acc, margin, loss, raw = [], [], [], []
    for i, batch in enumerate(pair_eval_batches(pairs, batch_size, pad_id)):
        chunk = pairs[i * batch_size:(i + 1) * batch_size]
        batch = {k: v.to(device) for k, v in _with_ref(batch, chunk).items()}
        pc, pr = pair_logprobs(model, batch)
        losses, rc, rr = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta)
        acc.append((rc > rr).float())
        margin.append(rc - rr)
        loss.append(losses)
        raw.append((pc > pr).float())
    model.train(was)
    return {"accuracy": float(torch.cat(acc).mean()), "margin": float(torch.cat(margin).mean()),
            "loss": float(torch.cat(loss).mean()), "logprob_accuracy": float(torch.cat(raw).mean()),
            "pairs": len(pairs)}


@dataclass
class DPOConfig(PreferenceRunConfig):
    beta: float = field(default=0.1, metadata={"help": "β: strength of the implicit KL constraint"})
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO loss variant", "choices": list(DPO_LOSS_TYPES)})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε of cDPO / robust DPO (0: plain DPO)"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=2e-6, metadata={"help": "final learning rate of cosine/wsd"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta!r} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} must be in [0, 0.5)")


def run_dpo(cfg: DPOConfig) -> TrainResult:
    """Align `init_from` with DPO on preference pairs; save out_dir/final and out_dir/dpo_metrics.json
    (held-out accuracy / margin before and after)."""
    from tinyllm.model.hf import save_pretrained
    from tinyllm.train.rl_common import copy_tokenizer_files
    from tinyllm.utils import pick_device, seed_everything

    seed_everything(cfg.seed)
    model, tokenizer, train_pairs, val_pairs, pad = load_preference_data(cfg)
    model.to(pick_device(cfg.device))
    # the reference is the starting policy: its log-probs are taken once, before any update
    train_ref, val_ref = attach_reference(model, train_pairs, pad), attach_reference(model, val_pairs, pad)
    out = Path(cfg.out_dir)
    write_run_config(cfg, out, "dpo_config.json", num_train_pairs=len(train_ref), num_val_pairs=len(val_ref))
    before = dpo_metrics(model, val_ref, pad, cfg.beta) if val_ref else None
    model.train()
    task = DPOTask(train_ref, val_ref, cfg.batch_size, pad, cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.seed)
    result = train(model, task, TrainConfig(**cfg.train_fields()))
    if result.interrupted:
        return result
    after = dpo_metrics(model, val_ref, pad, cfg.beta) if val_ref else None
    final = save_pretrained(model.cpu(), out / "final")
    copy_tokenizer_files(cfg.tokenizer or cfg.init_from, final, tokenizer)
    atomic_write_json(out / "dpo_metrics.json", {"before": before, "after": after})
    if cfg.progress and after is not None:
        print(f"held-out preference accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f}, "
              f"margin {before['margin']:.3f} → {after['margin']:.3f}", flush=True)
    return result

