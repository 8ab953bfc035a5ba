"""Language-modelling losses (notes ch.01.1 language models, ch.02.17 ST-MoE z-loss).

Causal-LM cross entropy: L = −(1/|M|) Σ_{t∈M} log softmax(logits_t)[y_t], M = positions whose label is not
`ignore_index` (−100: prompt tokens in SFT, padding).

Label convention: tinyllm batches carry labels that are *already shifted* — labels[:, t] is the token that
should follow input_ids[:, t] (see tinyllm.data.text.PackedBatches) — so logits[:, t] is compared with
labels[:, t] directly. Hugging Face's `LlamaForCausalLM(labels=...)` takes unshifted labels (labels = input_ids)
and drops the last logit / first label internally; `shift_labels` converts that convention to ours.

z-loss (PaLM, Chowdhery et al. 2022; ST-MoE): coef · mean_t (log Z_t)², log Z_t = logsumexp(logits_t); it keeps
the softmax normaliser near 1 and the logits from drifting, with coefficient ~1e-4.

The loss is computed in fp32 whatever the logits' dtype (bf16 log-softmax over a large vocabulary loses
precision).

Chunked cross entropy (`chunked_cross_entropy`, what `causal_lm_loss` runs): for each row the gradient of the
mean loss is ∂L/∂z = (softmax(z) − onehot(y)) / |M|, so one pass over the logits, a few rows at a time while
they sit in cache, yields both the loss (−log softmax(z)_y) and that gradient, which backward only scales by
the incoming gradient (on a CPU one softmax pass gives both; `_softmax_and_loss`). `F.cross_entropy` instead writes an fp32 [N, V] log-softmax in forward, then a zero-filled
[N, V] NLL gradient and another [N, V] log-softmax gradient in backward; on a CPU these passes over memory cost
as much as the lm_head matmul. Same loss and gradients to fp32 rounding (tested). The stored gradient has the
logits' dtype, so its memory equals the log-softmax it replaces.

Linear cross entropy (`linear_cross_entropy`, `model_lm_loss`; the idea of Liger-Kernel's fused linear cross
entropy): given the final hidden states h [N, d] and the lm_head weight W [V, d], each chunk of rows makes its
logits h_c·Wᵀ, its loss and ∂L/∂z_c as above, then ∂L/∂h_c = ∂L/∂z_c·W and ∂L/∂W += ∂L/∂z_cᵀ·h_c, so no [N, V]
tensor exists at all (the same matmul FLOPs; large fresh allocations also cost page faults every step on a
CPU). `model_lm_loss(model, x, y)` runs a CausalLM with `hidden_only=True` and falls back to
`causal_lm_loss(model(x), y)` for any other model. Not covered: a vocabulary-parallel (sharded) variant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross entropy of logits [B, T, V] against shifted labels [B, T] over non-ignored positions."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    return chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and ∂L/∂logits in one chunked forward pass; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,  # type: ignore[override]
                chunk_rows: int) -> torch.Tensor:
        n, v = logits.shape
        valid = labels != ignore_index
        target = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
        # (on an accelerator gather's own bounds check raises instead: reading the flag here would sync)
        if logits.device.type == "cpu" and bool(((target < 0) | (target >= v)).any()):
            bad = labels[valid & ((labels < 0) | (labels >= v))][0].item()
            raise IndexError(f"label {bad} is outside the vocabulary [0, {v}) and is not ignore_index={ignore_index}")
        # 1/|M| per kept row, 0 for ignored rows (|M| = 0 gives nan, as F.cross_entropy's mean does)
        weight = valid.float() / valid.sum()
        row_loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else None
        for s in range(0, n, chunk_rows):
            e = min(s + chunk_rows, n)
            z = logits[s:e].float()
            if grad is None:
                row_loss[s:e] = torch.log_softmax(z, -1).gather(1, target[s:e])[:, 0].neg_()
                continue
            # fp32 logits: z is a view of the input, so the softmax kernel writes straight into the gradient
            direct = grad.dtype == torch.float32
            p = _softmax_and_loss(z, target[s:e], row_loss[s:e], grad[s:e] if direct else torch.empty_like(z))
            p.scatter_add_(1, target[s:e], torch.full_like(p[:, :1], -1.0)).mul_(weight[s:e, None])  # softmax − onehot
            if not direct:
                grad[s:e] = p
        ctx.grad = grad
        return (row_loss * weight).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("chunked_cross_entropy's backward ran twice; its stored gradient is used once")
        # the common case (loss.backward() on this loss) needs no pass over [N, V]; a CPU scalar reads freely
        if grad_out.device.type != "cpu" or grad_out.item() != 1.0:
            grad = grad * grad_out.to(grad.dtype)
        return grad, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(logits.float(), labels, ignore_index) for logits [N, V], computed in row chunks.

    chunk_rows: rows per chunk (default: about 2 MiB of fp32 logits, so a chunk stays in cache)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, V] and labels {tuple(labels.shape)} [N]")
    if chunk_rows is None:
        chunk_rows = max(1, 2**19 // logits.shape[1])
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive")
    return _ChunkedCrossEntropy.apply(logits, labels, ignore_index, chunk_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden · weightᵀ, labels) with the logits made and dropped a chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                ignore_index: int, chunk_rows: int, dtype: torch.dtype) -> torch.Tensor:
        n, v = hidden.shape[0], weight.shape[0]
        h, w = hidden.to(dtype), weight.to(dtype)  # the matmul precision autocast would have used
        valid = labels != ignore_index
        target = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
        if hidden.device.type == "cpu" and bool(((target < 0) | (target >= v)).any()):
            bad = labels[valid & ((labels < 0) | (labels >= v))][0].item()
            raise IndexError(f"label {bad} is outside the vocabulary [0, {v}) and is not ignore_index={ignore_index}")
        row_weight = valid.float() / valid.sum()
        row_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            _linear_ce_chunks(h, w, target, row_weight, row_loss, grad_h, grad_w, chunk_rows, dtype)
        ctx.grads = (None if grad_h is None else grad_h.to(hidden.dtype),
                     None if grad_w is None else grad_w.to(weight.dtype))
        return (row_loss * row_weight).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy's backward ran twice; its stored gradients are used once")
        if grad_out.device.type != "cpu" or grad_out.item() != 1.0:
            grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in grads)
        return grads[0], grads[1], None, None, None, None


def _softmax_and_loss(z: torch.Tensor, target: torch.Tensor, row_loss: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """softmax(z) into `out`, and each row's −log softmax(z)[y] into `row_loss`.

    On a CPU one softmax pass and −log p_y replace log-softmax then exp (two passes over [rows, V], ~1.8× the
    time); where p_y is too small for −log p_y to keep fp32's precision (< 1e-30) the row's loss is taken from
    its log-softmax instead. On an accelerator (where reading that flag would synchronise) log-softmax then
    exp stays."""
    if z.device.type != "cpu":
        logp = torch.ops.aten._log_softmax.out(z, -1, False, out=out)
        row_loss.copy_(logp.gather(1, target)[:, 0].neg_())
        return logp.exp_()
    p = torch.ops.aten._softmax.out(z, -1, False, out=out)
    p_y = p.gather(1, target)[:, 0]
    torch.log(p_y, out=row_loss).neg_()
    tiny = p_y < 1e-30
    if bool(tiny.any()):
        rows = tiny.nonzero()[:, 0]
        row_loss[rows] = torch.log_softmax(z[rows], -1).gather(1, target[rows])[:, 0].neg()
    return p


def _linear_ce_chunks(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor,
                      row_loss: torch.Tensor, grad_h: torch.Tensor | None, grad_w: torch.Tensor | None,
                      chunk_rows: int, dtype: torch.dtype) -> None:
    """The loop of _LinearCrossEntropy: fills row_loss and, when given, grad_h and grad_w (fp32 sum)."""
    n, v = h.shape[0], w.shape[0]
    # buffers reused by every chunk: no [N, V] tensor and no fresh large allocation per chunk
    r = min(chunk_rows, n)
    logits_buf = torch.empty(r, v, dtype=dtype, device=h.device)
    z_buf = logits_buf if dtype == torch.float32 else torch.empty(r, v, device=h.device)
    logp_buf = torch.empty(r, v, device=h.device)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        hc = h[s:e]
        logits = torch.mm(hc, w.t(), out=logits_buf[: e - s])
        z = logits if z_buf is logits_buf else z_buf[: e - s].copy_(logits)  # the loss is taken in fp32
        if grad_h is None and grad_w is None:
            logp = torch.ops.aten._log_softmax.out(z, -1, False, out=logp_buf[: e - s])
            row_loss[s:e] = logp.gather(1, target[s:e])[:, 0].neg_()
            continue
        g = _softmax_and_loss(z, target[s:e], row_loss[s:e], logp_buf[: e - s])
        g = g.scatter_add_(1, target[s:e], torch.full_like(g[:, :1], -1.0))  # softmax − onehot
        g = g.mul_(row_weight[s:e, None])
        if g.dtype != dtype:
            g = logits.copy_(g)  # the matmul-precision gradient, as autocast's backward would round it
        if grad_h is not None:
            torch.mm(g, w, out=grad_h[s:e])
        if grad_w is not None:
            if dtype == torch.float32:
                grad_w.addmm_(g.t(), hc)
            else:
                grad_w += torch.mm(g.t(), hc)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """causal_lm_loss(hidden [N, d] · weight [V, d]ᵀ, labels [N]) without materialising the [N, V] logits.

    Under autocast the matmuls run in the autocast dtype, as an autocast nn.Linear would; the loss is fp32.
    chunk_rows: rows per chunk (default: 512 rows, fewer when they would exceed 64 MiB of fp32 logits; on a
    2-core CPU, fewer rows starve the matmuls and more leave the cache: 512 ran the head of a d128 / 8192-token
    model 1.1× faster than 2048)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, d], weight {tuple(weight.shape)} [V, d] and "
                         f"labels {tuple(labels.shape)} [N]")
    if chunk_rows is None:
        chunk_rows = max(1, min(512, 2**24 // weight.shape[0]))
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive")
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_rows, dtype)


def model_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX, attn_meta: Any = None) -> torch.Tensor:
    """causal_lm_loss(model(input_ids), labels), fused with the lm_head when the model is a plain CausalLM.

    `model` may be wrapped by torch.compile or DistributedDataParallel; a model whose lm_head is not a bias-free
    nn.Linear (e.g. adapted) takes the plain path. `attn_meta` (e.g. `model.attention.document_attn_meta`) is
    passed to a CausalLM's forward; other models refuse it."""
    kw = {} if attn_meta is None else {"attn_meta": attn_meta}
    core = model
    while hasattr(core, "_orig_mod") or hasattr(core, "module"):
        core = getattr(core, "_orig_mod", None) or core.module
    from tinyllm.model.transformer import CausalLM

    head = getattr(core, "lm_head", None)
    if not isinstance(core, CausalLM) or type(head) is not torch.nn.Linear or head.bias is not None:
        return causal_lm_loss(model(input_ids, **kw), labels, ignore_index)
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    h = model(input_ids, hidden_only=True, **kw)
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, labels.reshape(-1), ignore_index)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF-style labels (aligned with input_ids) → ours: labels[:, t] ← labels[:, t + 1], last = ignore."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def z_loss(logits: torch.Tensor, labels: torch.Tensor | None = None, coef: float = 1e-4,
           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """coef · mean (logsumexp logits)² over positions (only those with a label when `labels` is given)."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # [B, T]
    if labels is not None:
        lse = lse[labels != ignore_index]
    return coef * lse.pow(2).mean()
