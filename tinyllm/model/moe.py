"""Mixture of Experts feed-forward block (notes ch.02.16–02.18).

y = Σ_i G(x)_i · E_i(x) + Σ_s S_s(x): a router G picks a few of `num_local_experts` expert FFNs per token,
only the picked experts run on that token, and `num_shared_experts` dense experts S_s (DeepSeekMoE style,
added with weight 1) run on every token. Experts are the gated MLP of mlp.py (SwiGLU for Mixtral).

Routers (registry `ROUTERS`, chosen at build time; all compute in float32, the "selective precision" of
Switch Transformers, so bf16 models route exactly like fp32 ones):

- `topk` — Mixtral: p = softmax(x·W_gᵀ); keep the k largest p and renormalise them to sum to 1.
- `noisy_topk` — Shazeer et al. 2017, "Outrageously Large Neural Networks": in training
  H = x·W_g + N(0,1)·softplus(x·W_noise), in eval H = x·W_g; G = softmax(KeepTopK(H, k)).
- `switch` — Fedus et al. 2021, "Switch Transformers": top-1, gate = p of the chosen expert (not
  renormalised); each expert takes at most capacity = ⌈tokens/experts · capacity_factor⌉ tokens, in token
  order over the flattened [B·T] batch; the overflow gets a zero FFN output, so the residual carries it.

`router_jitter_noise` ε multiplies the router input by U(1−ε, 1+ε) in training (Switch places it there;
Mixtral also feeds the jittered input to the experts — we do not).

Auxiliary loss, set as `self.aux_loss` on every forward (train and eval) and summed by `CausalLM.aux_loss()`:
  aux = router_aux_loss_coef · N·Σ_i f_i·P_i + router_z_loss_coef · (1/T)·Σ_t (logsumexp_j logit_tj)²
with f_i = (tokens routed to expert i, counting all k choices, before capacity drops) / T and P_i the mean
router probability of expert i. This is the load-balancing loss of Switch (top-1: equals 1 for uniform
routing, N when everything goes to one expert) in the Mixtral form (top-k: Σ f_i = k, uniform gives k), and
the router z-loss of ST-MoE (Zoph et al. 2022). It is per layer; HF Mixtral pools f and P over all layers
before multiplying, so a whole-model total differs from HF's — each layer matches HF's function exactly.

Dispatch gathers the tokens each expert receives (sparse); `forward_dense` runs every expert on every token
and weights them — the oracle the sparse path is tested against.

Checkpoint names (inside a layer): router `mlp.gate.weight` [E, d] (noisy router also `mlp.gate.noise_weight`),
experts `mlp.experts.{j}.{gate,up,down}_proj.weight`, shared `mlp.shared_experts.{j}.{gate,up,down}_proj.weight`.
`moe_from_hf` reads the original Mixtral layout (`block_sparse_moe.experts.{j}.w1/w3/w2`) and the
transformers-5 fused layout (`mlp.experts.gate_up_proj` [E, 2I, d], `mlp.experts.down_proj` [E, d, I]);
`moe_to_hf` writes the original layout, which transformers 4 loads as is and 5 converts on load.

Not covered: hierarchical MoE, GShard random second-expert routing, expert-choice routing, Shazeer's
importance/load losses, Qwen2-MoE's sigmoid gate on the shared expert, expert parallelism (train/parallel).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.model.config import ModelConfig
from tinyllm.model.mlp import build_mlp


class Routing(NamedTuple):
    """One router decision for N tokens over E experts (k choices per token)."""

    logits: torch.Tensor  # [N, E] fp32, the logits routing was decided on
    probs: torch.Tensor  # [N, E] fp32, softmax(logits)
    weights: torch.Tensor  # [N, k] fp32 gate values (0 where dropped)
    experts: torch.Tensor  # [N, k] int64 chosen experts
    keep: torch.Tensor  # [N, k] bool, False where a capacity limit dropped the choice


# ------------------------------------------------------------------ losses
def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """N·Σ_i f_i·P_i with f_i = (choices of expert i)/T over experts [T, k] and P_i = mean_t probs[t, i]."""
    t = probs.shape[0]
    counts = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
    counts.scatter_add_(0, experts.reshape(-1), torch.ones(experts.numel(), device=probs.device))
    return num_experts * torch.sum(counts / t * probs.float().mean(0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """(1/T)·Σ_t (logsumexp_j logits[t, j])² — keeps router logits small (ST-MoE)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """⌈tokens/experts · capacity_factor⌉ (6 tokens, 3 experts: CF 1.0 → 2, CF 1.5 → 3)."""
    # round first so 10/4·1.2 = 3.0000000000000004 does not become 4
    return math.ceil(round(num_tokens / num_experts * capacity_factor, 9))


# ------------------------------------------------------------------ routers
class Router(nn.Module):
    """Shared parts: the [E, d] weight, fp32 logits, training-time input jitter."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.jitter = cfg.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, 0.0, cfg.initializer_range)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x, self.weight.float())  # [N, E]


class TopKRouter(Router):
    """Mixtral: softmax over all experts, keep the top k, renormalise the k weights to sum to 1."""

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        top, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = top / top.sum(-1, keepdim=True)
        return Routing(logits, probs, weights, experts, torch.ones_like(experts, dtype=torch.bool))


class NoisyTopKRouter(Router):
    """Shazeer 2017: H = xW_g + N(0,1)·softplus(xW_noise) (training only); G = softmax(KeepTopK(H, k))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.noise_weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))
        nn.init.normal_(self.noise_weight, 0.0, cfg.initializer_range)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        if self.training:
            std = F.softplus(F.linear(x.float(), self.noise_weight.float()))
            logits = logits + torch.randn_like(logits) * std
        top, experts = logits.topk(self.top_k, dim=-1)
        # softmax over the k kept logits = softmax with −∞ everywhere else
        weights = top.softmax(-1)
        return Routing(logits, logits.softmax(-1), weights, experts, torch.ones_like(experts, dtype=torch.bool))


class SwitchRouter(Router):
    """Switch: top-1, gate = router prob of the chosen expert, capacity limit with token dropping."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.top_k = 1
        self.capacity_factor = cfg.expert_capacity_factor

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        top, experts = probs.max(-1, keepdim=True)  # [N, 1]
        capacity = expert_capacity(x.shape[0], self.num_experts, self.capacity_factor)
        one_hot = F.one_hot(experts[:, 0], self.num_experts)  # [N, E]
        # 1-based rank of each token among those choosing the same expert, in token order
        rank = (one_hot.cumsum(0) * one_hot).sum(-1, keepdim=True)  # [N, 1]
        keep = rank <= capacity
        return Routing(logits, probs, top * keep, experts, keep)


ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter, "noisy_topk": NoisyTopKRouter, "switch": SwitchRouter}


# ------------------------------------------------------------------ the block
class MoE(nn.Module):
    """Sparse MoE FFN: forward(x [B, T, d]) → [B, T, d]; sets `aux_loss` and `router_logits` [B·T, E]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_local_experts
        self.lb_coef = cfg.router_aux_loss_coef
        self.z_coef = cfg.router_z_loss_coef
        self.gate = ROUTERS[cfg.router_type](cfg)
        self.experts = nn.ModuleList(build_mlp(cfg) for _ in range(cfg.num_local_experts))
        shared = cfg.shared_expert_intermediate_size or cfg.intermediate_size
        self.shared_experts = nn.ModuleList(build_mlp(cfg, shared) for _ in range(cfg.num_shared_experts))
        self.aux_loss: torch.Tensor | None = None
        self.router_logits: torch.Tensor | None = None
        self.routing: Routing | None = None

    def _route(self, x: torch.Tensor) -> Routing:
        r = self.gate(x)
        self.routing = r
        self.router_logits = r.logits
        self.aux_loss = (self.lb_coef * load_balancing_loss(r.probs, r.experts, self.num_experts)
                         + self.z_coef * router_z_loss(r.logits))
        return r

    def _shared(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for expert in self.shared_experts:
            y = y + expert(x)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # [N, d]
        r = self._route(flat)
        y = torch.zeros_like(flat)
        weights = r.weights.to(x.dtype)
        chosen = torch.where(r.keep, r.experts, -1)  # dropped choices match no expert
        for j, expert in enumerate(self.experts):
            tok, slot = torch.where(chosen == j)  # the tokens expert j receives, and which of their k slots
            if tok.numel() == 0:
                continue
            y.index_add_(0, tok, expert(flat[tok]) * weights[tok, slot, None])
        return self._shared(flat, y).view(b, t, d)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: every expert on every token, weighted by the (mostly zero) combine matrix."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # [N, d]
        r = self._route(flat)
        combine = torch.zeros(flat.shape[0], self.num_experts, dtype=torch.float32, device=x.device)
        combine.scatter_add_(1, r.experts, r.weights * r.keep)  # [N, E]
        y = sum(combine[:, j, None].to(x.dtype) * expert(flat) for j, expert in enumerate(self.experts))
        return self._shared(flat, y).view(b, t, d)


def build_moe(cfg: ModelConfig) -> nn.Module:
    return MoE(cfg)


# ------------------------------------------------------------------ checkpoint name maps
_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_W_BACK = {v: k for k, v in _W.items()}
_ORIGINAL = re.compile(r"^(.*)\.block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w[123])\.weight)$")
_FUSED = re.compile(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_OURS = re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def moe_from_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral original (`block_sparse_moe...w1/w2/w3`) or transformers-5 fused expert tensors → our names."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if m := _ORIGINAL.match(name):
            prefix, _, j, wk = m.groups()
            key = "gate.weight" if j is None else f"experts.{j}.{_W[wk]}.weight"
            out[f"{prefix}.mlp.{key}"] = w
        elif m := _FUSED.match(name):
            prefix, kind = m.groups()
            if w.dim() != 3 or w.shape[0] != cfg.num_local_experts:
                raise ValueError(f"{name} has shape {tuple(w.shape)}, expected "
                                 f"[num_local_experts={cfg.num_local_experts}, ...]")
            if kind == "down_proj":
                for j in range(w.shape[0]):
                    out[f"{prefix}.mlp.experts.{j}.down_proj.weight"] = w[j]
            else:
                gate, up = w.chunk(2, dim=1)  # [E, 2I, d] = cat(gate, up) along dim 1
                for j in range(w.shape[0]):
                    out[f"{prefix}.mlp.experts.{j}.gate_proj.weight"] = gate[j].contiguous()
                    out[f"{prefix}.mlp.experts.{j}.up_proj.weight"] = up[j].contiguous()
        else:
            out[name] = w
    return out


def moe_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names → the original Mixtral checkpoint layout (`block_sparse_moe.gate`, `experts.{j}.w1/w2/w3`)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if m := _OURS.match(name):
            prefix, j, proj = m.groups()
            out[f"{prefix}.block_sparse_moe.experts.{j}.{_W_BACK[proj]}.weight"] = w
        elif name.endswith(".mlp.gate.weight"):
            out[name.removesuffix(".mlp.gate.weight") + ".block_sparse_moe.gate.weight"] = w
        else:
            out[name] = w
    return out
