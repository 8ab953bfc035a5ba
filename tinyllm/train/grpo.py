"""GRPO: Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024; the RL of DeepSeek-R1) with
verifiable rewards (notes ch.07: PPO without a critic).

For each prompt q, sample a group of G completions o_1…o_G from π_old and score them, r_i. The advantage of
every token of o_i is the group-normalised reward — the group mean replaces PPO's learned value baseline:

    Â_i = (r_i − mean(r)) / (std(r) + ε)           std unbiased, ε = 1e-4 (as TRL)

The loss per token t of o_i, with ratio ρ = π_θ(o_t|q, o_<t) / π_old(o_t|…):

    ℓ_{i,t} = −min(ρ Â_i, clip(ρ, 1 − ε_clip, 1 + ε_clip) Â_i) + β D_KL,t
    D_KL,t  = π_ref/π_θ − log(π_ref/π_θ) − 1       (the k3 estimator: unbiased for KL(π_θ‖π_ref), always ≥ 0)

and L = mean over completions of the mean over their tokens ("grpo", the paper's 1/G Σ_i 1/|o_i| Σ_t) or the mean
over all tokens of the batch ("bnpo"). The KL sits in the loss, not in the reward as in PPO. A group whose
completions all score the same has Â = 0: it teaches nothing (only the KL term acts), which is why the task must
be neither trivial nor impossible for the current policy. With num_iterations = 1 (the default) π_old = π_θ at
the update, so ρ ≡ 1 and the objective reduces to REINFORCE with a group baseline; μ > 1 reuses each group μ
times and the clip matters.

Rollouts: `tinyllm.infer` — the reference generator, or the paged engine with SamplingParams(n=G, seed)
(`backend="engine"`). The loss equals TRL 1.16's GRPO loss on the same tensors (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.atomic import atomic_write_json
from tinyllm.train.loop import TrainConfig, TrainResult, train, write_run_config
from tinyllm.train.ppo import RLRunConfig, build_rl_prompts, rl_setup
from tinyllm.train.rl_common import (
    PromptCycle,
    RewardFn,
    RLPrompt,
    RolloutQueue,
    frozen_copy,
    masked_mean,
    pack_pairs,
    sample_responses,
    token_logprobs,
)

GRPO_LOSS_TYPES = ("grpo", "bnpo")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r − group mean) / (group std + eps) for rewards [num_prompts · G] laid out group by group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ‖π_ref): exp(ref − logp) − (ref − logp) − 1 (≥ 0, 0 iff equal)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float = 0.04, clip: float = 0.2,
              loss_type: str = "grpo") -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss from per-token log-probs [B, T] (policy, old policy, reference) and sequence advantages [B]."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {list(GRPO_LOSS_TYPES)}")
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError(f"beta={beta} needs reference log-probs")
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    else:
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    info = {"kl": float(masked_mean(kl.detach(), m)) if kl is not None else 0.0,
            "clip_ratio": float(masked_mean(((ratio - 1).abs() > clip).float(), m))}
    return loss, info


@dataclass
class GRPOSettings:
    num_generations: int = 8
    prompts_per_step: int = 4
    num_iterations: int = 1
    beta: float = 0.04
    clip: float = 0.2
    loss_type: str = "grpo"
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    backend: str = "generate"


class GroupRollouts(RolloutQueue):
    """Endless GRPO batches: each rollout is prompts_per_step prompts × G completions, reused num_iterations
    times (one optimizer step each)."""

    def __init__(self, policy: nn.Module, ref: nn.Module | None, reward_fn: RewardFn, prompts: PromptCycle,
                 s: GRPOSettings, stop_ids: Sequence[int], pad_id: int, seed: int) -> None:
        super().__init__(reward_fn, prompts, stop_ids, pad_id, seed)
        self.policy, self.ref, self.s = policy, ref, s

    @torch.no_grad()
    def make_batches(self) -> list[dict[str, Any]]:
        s, g = self.s, self.s.num_generations
        items = self.prompts.take(s.prompts_per_step)
        groups = sample_responses(self.policy, [p.ids for p in items], g, s.max_new_tokens, s.temperature, s.top_k,
                                  self.seed * 7919 + self.rollouts, self.stop_ids, self.pad_id, s.backend)
        self.rollouts += 1
        flat_p = [p for p in items for _ in range(g)]
        flat_r = [r for grp in groups for r in grp]
        rewards = self.reward_fn(flat_p, flat_r).float()
        adv = group_advantages(rewards, g)
        device = next(self.policy.parameters()).device
        batch = {k: v.to(device) for k, v in pack_pairs([p.ids for p in flat_p], flat_r, self.pad_id).items()}
        ids, mask = batch["input_ids"], batch["response_mask"][:, 1:].float()
        out = {"input_ids": ids, "mask": mask, "advantages": adv.to(device),
               "reward": rewards.mean().to(device)}
        was = self.policy.training
        self.policy.eval()
        if s.num_iterations > 1:  # with one iteration π_old is the policy itself: the loss uses logp.detach()
            out["old_logp"] = token_logprobs(self.policy(ids), ids)
        if self.ref is not None and s.beta != 0.0:
            out["ref_logp"] = token_logprobs(self.ref(ids), ids)
        self.policy.train(was)
        solved = (rewards.view(-1, g).std(dim=1) == 0).float().mean() if g > 1 else torch.tensor(1.0)
        self.history.append({"reward": float(rewards.mean()), "zero_std_groups": float(solved),
                             "completion_len": float(mask.sum(-1).mean())})
        return [out] * s.num_iterations



class GRPOTask:
    """THE loop's task for GRPO: batches are group rollouts; the loss is `grpo_loss`."""

    def __init__(self, policy: nn.Module, reward_fn: RewardFn, prompts: Sequence[RLPrompt], settings: GRPOSettings,
                 stop_ids: Sequence[int], pad_id: int, seed: int = 0, ref: nn.Module | None = None) -> None:
        if settings.num_generations < 2:
            raise ValueError(f"num_generations={settings.num_generations} must be >= 2 (a group needs a baseline)")
        if settings.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type={settings.loss_type!r} is not one of {list(GRPO_LOSS_TYPES)}")
        self.policy, self.reward_fn, self.prompts, self.s = policy, reward_fn, list(prompts), settings
        self.stop_ids, self.pad_id, self.seed = stop_ids, pad_id, seed
        self.ref = ref if ref is not None else (frozen_copy(policy) if settings.beta != 0.0 else None)
        self.rollouts: GroupRollouts | None = None

    def train_batches(self) -> Iterator[Any]:
        if self.ref is not None:
            self.ref.to(next(self.policy.parameters()).device)
        self.rollouts = GroupRollouts(self.policy, self.ref, self.reward_fn, PromptCycle(self.prompts, self.seed),
                                      self.s, self.stop_ids, self.pad_id, self.seed)
        return self.rollouts

    def eval_batches(self) -> Iterable[Any] | None:
        return None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = batch["input_ids"], batch["mask"]
        logp = token_logprobs(model(ids), ids)
        old = batch.get("old_logp", logp.detach())
        loss, info = grpo_loss(logp, old, batch.get("ref_logp"), batch["advantages"], mask, self.s.beta,
                               self.s.clip, self.s.loss_type)
        return loss, {**info, "reward": float(batch["reward"]), "tokens": int(mask.sum())}

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grpo_train(policy: nn.Module, reward_fn: RewardFn, prompts: Sequence[RLPrompt], settings: GRPOSettings,
               cfg: TrainConfig, stop_ids: Sequence[int], pad_id: int) -> tuple[TrainResult, list[dict[str, float]]]:
    """GRPO on `policy` (trained in place); returns (loop result, per-rollout stats)."""
    task = GRPOTask(policy, reward_fn, prompts, settings, stop_ids, pad_id, cfg.seed)
    result = train(policy, task, cfg)
    return result, (task.rollouts.history if task.rollouts else [])


@dataclass
class GRPOConfig(RLRunConfig):
    num_generations: int = field(default=8, metadata={"help": "G: completions sampled per prompt"})
    batch_size: int = field(default=4, metadata={"help": "prompts per step (each with G completions)"})
    num_iterations: int = field(default=1, metadata={"help": "μ: optimizer steps per group batch"})
    beta: float = field(default=0.04, metadata={"help": "β of the k3 KL penalty to the reference (0: no reference)"})
    epsilon: float = field(default=0.2, metadata={"help": "ratio clip ε"})
    loss_type: str = field(default="grpo", metadata={"help": "grpo (per-completion token mean) or bnpo (batch "
                                                             "token mean)", "choices": list(GRPO_LOSS_TYPES)})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations} must be >= 2")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations} must be >= 1")
        if self.beta < 0 or not self.epsilon > 0:
            raise ValueError(f"beta={self.beta} must be >= 0 and epsilon={self.epsilon} > 0")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {list(GRPO_LOSS_TYPES)}")
        if self.task.startswith("builtin:") or self.task.endswith(".jsonl"):
            raise ValueError(f"task={self.task!r}: GRPO needs a verifiable-reward task (arith, reasoning_gym:<name>)")


def run_grpo(cfg: GRPOConfig) -> TrainResult:
    """GRPO on cfg.task; save the policy to out_dir/final and the before/after mean held-out reward to
    out_dir/grpo_metrics.json."""
    from tinyllm.model.hf import save_pretrained
    from tinyllm.train.rl_common import copy_tokenizer_files, evaluate_reward, verifiable_reward
    from tinyllm.utils import pick_device, seed_everything

    seed_everything(cfg.seed)
    policy, tokenizer, stops, pad = rl_setup(cfg)
    policy.to(pick_device(cfg.device))
    train_p, held = build_rl_prompts(cfg, tokenizer)
    reward_fn = verifiable_reward(lambda ids: tokenizer.decode([i for i in ids if i not in stops]))
    settings = GRPOSettings(cfg.num_generations, cfg.batch_size, cfg.num_iterations, cfg.beta, cfg.epsilon,
                            cfg.loss_type, cfg.max_new_tokens, cfg.temperature, 0, cfg.backend)
    out = Path(cfg.out_dir)
    write_run_config(cfg, out, "grpo_run_config.json", num_train_prompts=len(train_p), num_heldout=len(held))

    def score() -> float | None:
        return evaluate_reward(policy, held, reward_fn, cfg.eval_samples, cfg.max_new_tokens, cfg.temperature,
                               cfg.seed + 1, stops, pad, cfg.backend) if held else None

    before = score()
    result, history = grpo_train(policy, reward_fn, train_p, settings, TrainConfig(**cfg.train_fields()), stops, pad)
    if result.interrupted:
        return result
    after = score()
    final = save_pretrained(policy.cpu(), out / "final")
    copy_tokenizer_files(cfg.tokenizer or cfg.init_from, final, tokenizer)
    atomic_write_json(out / "grpo_metrics.json", {"heldout_mean_reward_before": before,
                                                  "heldout_mean_reward_after": after, "rollouts": history})
    if cfg.progress and after is not None:
        print(f"held-out mean reward {before:.3f} → {after:.3f}", flush=True)
    return result
