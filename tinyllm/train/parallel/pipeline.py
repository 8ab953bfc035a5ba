"""Pipeline parallel (notes ch.04 流水线并行; Huang et al. 2019 "GPipe"; Narayanan et al. 2019/2021 "PipeDream",
Megatron's 1F1B): the layers are cut into p consecutive stages, one per rank; a batch is cut into m
micro-batches that flow through the stages, activations forward and their gradients backward over send/recv.

Schedules (each stage runs its list of ops in order; an op waits for its input from the neighbour stage):

    GPipe  all m forwards, then all m backwards             peak activations: m micro-batches per stage
    1F1B   stage s runs p−s−1 warm-up forwards, then alternates one forward / one backward, then drains
           the remaining backwards                           peak activations: p−s micro-batches

Both leave the same idle time, the bubble: with forward time t_f and backward t_b per micro-batch and stage, the
step lasts (m+p−1)(t_f+t_b) of which m(t_f+t_b) is work, so the idle fraction is (p−1)/(m+p−1)
(`tinyllm.calc.gpipe_bubble`). `simulate(schedule(kind, p, m))` plays a schedule on unit-time ops and returns
who does what when (`render` prints it as a grid, `plot` draws it); `PipelineRunner` records the wall-clock
span of every op it executes, so `measured_bubble` reads the real idle fraction off a run.

    split_layers(n_layers, p)           balanced consecutive layer ranges
    PipelineStage(model, s, p)          stage s of a tinyllm CausalLM: (embed) + layers + (norm, lm_head)
    PipelineRunner(stage, group, m, kind, loss_fn)   our schedules over isend/recv; .step(ids, labels)
    sync_tied_grads(stage, group)       embed_tokens on the first stage ≡ lm_head on the last (tied weights)
    clip_grad_norm_(stage, max, group)  global norm over all stages
    gather_pipeline_state_dict / load_stage_state_dict   full checkpoint ↔ stages

`torch.distributed.pipelining` (PipelineStage + ScheduleGPipe / Schedule1F1B) runs the same `PipelineStage`
modules; tests show both equal the single-process run. Not covered: interleaved (virtual-stage) 1F1B,
zero-bubble schedules, activation checkpointing inside stages, uneven micro-batch shapes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.calc.memory import gpipe_bubble
from tinyllm.model.attention import build_attn_meta
from tinyllm.train.parallel.dist import collective_guard

SCHEDULES = ("gpipe", "1f1b")


# ------------------------------------------------------------------ schedules and their simulation
def schedule(kind: str, stages: int, micro: int) -> list[list[tuple[str, int]]]:
    """Per stage, the ordered ops ("F" or "B", micro-batch index)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} is not one of {list(SCHEDULES)}")
    if stages < 1 or micro < 1:
        raise ValueError(f"stages={stages} and micro_batches={micro} must be >= 1")
    out = []
    for s in range(stages):
        if kind == "gpipe":
            ops = [("F", i) for i in range(micro)] + [("B", i) for i in range(micro)]
        else:
            warm = min(stages - s - 1, micro)
            ops = [("F", i) for i in range(warm)]
            for i in range(micro - warm):
                ops += [("F", warm + i), ("B", i)]
            ops += [("B", i) for i in range(micro - warm, micro)]
        out.append(ops)
    return out


@dataclass(frozen=True)
class Op:
    stage: int
    kind: str  # "F" or "B"
    micro: int
    start: float
    end: float


def simulate(ops: list[list[tuple[str, int]]], t_f: float = 1.0, t_b: float = 2.0) -> list[Op]:
    """Play per-stage op lists: F(s, i) needs F(s−1, i), B(s, i) needs B(s+1, i) (last stage: its F(s, i))."""
    p = len(ops)
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * p
    pos = [0] * p
    out: list[Op] = []
    while any(pos[s] < len(ops[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(ops[s]):
                continue
            kind, i = ops[s][pos[s]]
            dep = (s - 1, "F", i) if kind == "F" else ((s + 1, "B", i) if s < p - 1 else (s, "F", i))
            if kind == "F" and s == 0:
                ready = 0.0
            elif dep in done:
                ready = done[dep]
            else:
                continue
            start = max(free[s], ready)
            end = start + (t_f if kind == "F" else t_b)
            done[(s, kind, i)] = free[s] = end
            out.append(Op(s, kind, i, start, end))
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocks: an op waits for one that never runs")
    return out


def bubble_fraction(ops: list[Op]) -> float:
    """Idle share of stages × step time."""
    stages = {o.stage for o in ops}
    span = max(o.end for o in ops) - min(o.start for o in ops)
    return 1.0 - sum(o.end - o.start for o in ops) / (len(stages) * span)


def render(ops: list[Op], unit: float = 1.0) -> str:
    """The timeline as text, one row per stage, one column per `unit` of time ("." = idle)."""
    p = max(o.stage for o in ops) + 1
    width = round(max(o.end for o in ops) / unit)
    rows = [["."] * width for _ in range(p)]
    for o in ops:
        for c in range(round(o.start / unit), round(o.end / unit)):
            rows[o.stage][c] = f"{o.micro % 10}" if o.kind == "F" else "abcdefghij"[o.micro % 10]
    legend = "digits: forward of micro-batch i; letters: backward of micro-batch a=0, b=1, ...; '.': idle"
    return "\n".join(f"stage {s}: {''.join(r)}" for s, r in enumerate(rows)) + "\n" + legend


def plot(ops: list[Op], path: str, title: str = "") -> None:
    """Draw the timeline with matplotlib (an optional dependency: the `docs` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = max(o.stage for o in ops) + 1
    fig, ax = plt.subplots(figsize=(10, 0.5 * p + 1))
    for o in ops:
        ax.barh(p - 1 - o.stage, o.end - o.start, left=o.start, color="#4c72b0" if o.kind == "F" else "#dd8452",
                edgecolor="white")
        ax.text((o.start + o.end) / 2, p - 1 - o.stage, f"{o.kind}{o.micro}", ha="center", va="center",
                fontsize=7, color="white")
    ax.set_yticks(range(p), [f"stage {s}" for s in reversed(range(p))])
    ax.set_xlabel("time")
    ax.set_title(title or f"bubble {bubble_fraction(ops):.0%}")
    fig.tight_layout()
    from tinyllm.atomic import atomic_path

    with atomic_path(path) as tmp:  # a failed draw leaves no half-written picture
        fig.savefig(tmp, format="png")
    plt.close(fig)


def expected_bubble(stages: int, micro: int) -> float:
    """(p−1)/(m+p−1), the figure both schedules reach (calc.memory.gpipe_bubble)."""
    return gpipe_bubble(stages, micro)


# ------------------------------------------------------------------ cutting a CausalLM into stages
def split_layers(num_layers: int, stages: int) -> list[range]:
    """Consecutive ranges, sizes differing by at most one (earlier stages take the extra layers)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"stages={stages} must be between 1 and num_hidden_layers={num_layers}")
    base, extra = divmod(num_layers, stages)
    out, a = [], 0
    for s in range(stages):
        b = a + base + (s < extra)
        out.append(range(a, b))
        a = b
    return out


class PipelineStage(nn.Module):
    """Stage s of p of a tinyllm CausalLM, sharing the model's modules. forward(x) takes token ids on the
    first stage and hidden states [B, T, d] elsewhere; returns hidden states, or logits on the last stage.
    Parameter names are the full model's (`model.layers.{i}...`, `lm_head.weight`) minus what the stage lacks."""

    def __init__(self, model: nn.Module, stage: int, stages: int, layers: range | None = None) -> None:
        super().__init__()
        cfg = model.config
        self.config, self.stage, self.stages = cfg, stage, stages
        self.layer_ids = layers if layers is not None else split_layers(cfg.num_hidden_layers, stages)[stage]
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        # sequence parallel (tensor.py): hidden states between layers, and so between stages, are [B, T/tp, d]
        # slices; a stage that receives one needs T for its positions
        tp_group = getattr(model, "tp_group", None)
        self.seq_split = dist.get_world_size(tp_group) if getattr(model, "sequence_parallel", False) else 1
        inner = model.model
        self.model = nn.Module()
        self.model.pos = inner.pos  # positions are recomputed per stage (rotary tables are cheap)
        self.model.layers = nn.ModuleDict({str(i): inner.layers[i] for i in self.layer_ids})
        self.tied = cfg.tie_word_embeddings
        # context parallel inside the stage (context.py): the global positions of this rank's tokens, set per
        # micro-batch; None: positions 0..T-1
        self.positions: torch.Tensor | None = None
        if self.is_first:
            self.model.embed_tokens = inner.embed_tokens
        if self.is_last:
            self.model.norm = inner.norm
            self.lm_head = model.lm_head
            if self.tied and not self.is_first:  # its own copy; sync_tied_grads keeps the two equal
                self.lm_head = _own_weight_copy(model.lm_head)

    def _positions(self, b: int, t: int, device: torch.device) -> torch.Tensor:
        if self.positions is None:
            return torch.arange(t, device=device).expand(b, t)
        if self.positions.numel() != t:
            raise ValueError(f"stage {self.stage}: {self.positions.numel()} positions for {t} tokens")
        return self.positions.to(device).expand(b, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            b, t = x.shape
            positions = self._positions(b, t, x.device)
            h = self.model.embed_tokens(x)
            absolute = self.model.pos.embed(positions)
            if absolute is not None:
                h = h + absolute.to(h.dtype)
        else:
            h = x
            b, t = h.shape[0], h.shape[1] * self.seq_split
            positions = self._positions(b, t, h.device)
        meta = build_attn_meta(t, 0, b, sliding_window=self.config.sliding_window, device=h.device)
        rotary = self.model.pos.rotary(positions)
        bias = self.model.pos.bias(positions, meta.k_positions)
        for layer in self.model.layers.values():
            h = layer(h, rotary, meta, bias, None)
        if self.is_last:
            h = self.lm_head(self.model.norm(h))
        return h


def _own_weight_copy(head: nn.Module) -> nn.Module:
    """The head module (an nn.Linear, or a tensor-parallel vocabulary shard) with its own copy of the weight: a
    shallow copy whose parameter table is new, so the copy shares everything but the weight."""
    out = copy.copy(head)
    out._parameters = dict(head._parameters)
    w = head.weight
    out.weight = nn.Parameter(w.detach().clone())
    if hasattr(w, "_tp_shard_dim"):
        out.weight._tp_shard_dim = w._tp_shard_dim  # type: ignore[attr-defined]
    return out


def _peer(group, r: int) -> int:
    return dist.get_global_rank(group, r) if group is not None else r


def sync_tied_grads(stage: PipelineStage, group: dist.ProcessGroup | None) -> None:
    """Tied embeddings across stages: first and last stage add each other's gradient of the shared matrix."""
    if not stage.tied or stage.stages == 1 or not (stage.is_first or stage.is_last):
        return
    w = stage.model.embed_tokens.weight if stage.is_first else stage.lm_head.weight
    other = _peer(group, stage.stages - 1 if stage.is_first else 0)
    g = w.grad if w.grad is not None else torch.zeros_like(w)
    buf = torch.empty_like(g)
    with collective_guard("tied-embedding gradient exchange"):
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, g.contiguous(), other, group),
                                            dist.P2POp(dist.irecv, buf, other, group)]):
            work.wait()
    w.grad = g + buf


@torch.no_grad()
def clip_grad_norm_(stage: PipelineStage, max_norm: float, group: dist.ProcessGroup | None,
                    tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Clip to the norm over every stage's gradients (the last stage's copy of a tied matrix counted once); with
    `tp_group`, tensor-parallel shards' squares are summed over it first (replicated parameters counted once)."""
    from tinyllm.train.parallel.tensor import is_sharded

    skip = {id(stage.lm_head.weight)} if stage.tied and stage.is_last and not stage.is_first else set()
    params = [p for p in stage.parameters() if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float64, device=next(stage.parameters()).device)
    sq = sum((p.grad.double().pow(2).sum() for p in params if id(p) not in skip and not is_sharded(p)), zero)
    shards = sum((p.grad.double().pow(2).sum() for p in params if id(p) not in skip and is_sharded(p)), zero)
    with collective_guard("pipeline gradient-norm all-reduce"):
        if tp_group is not None:
            dist.all_reduce(shards, group=tp_group)
        sq = sq + shards
        dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


# ------------------------------------------------------------------ our runner
class PipelineRunner:
    """Run one stage of a schedule. `step(input_ids, labels)` does forward+backward of the whole batch (m
    micro-batches) and returns the mean loss on the last stage (None elsewhere); gradients accumulate in the
    stage's parameters as if the batch had gone through one model. `events` holds the last step's timed ops."""

    def __init__(self, stage: nn.Module, group: dist.ProcessGroup | None, micro_batches: int, kind: str = "1f1b",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 hidden_size: int | None = None) -> None:
        self.stage, self.group, self.m = stage, group, micro_batches
        self.rank, self.p = dist.get_rank(group), dist.get_world_size(group)
        self.ops = schedule(kind, self.p, micro_batches)[self.rank]
        self.loss_fn = loss_fn or _default_loss
        self.hidden = hidden_size or stage.config.hidden_size
        self.events: list[Op] = []

    def _recv(self, shape, dtype, src: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=next(self.stage.parameters()).device)
        with collective_guard(f"pipeline recv from stage {src}"):
            dist.recv(buf, _peer(self.group, src), group=self.group, tag=tag)
        return buf

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float | None:
        if input_ids.shape[0] % self.m:
            raise ValueError(f"batch of {input_ids.shape[0]} rows does not split into micro_batches={self.m}")
        xs, ys = input_ids.chunk(self.m), labels.chunk(self.m)
        first, last = self.rank == 0, self.rank == self.p - 1
        dtype = next(self.stage.parameters()).dtype
        act_shape = (*xs[0].shape, self.hidden)
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        sends: list = []
        total, self.events = 0.0, []
        for kind, i in self.ops:
            if kind == "F":
                x = xs[i] if first else self._recv(act_shape, dtype, self.rank - 1, i).requires_grad_()
                t0 = time.monotonic()
                out = self.stage(x)
                if last:
                    out = self.loss_fn(out, ys[i]) / self.m
                    total += out.item()
                else:
                    sends.append(dist.isend(out.detach().contiguous(), _peer(self.group, self.rank + 1),
                                            group=self.group, tag=i))
                inputs[i], outputs[i] = x, out
            else:
                grad = None if last else self._recv(act_shape, dtype, self.rank + 1, self.m + i)
                t0 = time.monotonic()
                torch.autograd.backward(outputs.pop(i), grad)
                x = inputs.pop(i)
                if not first:
                    sends.append(dist.isend(x.grad.contiguous(), _peer(self.group, self.rank - 1),
                                            group=self.group, tag=self.m + i))
            self.events.append(Op(self.rank, kind, i, t0, time.monotonic()))
        with collective_guard("pipeline sends"):
            for w in sends:
                w.wait()
        return total if last else None


def _default_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from tinyllm.train.losses import causal_lm_loss

    return causal_lm_loss(logits, labels)


def measured_bubble(events: list[Op], group: dist.ProcessGroup | None = None) -> float:
    """Idle fraction of the last step over all stages, from the ops' wall-clock spans (a collective)."""
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, events, group=group)
    return bubble_fraction([o for ev in every for o in ev])


# ------------------------------------------------------------------ checkpoint layout
def gather_pipeline_state_dict(stage_sd: dict[str, torch.Tensor], group: dist.ProcessGroup | None,
                               tied: bool = False) -> dict[str, torch.Tensor]:
    """Merge every stage's state dict (names are already the full model's) into the full one (a collective)."""
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, {k: v.detach().cpu() for k, v in stage_sd.items()}, group=group)
    full: dict[str, torch.Tensor] = {}
    for sd in every:
        for k, v in sd.items():
            full.setdefault(k, v)  # shared pieces (positions) come from the first stage that has them
    if tied:
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    return full


@torch.no_grad()
def load_stage_state_dict(stage: PipelineStage, full: dict[str, torch.Tensor]) -> None:
    """Copy the stage's part of a full CausalLM state dict in (the tied lm_head copy from the embeddings)."""
    own = stage.state_dict()
    missing = [k for k in own if k not in full and not (k == "lm_head.weight" and stage.tied)]
    if missing:
        raise KeyError(f"state dict lacks {missing[:5]} for pipeline stage {stage.stage}")
    for k, t in own.items():
        src = full.get(k)
        if src is None:
            src = full["model.embed_tokens.weight"]
        if src.shape != t.shape:
            raise ValueError(f"{k}: shape {tuple(src.shape)} in the checkpoint, {tuple(t.shape)} in the stage")
        t.copy_(src)
