"""RLHF with PPO, DeepSpeed-Chat style (notes ch.07.1: the four models, compute_rewards, GAE, clipped actor
and critic losses, ppo_epochs; Schulman et al. 2017; Ouyang et al. 2022).

Roles: **actor** π_θ (trained; starts from the SFT model), **critic** V (trained; here a value head on the
actor's trunk by default — one forward gives logits and values, and half the memory — or a separate trunk),
**reward** (frozen: a `RewardModel`, or a verifiable-reward program) and **reference** π_ref (a frozen copy of
the starting actor). Token-level MDP (7.1.a): state = prompt + tokens so far, action = next token.

One rollout (experience) per `rollout_batch_size` prompts, all under no_grad:
  1. sample a response per prompt with the actor;
  2. old log-probs log π_old(a_t|s_t) and values V_old(s_t) (actor/critic), log π_ref(a_t|s_t) (reference),
     the sequence score s (reward role);
  3. per-token rewards (`compute_rewards`, 7.1.c):  r_t = −β (log π_old − log π_ref)  on every response token,
     plus clip(s, −5, 5) at the last response token (β = kl_coef 0.1, clip_reward_value 5);
  4. GAE (`gae`, 7.1.d; γ 1.0, λ 0.95):  δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1}, V past the last
     response token = 0;  returns R_t = A_t + V_t;  advantages optionally whitened over the batch.
Then `ppo_epochs` passes over the experience in mini-batches of `batch_size`, one optimizer step each (THE
loop's step):
  actor  (7.1.e):  ratio = exp(log π_θ − log π_old);  L_pg = mean_t max(−A ratio, −A clip(ratio, 1 ± 0.2))
  critic (7.1.f):  V_clip = clip(V, V_old ± 0.2);     L_vf = 0.5 · mean_t max((V − R)², (V_clip − R)²)
  loss = L_pg + vf_coef · L_vf      (means over response tokens of the mini-batch: the notes' token-mean)
In the first mini-batch of a rollout the ratio is exactly 1 (same weights, no dropout); once a token's ratio
leaves the clip range in the direction its advantage pushes, its gradient is zero.

Not covered: adaptive KL control (fixed β), PPO-ptx (pre-training loss mixing), EMA of the actor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.atomic import atomic_dir, atomic_write_json
from tinyllm.train.loop import TrainConfig, TrainResult, train, write_run_config
from tinyllm.train.rl_common import (
    PromptCycle,
    RewardFn,
    RLPrompt,
    RolloutQueue,
    frozen_copy,
    masked_mean,
    masked_whiten,
    pack_pairs,
    sample_responses,
    token_logprobs,
)


# ------------------------------------------------------------------ the formulas
def compute_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                    mask: torch.Tensor, kl_coef: float = 0.1, clip_reward: float = 5.0) -> torch.Tensor:
    """Per-token rewards [B, T]: −kl_coef·(log π − log π_ref) on masked tokens, + clip(score, ±clip_reward) at
    each row's last masked token (rows with no masked token get nothing)."""
    m = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * m
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(-1).values  # [B]
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last[has]] += scores.to(rewards.dtype)[has].clamp(-clip_reward, clip_reward)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by generalized advantage estimation, backwards over the masked tokens;
    V and r are zero off the mask, so V past a row's last token bootstraps 0."""
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    t_max = values.shape[1]
    for t in reversed(range(t_max)):
        nxt = values[:, t + 1] if t + 1 < t_max else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * m
    return adv.detach(), (adv + values).detach()


def actor_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip policy loss, token-mean over mask; also the clip fraction and the approximate KL to π_old."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, {"clipfrac": float(clipfrac), "approx_kl": float(approx_kl)}


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> torch.Tensor:
    """Clipped value loss 0.5 · token-mean max((V − R)², (clip(V, V_old ± clip) − R)²)."""
    clipped = torch.clamp(values, old_values - clip, old_values + clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ------------------------------------------------------------------ actor + critic
class ActorCritic(nn.Module):
    """The actor (a causal LM) with the critic: a value head on the actor's trunk (shared, default) or a
    separate trunk + head (`critic`, e.g. a RewardModel as in DeepSpeed-Chat)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.config = None  # checkpoints go through save_pretrained below
        self.critic = critic
        if critic is None:
            self.v_head = nn.Linear(policy.config.hidden_size, 1)
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T, V], values [B, T])."""
        if self.critic is not None:
            return self.policy(input_ids), self.critic.values(input_ids)
        h = self.policy(input_ids, hidden_only=True)
        return self.policy.lm_head(h), self.v_head(h).squeeze(-1).float()

    def save_pretrained(self, directory: str | Path) -> Path:
        """The actor as an HF checkpoint (what you deploy) + the critic's weights beside it."""
        from safetensors.torch import save_file

        from tinyllm.model.hf import save_pretrained

        directory = Path(directory)
        critic = self.critic.state_dict() if self.critic is not None else self.v_head.state_dict()
        with atomic_dir(directory, keep_existing=True) as tmp:  # actor and critic change together
            save_pretrained(self.policy, tmp)
            save_file({k: v.detach().cpu().contiguous() for k, v in critic.items()},
                      str(tmp / "critic.safetensors"))
        return directory

    def load_pretrained_weights(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        from tinyllm.train.checkpoint import load_model_weights

        load_model_weights(self.policy, Path(directory))
        sd = load_file(str(Path(directory) / "critic.safetensors"))
        (self.critic if self.critic is not None else self.v_head).load_state_dict(sd)


# ------------------------------------------------------------------ experience and the task
@dataclass
class PPOSettings:
    rollout_batch_size: int = 16
    ppo_epochs: int = 4
    mini_batch_size: int = 8
    kl_coef: float = 0.1
    clip_reward: float = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    whiten_advantages: bool = True
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    backend: str = "generate"


class Experience(RolloutQueue):
    """Endless PPO mini-batches: a fresh rollout whenever the previous one has been used ppo_epochs times."""

    def __init__(self, model: ActorCritic, ref: nn.Module, reward_fn: RewardFn, prompts: PromptCycle,
                 s: PPOSettings, stop_ids: Sequence[int], pad_id: int, seed: int) -> None:
        super().__init__(reward_fn, prompts, stop_ids, pad_id, seed)
        self.model, self.ref, self.s = model, ref, s

    @torch.no_grad()
    def make_batches(self) -> list[dict[str, Any]]:
        s = self.s
        items = self.prompts.take(s.rollout_batch_size)
        device = next(self.model.parameters()).device
        responses = [r[0] for r in sample_responses(
            self.model.policy, [p.ids for p in items], 1, s.max_new_tokens, s.temperature, s.top_k,
            self.seed * 7919 + self.rollouts, self.stop_ids, self.pad_id, s.backend)]
        self.rollouts += 1
        batch = {k: v.to(device) for k, v in pack_pairs([p.ids for p in items], responses, self.pad_id).items()}
        ids, mask = batch["input_ids"], batch["response_mask"][:, 1:].float()
        was = self.model.training
        self.model.eval()
        logits, values = self.model(ids)
        self.model.train(was)
        old_logp = token_logprobs(logits, ids)
        values = values[:, :-1] * mask  # V(s_t) for the action at t (token t+1)
        ref_logp = token_logprobs(self.ref(ids), ids)
        scores = self.reward_fn(items, responses).to(device).float()
        rewards = compute_rewards(old_logp, ref_logp, scores, mask, s.kl_coef, s.clip_reward)
        adv, returns = gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            adv = masked_whiten(adv, mask)
        stats = {"score": float(scores.mean()), "kl": float(masked_mean(old_logp - ref_logp, mask)),
                 "response_len": float(mask.sum(-1).mean())}
        self.history.append(stats)
        exp = {"input_ids": ids, "mask": mask, "old_logp": old_logp, "old_values": values, "advantages": adv,
               "returns": returns}
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollouts)
        out = []
        n = ids.shape[0]
        for _ in range(s.ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, s.mini_batch_size):
                idx = perm[i:i + s.mini_batch_size].to(device)
                mb = {k: v[idx] for k, v in exp.items()}
                out.append({**mb, "score": torch.tensor(stats["score"]), "kl": torch.tensor(stats["kl"])})
        return out



class PPOTask:
    """THE loop's task for PPO: batches are experience mini-batches; the loss is actor + vf_coef · critic."""

    def __init__(self, ref: nn.Module, reward_fn: RewardFn, prompts: Sequence[RLPrompt], settings: PPOSettings,
                 stop_ids: Sequence[int], pad_id: int, seed: int = 0) -> None:
        self.ref, self.reward_fn, self.prompts, self.s = ref, reward_fn, list(prompts), settings
        self.stop_ids, self.pad_id, self.seed = stop_ids, pad_id, seed
        self.model: ActorCritic | None = None
        self.experience: Experience | None = None

    def bind(self, model: ActorCritic) -> PPOTask:
        """The task samples rollouts from the model it trains: bind it before `train`."""
        self.model = model
        return self

    def train_batches(self) -> Iterator[Any]:
        if self.model is None:
            raise ValueError("PPOTask.bind(model) first: rollouts are sampled from the model being trained")
        self.ref.to(next(self.model.parameters()).device)
        self.experience = Experience(self.model, self.ref, self.reward_fn, PromptCycle(self.prompts, self.seed),
                                     self.s, self.stop_ids, self.pad_id, self.seed)
        return self.experience

    def eval_batches(self) -> Iterable[Any] | None:
        return None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = batch["input_ids"], batch["mask"]
        logits, values = model(ids)
        logp = token_logprobs(logits, ids)
        pg, info = actor_loss(logp, batch["old_logp"], batch["advantages"], mask, self.s.cliprange)
        vf = critic_loss(values[:, :-1], batch["old_values"], batch["returns"], mask, self.s.cliprange_value)
        return pg + self.s.vf_coef * vf, {"pg_loss": pg.item(), "vf_loss": vf.item(), **info,
                                          "score": float(batch["score"]), "kl": float(batch["kl"]),
                                          "tokens": int(mask.sum())}

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def ppo_train(policy: nn.Module, reward_fn: RewardFn, prompts: Sequence[RLPrompt], settings: PPOSettings,
              cfg: TrainConfig, stop_ids: Sequence[int], pad_id: int,
              critic: nn.Module | None = None) -> tuple[ActorCritic, TrainResult, list[dict[str, float]]]:
    """PPO on `policy` (trained in place); returns (actor-critic, loop result, per-rollout stats)."""
    if settings.rollout_batch_size % settings.mini_batch_size:
        raise ValueError(f"rollout_batch_size={settings.rollout_batch_size} must be a multiple of "
                         f"mini_batch_size={settings.mini_batch_size}")
    ref = frozen_copy(policy)
    model = ActorCritic(policy, critic)
    task = PPOTask(ref, reward_fn, prompts, settings, stop_ids, pad_id, cfg.seed).bind(model)
    result = train(model, task, cfg)
    return model, result, (task.experience.history if task.experience else [])


# ------------------------------------------------------------------ CLI
@dataclass
class RLRunConfig(TrainConfig):
    """Fields shared by `tinyllm ppo` and `tinyllm grpo`."""

    init_from: str = field(default="", metadata={"help": "HF checkpoint (dir or GGUF) of the starting policy"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer path (default: init_from)"})
    task: str = field(default="arith", metadata={
        "help": "prompts + verifiable reward: arith (a+b= with 0…max_operand), reasoning_gym:<name>; "
                "ppo also: prompts of builtin:title / a JSONL (scored by --reward-model)"})
    max_operand: int = field(default=9, metadata={"help": "arith: largest operand"})
    num_prompts: int = field(default=200, metadata={"help": "training prompts"})
    num_heldout: int = field(default=50, metadata={"help": "held-out prompts for the before/after mean reward"})
    chat: bool = field(default=True, metadata={"help": "wrap prompts in the chat template's user turn"})
    max_new_tokens: int = field(default=16, metadata={"help": "tokens per sampled completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts"})
    backend: str = field(default="auto", metadata={"help": "rollouts: the paged engine (auto falls back to the "
                                                          "reference generator)", "choices": ["auto", "engine",
                                                                                              "generate"]})
    eval_samples: int = field(default=4, metadata={"help": "sampled completions per held-out prompt"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    eval_interval: int = field(default=0, metadata={"help": "unused by RL (the before/after reward is reported)"})
    save_interval: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init_from:
            raise ValueError("init_from='' : pass the starting policy (--init-from)")
        for name in ("num_prompts", "max_new_tokens", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_heldout < 0:
            raise ValueError(f"num_heldout={self.num_heldout} must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if not (self.task in ("arith",) or self.task.startswith(("reasoning_gym:", "builtin:"))
                or self.task.endswith(".jsonl")):
            raise ValueError(f"task={self.task!r}: use arith, reasoning_gym:<name>, builtin:title or a .jsonl file")


@dataclass
class PPOConfig(RLRunConfig):
    reward_model: str = field(default="", metadata={"help": "RewardModel dir (from tinyllm reward); empty: the "
                                                            "task's verifiable reward"})
    rollout_batch_size: int = field(default=16, metadata={"help": "prompts per rollout (experience batch)"})
    batch_size: int = field(default=8, metadata={"help": "mini-batch of a PPO update"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    kl_coef: float = field(default=0.1, metadata={"help": "β of the per-token −β·KL reward"})
    clip_reward: float = field(default=5.0, metadata={"help": "reward-model score clipped to ±this"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip ε"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip around the old values"})
    vf_coef: float = field(default=1.0, metadata={"help": "weight of the (already ×0.5) value loss"})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages over each rollout"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout_batch_size % self.batch_size:
            raise ValueError(f"rollout_batch_size={self.rollout_batch_size} must be a multiple of "
                             f"batch_size={self.batch_size}")
        for name in ("cliprange", "cliprange_value", "clip_reward"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.kl_coef < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"kl_coef={self.kl_coef}, gamma={self.gamma}, lam={self.lam}: need kl_coef >= 0 and "
                             "gamma, lam in [0, 1]")
        if (self.task.startswith("builtin:") or self.task.endswith(".jsonl")) and not self.reward_model:
            raise ValueError(f"task={self.task!r} has no verifiable reward: pass --reward-model")


def build_rl_prompts(cfg: RLRunConfig, tokenizer: Any) -> tuple[list[RLPrompt], list[RLPrompt]]:
    """(train, held-out) prompts of cfg.task, encoded (in a chat user turn when cfg.chat)."""
    from tinyllm.data.preference import prompt_and_reply_encoder
    from tinyllm.train.tasks_arith import (
        Problem,
        distinct_arith_problems,
        reasoning_gym_problems,
        split_problems,
    )

    total = cfg.num_prompts + cfg.num_heldout
    if cfg.task == "arith":  # distinct prompts: held-out ones are never trained on
        problems = distinct_arith_problems(total, cfg.seed, cfg.max_operand)
    elif cfg.task.startswith("reasoning_gym:"):
        problems = reasoning_gym_problems(cfg.task.split(":", 1)[1], total, cfg.seed)
    else:
        from tinyllm.data.preference import load_pairs

        seen = list(dict.fromkeys(p.prompt for p in load_pairs(cfg.task, "train", cfg.seed)))
        problems = [Problem(text, "") for text in seen[:total]]
    train_p, held = split_problems(problems, cfg.num_heldout, cfg.seed)
    enc, _ = prompt_and_reply_encoder(tokenizer, cfg.chat)
    return ([RLPrompt(tuple(enc(p.prompt)), p) for p in train_p], [RLPrompt(tuple(enc(p.prompt)), p) for p in held])


def rl_setup(cfg: RLRunConfig) -> tuple[Any, Any, list[int], int]:
    """(policy, tokenizer, stop ids, pad id) for an RL run."""
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
    policy = load_model(cfg.init_from)
    eos = policy.config.eos_token_id
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    end_turn = getattr(tokenizer, "special_tokens", {}).get("<|im_end|>") if cfg.chat else None
    if end_turn is not None and end_turn not in stops:
        stops.append(end_turn)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    return policy, tokenizer, stops, pad


def run_ppo(cfg: PPOConfig) -> TrainResult:
    """PPO on cfg.task's prompts; save the actor to out_dir/final and the before/after mean held-out reward to
    out_dir/ppo_metrics.json."""
    from tinyllm.train.rl_common import (
        copy_tokenizer_files,
        evaluate_reward,
        reward_model_reward,
        verifiable_reward,
    )
    from tinyllm.utils import pick_device, seed_everything

    seed_everything(cfg.seed)
    policy, tokenizer, stops, pad = rl_setup(cfg)
    device = pick_device(cfg.device)
    policy.to(device)
    train_p, held = build_rl_prompts(cfg, tokenizer)
    if cfg.reward_model:
        from tinyllm.train.reward import load_reward_model

        reward_fn = reward_model_reward(load_reward_model(cfg.reward_model, device), pad)
    else:
        reward_fn = verifiable_reward(lambda ids: tokenizer.decode([i for i in ids if i not in stops]))
    settings = PPOSettings(cfg.rollout_batch_size, cfg.ppo_epochs, cfg.batch_size, cfg.kl_coef, cfg.clip_reward,
                           cfg.gamma, cfg.lam, cfg.cliprange, cfg.cliprange_value, cfg.vf_coef,
                           cfg.whiten_advantages, cfg.max_new_tokens, cfg.temperature, 0, cfg.backend)
    out = Path(cfg.out_dir)
    write_run_config(cfg, out, "ppo_run_config.json", num_train_prompts=len(train_p), num_heldout=len(held))

    def score() -> float | None:
        return evaluate_reward(policy, held, reward_fn, cfg.eval_samples, cfg.max_new_tokens, cfg.temperature,
                               cfg.seed + 1, stops, pad, cfg.backend) if held else None

    before = score()
    model, result, history = ppo_train(policy, reward_fn, train_p, settings, TrainConfig(**cfg.train_fields()),
                                       stops, pad)
    if result.interrupted:
        return result
    after = score()
    final = model.save_pretrained(out / "final")
    copy_tokenizer_files(cfg.tokenizer or cfg.init_from, final, tokenizer)
    atomic_write_json(out / "ppo_metrics.json", {"heldout_mean_reward_before": before,
                                                 "heldout_mean_reward_after": after, "rollouts": history})
    if cfg.progress and after is not None:
        print(f"held-out mean reward {before:.3f} → {after:.3f}", flush=True)
    return result
