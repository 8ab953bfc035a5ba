"""Shared pieces of the alignment methods (notes ch.07 强化学习/RLHF): token log-probs of responses, masks,
frozen copies and sampled rollouts.

Layout of every batch here: one row per (prompt, response) pair, **right-padded**,
`input_ids = prompt ‖ response ‖ pad…`, with `attention_mask` (1 on real tokens) and `response_mask` (1 on the
response tokens). Right padding needs no attention mask at all: the padding sits after every scored token,
so causal attention never lets a real token see it, and positions start at 0 in every row.

Per-token log-probs (notes 7.1.a): logits at position t predict token t+1, so

    logp[:, t] = log_softmax(logits[:, t])[input_ids[:, t + 1]]        t = 0 … T−2   ([B, T−1])

and the "action" mask of those T−1 positions is `response_mask[:, 1:]`. A sequence log-prob
log π(y|x) = Σ_t logp[:, t]·mask[:, t] sums the response tokens only (the prompt is given, not generated).

Rollouts (`sample_responses`) draw n completions per prompt either with the reference generator
(`tinyllm.infer.generate`, left-padded batch, one seeded torch.Generator) or with the paged engine
(`tinyllm.infer.LLMEngine`, `SamplingParams(n=…, seed=…)`; "auto" = the engine, falling back to the generator
for a model the engine cannot run); each completion ends at its first stop token (kept) or at `max_new_tokens`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROLLOUT_BACKENDS = ("auto", "generate", "engine")


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] in fp32: logits [B, T, V], tokens [B, T] → [B, T]."""
    logits = logits.float()
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of input_ids[:, 1:] under logits[:, :-1] → [B, T−1] (position t predicts t+1)."""
    return gather_logprobs(logits[:, :-1], input_ids[:, 1:])


def model_token_logprobs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """`token_logprobs(model(input_ids), input_ids)` for right-padded rows."""
    return token_logprobs(model(input_ids), input_ids)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask == 1 (all of them when dim is None: the token-mean of the notes)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL's `masked_whiten`)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    n = m.sum()
    var = ((x - mean) ** 2 * m).sum() / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists → (ids [B, T], attention_mask [B, T])."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pad_right needs a non-empty list of non-empty rows")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pack_pairs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
               pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt, response) token lists → right-padded `input_ids`, `attention_mask`, `response_mask`."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0 or len(r) == 0:
            raise ValueError(f"pair {i}: prompt ({len(p)} tokens) and response ({len(r)} tokens) must be non-empty")
    ids, attn = pad_right([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)
    resp = torch.zeros_like(attn)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        resp[i, len(p): len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(response | prompt) per row: Σ of the response tokens' log-probs → [B]."""
    logp = model_token_logprobs(model, batch["input_ids"])
    return masked_sum(logp, batch["response_mask"][:, 1:])


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each right-padded row's last real token: attention_mask.sum(−1) − 1 (notes 7.1.b)."""
    return attention_mask.long().sum(-1) - 1


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with requires_grad=False everywhere (the reference / reward roles)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def parameter_fingerprint(model: nn.Module) -> float:
    """A cheap checksum of all parameters (to assert a frozen role did not change)."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


def _cut_at_stop(tokens: list[int], stops: set[int], pad_id: int) -> list[int]:
    out = []
    for t in tokens:
        out.append(t)
        if t in stops:
            break
    return out


@torch.no_grad()
def sample_responses(model: nn.Module, prompts: Sequence[Sequence[int]], n: int = 1, max_new_tokens: int = 32,
                     temperature: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (),
                     pad_id: int = 0, backend: str = "generate") -> list[list[list[int]]]:
    """n sampled completions for each prompt: result[i][j] = token ids of completion j of prompt i (ends with its
    stop token when it stopped, never empty)."""
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(ROLLOUT_BACKENDS)}")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n={n} and max_new_tokens={max_new_tokens} must be >= 1")
    stops = set(int(s) for s in stop_ids)
    was_training = model.training
    model.eval()
    try:
        if backend in ("engine", "auto"):
            try:
                return _sample_engine(model, prompts, n, max_new_tokens, temperature, top_k, seed, sorted(stops))
            except (NotImplementedError, AttributeError, TypeError):
                if backend == "engine":
                    raise
                # auto: a model the engine cannot run (no paged-attention path) falls back to the generator
        from tinyllm.infer.generate import generate
        from tinyllm.infer.sampling import make_generator

        rows = [list(p) for p in prompts for _ in range(n)]
        width = max(len(r) for r in rows)
        device = next(model.parameters()).device
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       do_sample=True, temperature=temperature, top_k=top_k, eos_token_id=sorted(stops),
                       pad_token_id=pad_id, generator=make_generator(seed, device))
        gen = out[:, width:].tolist()
        flat = [_cut_at_stop(g, stops, pad_id) or [pad_id] for g in gen]
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]
    finally:
        model.train(was_training)


def _sample_engine(model: nn.Module, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int,
                   temperature: float, top_k: int, seed: int, stops: list[int]) -> list[list[list[int]]]:
    from tinyllm.infer.engine import LLMEngine
    from tinyllm.infer.sampling_params import SamplingParams

    longest = max(len(p) for p in prompts) + max_new_tokens
    # fused=False: the engine runs the model's own forward, so it always sees the current (training) weights
    engine = LLMEngine(model, None, fused=False, max_num_seqs=max(1, len(prompts) * n), max_model_len=longest,
                       enable_prefix_caching=True)
    for i, p in enumerate(prompts):
        params = SamplingParams(n=n, temperature=temperature, top_k=top_k, seed=seed * 100_003 + i * n,
                                max_tokens=max_new_tokens, stop_token_ids=stops, ignore_eos=not stops)
        engine.add_request(str(i), None, params, prompt_token_ids=list(p))
    done: dict[str, list[list[int]]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [list(c.token_ids) or [0] for c in sorted(out.outputs, key=lambda c: c.index)]
    return [done[str(i)] for i in range(len(prompts))]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------ preference-pair batches (reward model, DPO)
def collate_pairs(pairs: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """TokenPairs → one right-padded batch of 2B rows: the B chosen rows first, then the B rejected rows."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return pack_pairs(prompts, responses, pad_id)


class PairBatches:
    """Endless batches of `batch_size` pairs, reshuffled every epoch from (seed, epoch); resumable."""

    def __init__(self, pairs: Sequence, batch_size: int, pad_id: int, seed: int = 0) -> None:
        if not pairs:
            raise ValueError("no preference pairs to batch")
        self.pairs, self.batch_size, self.pad_id, self.seed = list(pairs), batch_size, pad_id, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        import random

        order = list(range(len(self.pairs)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size):
            if self.cursor == len(self.pairs):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
            picked.append(self.pairs[self._order[self.cursor]])
            self.cursor += 1
        return self.collate(picked)

    def collate(self, picked: Sequence) -> dict[str, torch.Tensor]:
        return collate_pairs(picked, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()


def pair_eval_batches(pairs: Sequence, batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate_pairs(pairs[i:i + batch_size], pad_id) for i in range(0, len(pairs), batch_size)]


def copy_tokenizer_files(src: str, dst: Any, tokenizer: Any) -> None:
    """Put the tokenizer next to a saved model (see `tinyllm.train.pretrain.copy_tokenizer_files`)."""
    from tinyllm.train.pretrain import copy_tokenizer_files as copy_files

    copy_files(src, dst, tokenizer)


# ------------------------------------------------------------------ prompts, rewards, evaluation (PPO, GRPO)
@dataclass(frozen=True)
class RLPrompt:
    """A prompt's token ids and what the reward needs to judge a completion (e.g. a tasks_arith.Problem)."""

    ids: tuple[int, ...]
    problem: Any = None


RewardFn = Callable[[Sequence[RLPrompt], Sequence[Sequence[int]]], torch.Tensor]


def verifiable_reward(decode: Callable[[Sequence[int]], str], exact: bool = False) -> RewardFn:
    """Reward = tasks_arith.arith_reward(problem, decoded completion, exact) for each (prompt, completion)."""
    from tinyllm.train.tasks_arith import arith_reward

    def fn(prompts: Sequence[RLPrompt], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor([arith_reward(p.problem, decode(list(r)), exact) for p, r in zip(prompts, responses)])

    return fn


def reward_model_reward(reward_model: nn.Module, pad_id: int) -> RewardFn:
    """Reward = a (frozen) RewardModel's score of prompt ‖ completion at its last token."""

    @torch.no_grad()
    def fn(prompts: Sequence[RLPrompt], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        batch = pack_pairs([p.ids for p in prompts], responses, pad_id)
        device = next(reward_model.parameters()).device
        return reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()

    return fn


@torch.no_grad()
def evaluate_reward(policy: nn.Module, prompts: Sequence[RLPrompt], reward_fn: RewardFn, n: int = 4,
                    max_new_tokens: int = 8, temperature: float = 1.0, seed: int = 12345, stop_ids: Sequence[int] = (),
                    pad_id: int = 0, backend: str = "generate", greedy: bool = False) -> float:
    """Mean reward of completions on held-out prompts: n sampled completions each (or one greedy)."""
    if greedy:
        from tinyllm.infer.generate import generate

        was = policy.training
        policy.eval()
        scores = []
        device = next(policy.parameters()).device
        for p in prompts:  # one prompt at a time: no padding to reason about
            out = generate(policy, torch.tensor([list(p.ids)], device=device), max_new_tokens=max_new_tokens,
                           eos_token_id=list(stop_ids), pad_token_id=pad_id)
            resp = _cut_at_stop(out[0, len(p.ids):].tolist(), set(stop_ids), pad_id) or [pad_id]
            scores.append(float(reward_fn([p], [resp])[0]))
        policy.train(was)
        return sum(scores) / max(len(scores), 1)
    samples = sample_responses(policy, [p.ids for p in prompts], n, max_new_tokens, temperature, 0, seed, stop_ids,
                               pad_id, backend)
    flat_p = [p for p, s in zip(prompts, samples) for _ in s]
    flat_r = [r for s in samples for r in s]
    return float(reward_fn(flat_p, flat_r).float().mean())


class PromptCycle:
    """Endless prompts in a seeded order reshuffled every epoch (the RL trainers' prompt source); resumable."""

    def __init__(self, prompts: Sequence[RLPrompt], seed: int = 0) -> None:
        if not prompts:
            raise ValueError("no prompts for RL rollouts")
        self.prompts, self.seed = list(prompts), seed
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        import random

        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[RLPrompt]:
        out = []
        for _ in range(k):
            if self.cursor == len(self.prompts):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
            out.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()


class RolloutQueue:
    """Endless training batches made from rollouts (the PPO and GRPO task's `train_batches`): when the queue runs
    dry, `make_batches()` samples a fresh rollout from the current policy and returns its mini-batches (each
    reused for several optimizer steps); resumable through the rollout count and the prompt cursor."""

    def __init__(self, reward_fn: RewardFn, prompts: PromptCycle, stop_ids: Sequence[int], pad_id: int,
                 seed: int) -> None:
        self.reward_fn, self.prompts = reward_fn, prompts
        self.stop_ids, self.pad_id, self.seed = list(stop_ids), pad_id, seed
        self.rollouts, self.queue = 0, []
        self.history: list[dict[str, float]] = []

    def make_batches(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __iter__(self) -> RolloutQueue:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.queue:
            self.queue = self.make_batches()
        return self.queue.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts, "prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts = int(state["rollouts"])
        self.prompts.load_state_dict(state["prompts"])
        self.queue = []
