"""Tensor parallel (notes ch.04 张量并行; Shoeybi et al. 2019, "Megatron-LM"): every weight matrix of a layer is
split over the tp ranks of a group, each rank computes its slice, and two collectives per block stitch the
slices back together.

    column-parallel  Y = X·[A₁ | A₂]  → rank r keeps Yᵣ = X·Aᵣ     (A split along its output dim; no communication)
    row-parallel     Y = [X₁ X₂]·[B₁; B₂] = Σᵣ Xᵣ·Bᵣ             (B split along its input dim; an all-reduce sums)

An MLP is column-parallel (gate/up) then row-parallel (down): the activation between them is already split the
right way, so a whole block needs one all-reduce forward and one backward. Megatron's conjugate operators:

    f: forward identity,   backward all-reduce   (before a block: every rank's input gradient is partial)
    g: forward all-reduce, backward identity     (after a block: sums the row-parallel partial outputs)

Attention splits by heads: q/k/v are column-parallel (rank r holds query heads [r·H/tp, (r+1)·H/tp)), o_proj is
row-parallel. GQA: when tp divides the K/V head count each rank holds Hkv/tp K/V heads (split); when the K/V
heads are fewer than the ranks (tp a multiple of Hkv) each rank needs exactly one K/V head and keeps the full
k/v weights *replicated*, computing only the rows of its head; the replicas' partial gradients are summed.

The vocabulary is split too: `VocabParallelEmbedding` (rank r owns token rows [r·V/tp, (r+1)·V/tp); ids outside
give zeros, an all-reduce adds the one rank that had the row) and a column-parallel `lm_head` whose logits stay
split for `vocab_parallel_cross_entropy` (max, Σexp and the target logit each need one all-reduce over the
group, and the [N, V] logits never exist on one rank) or are all-gathered for plain use (`gather_output`).

`tensor_parallel(model, group, sequence_parallel=False)` shards a built `CausalLM` in place (each rank keeps its
slice of the same full weights, so build the model identically on all ranks, e.g. same seed or loaded
checkpoint); `tp_lm_loss` is the training loss through the split vocabulary; `clip_grad_norm_` computes the
global norm over shards. With `sequence_parallel` the norms and residuals run on T/tp tokens (sequence.py).

MoE layers are not split: with `replicate_moe` they stay whole on every TP rank (expert.py spreads the experts
over another group: EP × TP). Not covered: splitting an expert itself over TP, absolute position embeddings with sequence
parallel, fused QKV communication, vocabularies that do not divide by tp (pad the vocabulary). Sequence parallel
is a training layout: the hidden states a forward returns are the rank's T/tp slice, so `last_only` and KV-cache
decoding need a model sharded without it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tinyllm.train.parallel.dist import collective_guard
from tinyllm.train.parallel.sequence import gather_sequence, reduce_scatter_to_sequence, sum_grad_over

IGNORE_INDEX = -100


# ------------------------------------------------------------------ the conjugate operators f and g
def _all_reduce(x: torch.Tensor, group, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous().clone()
    with collective_guard(what):
        dist.all_reduce(x, op=op, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _all_reduce(grad, ctx.group, "tensor-parallel f (input gradient all-reduce)"), None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        return _all_reduce(x, group, "tensor-parallel g (row-parallel output all-reduce)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather the column-parallel slices along the last dim; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        with collective_guard("tensor-parallel output all-gather"):
            dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        n = grad.shape[-1] // dist.get_world_size(ctx.group)
        return grad.narrow(-1, dist.get_rank(ctx.group) * n, n).contiguous(), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherLastDim.apply(x, group)


# ------------------------------------------------------------------ layers
def _shard(t: torch.Tensor, dim: int, rank: int, world: int, what: str) -> torch.Tensor:
    if t.shape[dim] % world:
        raise ValueError(f"{what}: size {t.shape[dim]} along dim {dim} does not divide by tp={world}")
    n = t.shape[dim] // world
    return t.detach().narrow(dim, rank * n, n).clone()


def _param(t: torch.Tensor, shard_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(t)
    if shard_dim is not None:
        p._tp_shard_dim = shard_dim  # type: ignore[attr-defined]  # how the checkpoint gather rebuilds it
    return p


class ColumnParallelLinear(nn.Module):
    """Y_r = X·A_rᵀ (+ b_r): rows [r·out/tp, (r+1)·out/tp) of the weight; input already passed through f."""

    def __init__(self, linear: nn.Linear, group, gather_output: bool = False) -> None:
        super().__init__()
        self.group, self.gather_output = group, gather_output
        r, w = dist.get_rank(group), dist.get_world_size(group)
        self.weight = _param(_shard(linear.weight, 0, r, w, "column-parallel weight"), 0)
        self.bias = _param(_shard(linear.bias, 0, r, w, "column-parallel bias"), 0) if linear.bias is not None \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return gather_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = Σ_r X_r·B_rᵀ + b: columns [r·in/tp, ...) of the weight; g (or a sequence reduce-scatter) sums."""

    def __init__(self, linear: nn.Linear, group, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        r, w = dist.get_rank(group), dist.get_world_size(group)
        self.weight = _param(_shard(linear.weight, 1, r, w, "row-parallel weight"), 1)
        # the bias is added once, after the sum: replicated, and every rank's gradient of it is already whole
        self.bias = _param(linear.bias.detach().clone(), None) if linear.bias is not None else None
        if self.bias is not None and sequence_parallel:
            sum_grad_over(self.bias, group)  # added to T/tp tokens per rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


class ReplicatedKVLinear(nn.Module):
    """Full k/v weights on every rank (K/V heads < tp); this rank computes only the rows of K/V head `head`."""

    def __init__(self, linear: nn.Linear, group, head: int, head_dim: int) -> None:
        super().__init__()
        self.rows = slice(head * head_dim, (head + 1) * head_dim)
        self.weight = _param(linear.weight.detach().clone(), None)
        self.bias = _param(linear.bias.detach().clone(), None) if linear.bias is not None else None
        for p in (self.weight, self.bias):
            if p is not None:
                sum_grad_over(p, group)  # each replica's gradient covers only its query heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias[self.rows] if self.bias is not None else None
        return F.linear(x, self.weight[self.rows], b)


class VocabParallelEmbedding(nn.Module):
    """Rows [lo, hi) of the embedding table; ids outside look up zeros and the reduction adds the owner's row."""

    def __init__(self, emb: nn.Embedding, group, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        r, w = dist.get_rank(group), dist.get_world_size(group)
        self.weight = _param(_shard(emb.weight, 0, r, w, "vocab-parallel embedding"), 0)
        self.vocab_start = r * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [B, T, d]
        out = out.masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)
        return reduce_from_tp(out, self.group)


class VocabParallelHead(ColumnParallelLinear):
    """lm_head split over the vocabulary. forward → full logits (all-gathered); local_logits → this rank's slice."""

    def __init__(self, linear: nn.Linear, group, sequence_parallel: bool = False) -> None:
        super().__init__(linear, group, gather_output=True)
        self.sequence_parallel = sequence_parallel
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = gather_sequence(h, self.group) if self.sequence_parallel else copy_to_tp(h, self.group)
        return F.linear(h, self.weight, self.bias)  # [B, T, V/tp]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(self.local_logits(h), self.group)


# ------------------------------------------------------------------ vocab-parallel cross entropy
class _VocabParallelCE(torch.autograd.Function):
    """Mean CE over non-ignored rows from logits split along the vocabulary; ∂L/∂z stored in forward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,  # type: ignore[override]
                ignore_index: int) -> torch.Tensor:
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, float64 kept
        z = z - _all_reduce(z.max(-1).values, group, "vocab-parallel CE max", dist.ReduceOp.MAX)[:, None]
        e = z.exp()
        sum_exp = _all_reduce(e.sum(-1), group, "vocab-parallel CE sum of exp")  # [N]
        valid = labels != ignore_index
        local = labels - vocab_start
        mine = valid & (local >= 0) & (local < z.shape[-1])
        idx = local.masked_fill(~mine, 0)[:, None]
        target = _all_reduce(z.gather(1, idx)[:, 0] * mine, group, "vocab-parallel CE target logit")
        count = valid.sum().clamp(min=1)
        loss = ((sum_exp.log() - target) * valid).sum() / count
        grad = e / sum_exp[:, None]
        grad.scatter_add_(1, idx, -mine[:, None].to(grad.dtype))
        grad *= (valid.to(grad.dtype) / count)[:, None]
        ctx.save_for_backward(grad.to(logits.dtype))
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """logits [N, V/tp] (this rank's vocabulary rows from vocab_start), labels [N] → the full-vocabulary mean CE."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, V/tp] and labels {tuple(labels.shape)} [N]")
    return _VocabParallelCE.apply(logits, labels, vocab_start, group, ignore_index)


def tp_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The causal-LM loss of a `tensor_parallel` model without ever gathering the full logits."""
    head = model.lm_head
    if not isinstance(head, VocabParallelHead):
        raise TypeError("tp_lm_loss needs a model transformed by tensor_parallel()")
    h = model(input_ids, hidden_only=True)
    logits = head.local_logits(h)
    return vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        head.vocab_start, head.group, ignore_index)


# ------------------------------------------------------------------ the transformation
def _check(model: nn.Module, world: int, sequence_parallel: bool, replicate_moe: bool = False) -> None:
    cfg = model.config
    if cfg.num_local_experts and not replicate_moe:
        raise ValueError("tensor_parallel does not split MoE layers; use expert_parallel for the experts")
    if cfg.num_local_experts and sequence_parallel:
        raise ValueError("sequence_parallel with MoE layers: the routers would see each rank's sequence slice and "
                         "the replicated experts' gradients would differ over the group")
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if h % world:
        raise ValueError(f"num_attention_heads={h} does not divide by tp={world}")
    if hkv % world and world % hkv:
        raise ValueError(f"num_key_value_heads={hkv} and tp={world}: one must divide the other")
    for name in ("intermediate_size", "vocab_size"):
        if getattr(cfg, name) % world:
            raise ValueError(f"{name}={getattr(cfg, name)} does not divide by tp={world}")
    if sequence_parallel and cfg.position_type in ("learned", "sinusoidal"):
        raise ValueError(f"sequence_parallel with position_type={cfg.position_type!r}: absolute position "
                         "embeddings are not split along the sequence; use rope/alibi/none")


def _input_hook(group, sequence_parallel: bool):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = gather_sequence(args[0], group) if sequence_parallel else copy_to_tp(args[0], group)
        return (x, *args[1:])

    return hook


def _parallel_attention(attn: nn.Module, group, sp: bool) -> None:
    r, w = dist.get_rank(group), dist.get_world_size(group)
    attn.q_proj = ColumnParallelLinear(attn.q_proj, group)
    if attn.num_kv_heads % w == 0:
        attn.k_proj = ColumnParallelLinear(attn.k_proj, group)
        attn.v_proj = ColumnParallelLinear(attn.v_proj, group)
        attn.num_kv_heads //= w
    else:  # fewer K/V heads than ranks: rank r's query heads all read K/V head r // (tp / Hkv)
        head = r // (w // attn.num_kv_heads)
        attn.k_proj = ReplicatedKVLinear(attn.k_proj, group, head, attn.head_dim)
        attn.v_proj = ReplicatedKVLinear(attn.v_proj, group, head, attn.head_dim)
        attn.num_kv_heads = 1
    attn.num_heads //= w
    attn.o_proj = RowParallelLinear(attn.o_proj, group, sp)
    for norm in (attn.q_norm, attn.k_norm):  # qk-norm gains are shared by all heads, each rank sees some
        for p in norm.parameters():
            sum_grad_over(p, group)
    attn.register_forward_pre_hook(_input_hook(group, sp))


def _parallel_mlp(mlp: nn.Module, group, sp: bool) -> None:
    for name in ("gate_proj", "up_proj"):
        if hasattr(mlp, name):
            setattr(mlp, name, ColumnParallelLinear(getattr(mlp, name), group))
    mlp.down_proj = RowParallelLinear(mlp.down_proj, group, sp)
    mlp.register_forward_pre_hook(_input_hook(group, sp))


def tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                    sequence_parallel: bool = False, replicate_moe: bool = False) -> nn.Module:
    """Shard a tinyllm CausalLM over `group` in place (Megatron layout) and return it.

    replicate_moe: MoE layers stay whole on every rank of the group (for expert parallel over another group,
    EP × TP): their input, the residual stream, is the same on every TP rank, so each computes the same output
    and the same gradients; attention, embeddings and dense MLPs are split as usual."""
    from tinyllm.model.moe import MoE

    world = dist.get_world_size(group)
    _check(model, world, sequence_parallel, replicate_moe)
    inner = model.model
    tied = model.lm_head.weight is inner.embed_tokens.weight
    for layer in inner.layers:
        _parallel_attention(layer.self_attn, group, sequence_parallel)
        if not isinstance(layer.mlp, MoE):
            _parallel_mlp(layer.mlp, group, sequence_parallel)
        if sequence_parallel:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                for p in norm.parameters():
                    sum_grad_over(p, group)
    if sequence_parallel:
        for p in inner.norm.parameters():
            sum_grad_over(p, group)
    emb = VocabParallelEmbedding(inner.embed_tokens, group, sequence_parallel)
    head = VocabParallelHead(model.lm_head, group, sequence_parallel)
    if tied:
        head.weight = emb.weight
    inner.embed_tokens, model.lm_head = emb, head
    model.tp_group, model.sequence_parallel = group, sequence_parallel
    return model


def is_sharded(p: torch.Tensor) -> bool:
    return getattr(p, "_tp_shard_dim", None) is not None


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Clip to a global L2 norm: Σ‖g‖² of the shards summed over `group`, replicated parameters counted once."""
    params = [p for p in dict.fromkeys(params) if p.grad is not None]  # tied weights once
    zero = torch.zeros((), dtype=torch.float64, device=params[0].grad.device if params else None)
    sharded = sum((p.grad.double().pow(2).sum() for p in params if is_sharded(p)), zero)
    sharded = _all_reduce(sharded, group, "gradient-norm all-reduce")
    rep = sum((p.grad.double().pow(2).sum() for p in params if not is_sharded(p)), zero)
    total = (sharded + rep).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total
