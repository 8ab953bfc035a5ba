"""ZeRO stages 1/2/3 (notes ch.04 ZeRO; Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"), our own small implementation over torch.distributed collectives.

Data parallel keeps N identical copies of everything; with mixed-precision Adam that is (2 + 2 + K)Ψ bytes per
rank (K = 12: fp32 master weights, m, v). ZeRO partitions the redundant parts over the N data-parallel ranks:

    stage   held per rank                               collectives per step
    1       params Ψ, grads Ψ, optimizer state Ψ/N      reduce-scatter(grads), all-gather(params)
    2       params Ψ, grads Ψ/N, optimizer state Ψ/N    reduce-scatter per bucket *during* backward, all-gather
    3       params Ψ/N, grads Ψ/N, opt. state Ψ/N       all-gather(params) before each unit's forward and backward,
                                                        reduce-scatter(grads) after its backward

The unit of sharding is a *bucket*: a run of parameters (in one weight-decay group) flattened into one buffer,
padded to a multiple of N; rank r owns the slice [r·S, (r+1)·S) of every bucket. Model parameters are views into
their bucket's buffer, so an all-gather into the buffer updates the model in place, and the optimizer (AdamW,
element-wise, hence exactly shardable) steps one shard tensor per bucket. Gradients are reduce-scattered
(sum over ranks, then ÷N: the data-parallel mean), and the global gradient norm for clipping is the square root
of the all-reduced sum of squared shard norms.

Stage 3 buckets follow *units*: each decoder layer is one unit (its buffer storage is freed after its forward and
re-gathered, by a hook on the layer output's gradient, just before its backward); everything else (embeddings,
final norm, lm_head — tied weights included) is the root unit, gathered for the whole step.

    bucket of layer i:  [ rank0 shard | rank1 shard ]     forward:  all_gather → compute → free
                                                          backward: all_gather → grads → reduce_scatter → free

Checkpoints: `full_optimizer_state()` gathers the shards into the state dict of a plain AdamW over the same
parameters and `load_full_optimizer_state` cuts it again, so a checkpoint moves between data parallel and any
stage or world size (`load_full_state_dict` does the same for the weights).

Equal to the single-process run on the global batch (tests, float64). Not covered: fp16/bf16 compute copies with
fp32 masters (we train in the parameters' dtype; bf16 autocast works on top), CPU offload, prefetching the next
unit's all-gather, and Muon (it needs whole matrices: ZeRO here takes AdamW only).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.optim import param_groups
from tinyllm.train.parallel.ddp import broadcast_module
from tinyllm.train.parallel.dist import collective_guard

# torch 2.13 renamed the flat-tensor collectives; older releases only have the *_tensor names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Bucket:
    """A flat buffer holding some parameters' values, padded to a multiple of the world size."""

    def __init__(self, params: list[nn.Parameter], group_idx: int, rank: int, world: int) -> None:
        self.params, self.group_idx = params, group_idx
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = math.ceil(self.numel / world)
        p0 = params[0]
        self.full = torch.zeros(self.shard_numel * world, dtype=p0.dtype, device=p0.device)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.full[offset:offset + n].copy_(p.reshape(-1))
                p.data = self.full[offset:offset + n].view_as(p)  # the model now reads the bucket
                offset += n
        lo = rank * self.shard_numel
        # the optimizer's parameter: this rank's slice, in its own storage (stage 3 frees `full`)
        self.shard = nn.Parameter(self.full[lo:lo + self.shard_numel].clone())
        self.grad_acc: torch.Tensor | None = None  # the reduced, accumulated shard gradient (stages 2, 3)
        self.ready = 0
        self.gathered = True
        self.unit: object = "root"  # stage 3: the decoder layer whose forward gathers this bucket

    def flat_grads(self) -> torch.Tensor:
        """The bucket's gradients in one padded buffer (one pass: cat, not zero-fill then copy)."""
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                 for p in self.params]
        pad = self.full.numel() - self.numel
        if pad:
            parts.append(torch.zeros(pad, dtype=self.full.dtype, device=self.full.device))
        return torch.cat(parts)


class ZeRO:
    """Shard `module`'s optimizer state (stage ≥ 1), gradients (≥ 2) and parameters (3) over the process group.

    Use: `z = ZeRO(model, stage, lr=..., weight_decay=..., betas=...)`; per micro-batch `loss.backward()`
    (inside `z.no_sync()` for all but the last micro-batch under stage 1, optional); then `z.clip_grad_norm_(c)`,
    `z.step()`, `z.zero_grad()`. `z.full_state_dict()` (a collective) returns the whole model's weights.
    """

    def __init__(self, module: nn.Module, stage: int, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, bucket_mb: float = 25.0,
                 named_params: Iterable[tuple[str, nn.Parameter]] | None = None,
                 group: dist.ProcessGroup | None = None, norm_group: dist.ProcessGroup | None = None) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"stage={stage!r} must be 1, 2 or 3")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} must be > 0")
        self.module, self.stage, self.group = module, stage, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        broadcast_module(module, 0, group)
        named = list(named_params) if named_params is not None else list(module.named_parameters())
        groups = param_groups(named, weight_decay)
        if not groups:
            raise ValueError("no trainable parameters (every parameter has requires_grad=False)")
        self.buckets: list[_Bucket] = []
        unit_of = self._units(module) if stage == 3 else {}
        cap = bucket_mb * 2**20
        for gi, g in enumerate(groups):
            runs: dict[object, list[list[nn.Parameter]]] = {}
            for p in g["params"]:  # stage 3: one bucket run per unit, else consecutive runs ≤ cap bytes
                key = unit_of.get(id(p), "root")
                run = runs.setdefault(key, [[]])
                if stage < 3 and run[-1] and sum(q.numel() * q.element_size() for q in run[-1]) + \
                        p.numel() * p.element_size() > cap:
                    run.append([])
                run[-1].append(p)
            for key, run in runs.items():
                for ps in run:
                    if ps:
                        b = _Bucket(ps, gi, self.rank, self.world)
                        b.unit = key
                        self.buckets.append(b)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        # tensor parallel beside ZeRO: the gradient norm also sums over `norm_group`, where elements of
        # parameters sharded over it count fully and replicated ones (equal on every rank) 1/|group| each
        self.norm_group = norm_group
        if norm_group is not None:
            share = 1.0 / dist.get_world_size(norm_group)
            for b in self.buckets:
                w = torch.cat([torch.full((p.numel(),), 1.0 if getattr(p, "_tp_shard_dim", None) is not None
                                          else share, dtype=torch.float64) for p in b.params])
                w = torch.nn.functional.pad(w, (0, b.full.numel() - b.numel))
                b.norm_weight = w[self.rank * b.shard_numel:(self.rank + 1) * b.shard_numel].to(b.full.device)
        shard_groups = [{"params": [b.shard for b in self.buckets if b.group_idx == gi],
                         "weight_decay": g["weight_decay"]} for gi, g in enumerate(groups)]
        self.optimizer = _adamw(shard_groups, lr, betas, eps)
        # the plain optimizer's parameter order (train.optim.param_groups): the layout of a full optimizer state
        self._order = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
        self._group_sizes = [len(g["params"]) for g in groups]
        self._callback_queued = False
        if stage >= 2:
            for b in self.buckets:
                for p in b.params:
                    p.register_post_accumulate_grad_hook(self._on_grad)
        if stage == 3:
            self._install_unit_hooks(module)
            for b in self.buckets:
                if b.unit != "root":
                    self._free(b)

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _units(module: nn.Module) -> dict[int, object]:
        """Stage 3: parameter id → its decoder layer (the unit); parameters outside any layer belong to root."""
        layers = decoder_layers(module)
        return {id(p): layer for layer in layers for p in layer.parameters()}

    def _install_unit_hooks(self, module: nn.Module) -> None:
        for layer in decoder_layers(module):
            buckets = [b for b in self.buckets if b.unit is layer]
            layer.register_forward_pre_hook(lambda m, a, bs=buckets: self._gather_all(bs))
            layer.register_forward_hook(lambda m, a, out, bs=buckets: self._after_forward(bs, out))

    def _after_forward(self, buckets: list[_Bucket], out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            # the gradient w.r.t. the layer's output arrives just before the layer's own backward
            out.register_hook(lambda g, bs=buckets: self._gather_all(bs))
        for b in buckets:
            self._free(b)

    # ------------------------------------------------------------------ parameter gather / free (stage 3)
    def _gather_all(self, buckets: list[_Bucket]) -> None:
        for b in buckets:
            self._gather(b)

    def _gather(self, b: _Bucket) -> None:
        if b.gathered:
            return
        b.full.untyped_storage().resize_(b.full.numel() * b.full.element_size())
        with torch.no_grad(), collective_guard("ZeRO-3 parameter all-gather"):
            _all_gather(b.full, b.shard.detach(), group=self.group)
        b.gathered = True

    def _free(self, b: _Bucket) -> None:
        if self.stage == 3 and b.unit != "root" and b.gathered:
            b.full.untyped_storage().resize_(0)
            b.gathered = False

    # ------------------------------------------------------------------ gradients
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accepted for symmetry with DDP and changes nothing: stage 1 accumulates full gradients locally and
        reduces once at step time anyway; stages 2/3 must reduce every micro-batch (as DeepSpeed does) because
        dropping the full gradient right after its reduce-scatter is the point of the stage."""
        return contextlib.nullcontext()

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._callback_queued = True
        b = self._bucket_of[id(p)]
        b.ready += 1
        if b.ready == len(b.params):
            self._reduce_bucket(b)

    def _reduce_bucket(self, b: _Bucket) -> None:
        """Reduce-scatter the bucket's gradient, keep this rank's mean shard, drop the full-size gradients."""
        flat = b.flat_grads()
        out = torch.empty(b.shard_numel, dtype=flat.dtype, device=flat.device)
        with collective_guard("ZeRO gradient reduce-scatter"):
            _reduce_scatter(out, flat, group=self.group)
        out /= self.world
        b.grad_acc = out if b.grad_acc is None else b.grad_acc.add_(out)
        for p in b.params:
            p.grad = None  # stage 2/3: full gradients live only until their bucket is reduced
        b.ready = 0
        self._free(b)

    def _end_backward(self) -> None:
        for b in self.buckets:  # parameters that got no gradient this backward
            if b.ready:
                self._reduce_bucket(b)
        self._callback_queued = False

    def _shard_grads(self) -> None:
        """Stage 1: one reduce-scatter per bucket of the accumulated full gradients, at step time."""
        if self.stage != 1:
            return
        for b in self.buckets:
            if any(p.grad is not None for p in b.params):
                self._reduce_bucket(b)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm of the (mean) gradient; scale the shards by min(1, max_norm / (norm + 1e-6))."""
        self._shard_grads()
        sq = torch.zeros((), dtype=torch.float64, device=self.buckets[0].full.device)
        for b in self.buckets:
            if b.grad_acc is not None:
                if self.norm_group is not None:
                    sq += (b.grad_acc.double() ** 2 * b.norm_weight).sum()
                else:
                    sq += torch.linalg.vector_norm(b.grad_acc).double() ** 2
        with collective_guard("ZeRO gradient-norm all-reduce"):
            dist.all_reduce(sq, group=self.group)
            if self.norm_group is not None:
                dist.all_reduce(sq, group=self.norm_group)
        norm = float(sq.sqrt())
        if math.isfinite(max_norm):
            coef = min(1.0, max_norm / (norm + 1e-6))
            if coef < 1.0:
                for b in self.buckets:
                    if b.grad_acc is not None:
                        b.grad_acc.mul_(coef)
        return norm

    # ------------------------------------------------------------------ optimizer step
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self) -> None:
        self._shard_grads()
        for b in self.buckets:
            b.shard.grad = b.grad_acc.to(b.shard.dtype) if b.grad_acc is not None else None
        self.optimizer.step()
        with torch.no_grad():
            for b in self.buckets:
                if self.stage == 3 and b.unit != "root":
                    continue  # gathered on next use
                with collective_guard("ZeRO parameter all-gather"):
                    _all_gather(b.full, b.shard.detach(), group=self.group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.grad_acc = None
            b.shard.grad = None
            for p in b.params:
                p.grad = None

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """The module with every stage-3 unit gathered (a collective on entry), freed again on exit."""
        for b in self.buckets:
            self._gather(b)
        try:
            yield self.module
        finally:
            for b in self.buckets:
                self._free(b)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank: the whole model's weights (gathers stage-3 units), as CPU clones."""
        with self.gathered() as m:
            return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

    def load_full_state_dict(self, load: Callable[[nn.Module], object]) -> None:
        """Every rank: `load(module)` writes whole weights into the model (e.g. a checkpoint's); the buckets and
        this rank's shards follow."""
        for b in self.buckets:
            self._gather(b)
        load(self.module)
        with torch.no_grad():
            for b in self.buckets:
                b.shard.copy_(b.full[self.rank * b.shard_numel:(self.rank + 1) * b.shard_numel])
                self._free(b)

    def full_optimizer_state(self) -> dict:
        """A collective. The optimizer state of a plain AdamW over the same parameters (`train.optim.param_groups`
        order: what `build_optimizer` saves under data parallel), the shards all-gathered and cut per parameter —
        so a ZeRO checkpoint resumes under dp, or under another stage or world size, and the other way round."""
        shard = self.optimizer.state_dict()
        state: dict[int, dict] = {}
        for j, b in enumerate(self.buckets_in_optimizer_order()):
            st = shard["state"].get(j)
            if not st:
                continue
            full = {}
            for key, t in st.items():
                if isinstance(t, torch.Tensor) and t.numel() == b.shard_numel and t.dim() == 1:
                    buf = torch.empty(b.full.numel(), dtype=t.dtype, device=t.device)
                    with collective_guard("ZeRO optimizer-state all-gather"):
                        _all_gather(buf, t.contiguous(), group=self.group)
                    full[key] = buf
            offset = 0
            for p in b.params:
                n = p.numel()
                # every tensor its own copy: a "step" shared between parameters would be advanced once per parameter
                state[self._order[id(p)]] = {k: full[k][offset:offset + n].view(p.shape).cpu().clone() if k in full
                                             else v.clone() if isinstance(v, torch.Tensor) else v
                                             for k, v in st.items()}
                offset += n
        groups, start = [], 0
        for g, size in zip(shard["param_groups"], self._group_sizes):
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + size))})
            start += size
        return {"state": state, "param_groups": groups}

    def load_full_optimizer_state(self, full: dict) -> None:
        """The inverse of `full_optimizer_state`: each rank keeps its slice of every bucket's state."""
        if len(full.get("param_groups", ())) != len(self._group_sizes) or \
                [len(g["params"]) for g in full["param_groups"]] != self._group_sizes:
            raise ValueError("the checkpoint's optimizer state has groups of "
                             f"{[len(g['params']) for g in full.get('param_groups', ())]} parameters; this model's "
                             f"AdamW has {self._group_sizes}: not the same model or trainable set")
        state: dict[int, dict] = {}
        lo = self.rank
        for j, b in enumerate(self.buckets_in_optimizer_order()):
            per = [full["state"].get(self._order[id(p)]) for p in b.params]
            if not any(per):
                continue
            if not all(per):
                raise ValueError("the checkpoint's optimizer state covers only some parameters of a bucket")
            st = {}
            for key, v in per[0].items():
                if isinstance(v, torch.Tensor) and v.shape == b.params[0].shape and key != "step":
                    flat = torch.cat([x[key].reshape(-1).to(b.shard.device, b.shard.dtype) for x in per])
                    flat = torch.nn.functional.pad(flat, (0, b.full.numel() - b.numel))
                    st[key] = flat[lo * b.shard_numel:(lo + 1) * b.shard_numel].clone()
                else:
                    st[key] = v.clone() if isinstance(v, torch.Tensor) else v
            state[j] = st
        own = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": [
            {**fg, "params": og["params"]} for fg, og in zip(full["param_groups"], own["param_groups"])]})

    def buckets_in_optimizer_order(self) -> list[_Bucket]:
        """The buckets in the order of the shard optimizer's parameters (its state dict's indices)."""
        by_shard = {id(b.shard): b for b in self.buckets}
        return [by_shard[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def shard_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state right now (for the memory check)."""
        params = sum(b.full.untyped_storage().nbytes() + b.shard.numel() * b.shard.element_size()
                     for b in self.buckets)
        grads = sum(b.grad_acc.numel() * b.grad_acc.element_size() for b in self.buckets if b.grad_acc is not None)
        opt = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor) and t.dim() > 0)
        return {"params": params, "grads": grads, "optimizer": opt}


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the children of its first nn.ModuleList named `layers` (HF naming)."""
    for name, m in module.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(m, nn.ModuleList):
            return list(m)
    return []
