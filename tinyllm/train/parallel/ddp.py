"""Data parallel (notes ch.04 数据并行 DP/DDP): every rank holds the whole model, sees 1/N of the global batch,
and the gradients are averaged across ranks before the optimizer step, so all replicas stay identical.

Two implementations, equal to each other and to the single-process run on the global batch (tests):

- `wrap_ddp(model)`: torch's DistributedDataParallel — the one to use. Accumulation over k micro-batches runs
  the first k-1 backwards inside `model.no_sync()` (gradients accumulate locally, no communication) and
  all-reduces once, on the last.
- `BucketedDP(model)`: the mechanism DDP hides, written out for teaching. Parameters are grouped into buckets
  of ~`bucket_mb` MB in *reverse* registration order (backward produces gradients roughly last layer first);
  a post-accumulate-grad hook marks each parameter ready, and when every parameter of a bucket is ready its
  gradients are flattened into one buffer and an asynchronous all-reduce starts — communication of the late
  layers overlaps the backward of the early ones. A callback queued on the autograd engine waits for all
  buckets at the end of backward and writes the averaged buffers back into `.grad`.

    rank r:  forward(batch_r) → backward ─┬─ bucket 2 ready → all_reduce(async) ─┐
                                          ├─ bucket 1 ready → all_reduce(async) ─┤→ wait → grad /= N → step
                                          └─ bucket 0 ready → all_reduce(async) ─┘

Why averaging gives the single-process gradient: with equal local batches the mean loss over the global batch
is the mean of the per-rank mean losses, and the gradient is linear.

Not covered: DDP's gradient-as-bucket-view memory trick, static-graph and unused-parameter detection beyond
"a parameter without a gradient contributes zeros"; communication hooks (fp16/PowerSGD compression).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.parallel.dist import collective_guard


def wrap_ddp(model: nn.Module, bucket_mb: float = 25.0, device: torch.device | None = None) -> nn.Module:
    """torch DDP around `model` (already on its device). On CUDA it pins the replica to `device`. A mixture of
    experts skips an expert that no token of a micro-batch chose, so its parameters get no gradient on that rank:
    DDP must look for unused parameters there, or the ranks' all-reduce buckets stop matching."""
    dev = device or next(model.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    moe = bool(getattr(getattr(model, "config", None), "num_local_experts", 0))
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_mb,
                                               find_unused_parameters=moe)


def broadcast_module(module: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s (the replicas must start identical)."""
    with torch.no_grad(), collective_guard("broadcast of initial parameters"):
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=dist.get_global_rank(group, src) if group is not None else src, group=group)


def make_buckets(params: list[nn.Parameter], bucket_mb: float) -> list[list[nn.Parameter]]:
    """Consecutive groups of `params` whose byte size stays ≤ bucket_mb MB (one oversized parameter: its own)."""
    cap = bucket_mb * 2**20
    buckets: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if buckets[-1] and size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return [b for b in buckets if b]


class BucketedDP(nn.Module):
    """Teaching data parallel: bucketed asynchronous gradient all-reduce driven by autograd hooks."""

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} must be > 0")
        self.module = module
        self.group = group
        self.world = dist.get_world_size(group)
        broadcast_module(module, 0, group)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = make_buckets(list(reversed(params)), bucket_mb)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._sync = True
        self._reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._pending: dict[int, tuple[torch.Tensor, dist.Work]] = {}
        self._callback_queued = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside accumulate gradients locally; the next backward outside all-reduces the sum."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync:
            return
        if not self._callback_queued:
            # runs once the whole backward pass is done, on the autograd engine's thread
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):
            self._launch(i)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        with collective_guard(f"gradient all-reduce of bucket {i}"):
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending[i] = (flat, work)

    def _finish(self) -> None:
        for i in range(len(self.buckets)):  # a parameter that got no gradient leaves its bucket unlaunched
            if i not in self._pending:
                self._launch(i)
        for i, (flat, work) in self._pending.items():
            with collective_guard(f"gradient all-reduce of bucket {i}"):
                work.wait()
            flat /= self.world
            offset = 0
            for p in self.buckets[i]:
                n = p.numel()
                g = flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                offset += n
        self._reset()
