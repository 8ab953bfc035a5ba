"""The training loop's strategy for pipeline parallel: `tinyllm pretrain|sft --pp P [--parallel dp]` under torchrun.

The N ranks form a grid dp × pp (`init_device_mesh`, pp the inner axis: a pipeline is P consecutive ranks). Rank
s of a pipeline holds stage s of the model (`pipeline.PipelineStage`: the embeddings on the first stage, a
balanced run of decoder layers, the final norm, the lm_head and the task's loss on the last). The loop's k
gradient-accumulation micro-batches are the pipeline's micro-batches: every rank draws the same k global
micro-batches from the data (same seed), keeps its data-parallel rows, and runs its stage's list of ops of the
schedule (`pp_schedule`: 1F1B by default, or GPipe) — forward of micro-batch i receives the activation from the
previous stage and sends its own on; backward receives the activation's gradient from the next stage and sends
its input's gradient back. Each rank knows every micro-batch's [B, T] from its own copy of the batch, so only
tensors travel.

After the schedule: the loss (and the task's token count) goes from the last stage to every stage of its
pipeline (a broadcast), gradients are averaged over the data-parallel group, the tied embedding's two copies
(first stage: embed_tokens, last stage: lm_head) add each other's gradient, and clipping uses the global norm
over all stages (`pipeline.clip_grad_norm_`). Both copies of a tied matrix then take the same AdamW step, so
they stay equal. Checkpoints merge the stages (`pipeline.gather_pipeline_state_dict`) into one full HF model
written by rank 0, with the optimizer state of the single-process AdamW (the stages' pieces merged by parameter
name, `strategy.ModelParallelResume`), so `--resume` works under any pp, tp or dp layout. Evaluation runs
forward-only through the pipeline, each eval batch one micro-batch.

Every rank builds the whole model (same seed, so each stage starts from the single-process weights) and then frees
what its stage does not hold (`release_unowned`): a rank keeps about 1/P of the decoder layers.

`--pp P --tp T`: the mesh becomes dp × pp × tp (tp innermost); the whole model is split by tensor parallel
over each TP group (`tensor.tensor_parallel`) before the stages are cut, so a stage's layers are Megatron
shards, activations between stages are whole (each TP rank sends its copy to the same TP rank of the next
stage) — or, with `--sp`, each TP rank's [B, T/tp, d] sequence slice, sent to the same TP rank of the next
stage (1/tp of the bytes; the receiving stage takes T = tp × its slice for the positions) — the tied head of the last stage is a vocabulary shard like the embedding it copies, clipping sums the
shards' squares over the TP group and then over the stages, and checkpoints gather TP then PP.

`--pp P --cp C`: the mesh becomes dp × pp × cp × tp; every stage's attention is a ring over its cp group (the
ranks holding the same stage, `context.context_parallel`), each rank keeps its chunks of every micro-batch's
sequence (`context_strategy.cut_chunk`, zig-zag or contiguous) and runs its stage at their global positions, and
stages pass each cp rank's [B, T/cp, d] to the same cp rank of the next stage. The last stage weights each
chunk's loss by its share of the global micro-batch's labelled tokens (as under `--cp` alone), so gradients and
losses are *summed* over the ranks holding the same stage and TP shard (every dp and cp index).

Not covered: MoE auxiliary losses across stages, torch.compile of the
stages, building only the stage's layers in the first place (the whole model exists briefly on every rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.train.optim import build_optimizer
from tinyllm.train.parallel import dist as tdist
from tinyllm.train.parallel.context import all_reduce_grads
from tinyllm.train.parallel.context_strategy import cut_chunk, global_label_count
from tinyllm.train.parallel.layout import adamw_order
from tinyllm.train.parallel.pipeline import (
    PipelineStage,
    _peer,
    clip_grad_norm_,
    gather_pipeline_state_dict,
    schedule,
    sync_tied_grads,
)
from tinyllm.train.parallel.strategy import (
    ModelParallelResume,
    Strategy,
    _copy_with,
    _slice_rows,
    input_ids_of,
)


def release_unowned(module: nn.Module, stage: nn.Module) -> int:
    """Free the storage of every parameter of `module` that `stage` does not hold (other stages' layers, the
    embeddings or head this stage lacks): each becomes an empty tensor. Returns the number of elements freed."""
    keep = {id(p) for p in stage.parameters()}
    freed = 0
    for p in module.parameters():
        if id(p) not in keep and p.numel():
            freed += p.numel()
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            p.grad = None
    return freed


class _StageAsModel(nn.Module):
    """What the task's loss sees on the last stage: a module whose forward ignores the token ids it is given
    and runs the stage on the activation received from the previous stage (set in `x`), returning logits."""

    def __init__(self, stage: PipelineStage) -> None:
        super().__init__()
        self.stage = stage
        self.x: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("hidden_only") or kwargs.get("cache") is not None or args:
            raise ValueError("under pipeline parallel the task's loss gets logits from model(input_ids) only")
        return self.stage(self.x)


class PipelineParallelStrategy(ModelParallelResume, Strategy):
    name = "pp"

    def __init__(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], opt_args: dict[str, Any],
                 pp: int, kind: str = "1f1b", tp: int = 1, sp: bool = False, cp: int = 1,
                 cp_layout: str = "zigzag") -> None:
        super().__init__(module, params, opt_args)
        cfg = getattr(module, "config", None)
        if cfg is None or not hasattr(module, "model") or not hasattr(module.model, "layers"):
            raise ValueError(f"pipeline parallel cuts a tinyllm CausalLM into stages, not a {type(module).__name__}")
        if getattr(cfg, "num_local_experts", 0):
            raise ValueError("pipeline parallel with an MoE model: the auxiliary losses live on every stage and "
                             "are not collected (train MoE with --ep or --parallel dp)")
        if cfg.num_hidden_layers < pp:
            raise ValueError(f"pp={pp} stages but the model has num_hidden_layers={cfg.num_hidden_layers}")
        schedule(kind, pp, 1)  # validates the schedule's name
        self._full_order = adamw_order(params)  # the single-process AdamW's indices, for checkpoints
        world = dist.get_world_size()
        self.dp, self.pp, self.tp, self.cp, self.kind = world // (pp * cp * tp), pp, tp, cp, kind
        self.cp_layout = cp_layout
        self.pp_group = self.dp_group = self.tp_group = self.cp_group = self.replicas = None
        if world > pp:
            from torch.distributed.device_mesh import init_device_mesh

            # tp innermost (a TP group is tp consecutive ranks: one node), then the ring, the stages, data parallel
            mesh = init_device_mesh(self._comm_device().type, (self.dp, pp, cp, tp),
                                    mesh_dim_names=("dp", "pp", "cp", "tp"))
            self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
            self.tp_group = mesh.get_group("tp") if tp > 1 else None
            if cp > 1:
                self.cp_group = mesh.get_group("cp")
                # the ranks holding the same stage and TP shard (every dp and cp index) sum gradients and losses;
                # every rank creates every such group, in the same order
                for s in range(pp):
                    for t in range(tp):
                        g = dist.new_group([((d * pp + s) * cp + c) * tp + t for d in range(self.dp)
                                            for c in range(cp)])
                        if (self.rank // (cp * tp)) % pp == s and self.rank % tp == t:
                            self.replicas = g
        if tp > 1:
            from tinyllm.train.parallel.tensor import tensor_parallel

            if any(not p.requires_grad for p in module.parameters()):
                raise ValueError("tensor parallel trains every parameter: the task freezes some (use --parallel dp)")
            tensor_parallel(module, self.tp_group, sequence_parallel=sp)  # every layer sharded; the stage keeps its own
            params = list(module.named_parameters())
            self.name = "pp×tp" + ("+sp" if sp else "")
        if cp > 1:
            from tinyllm.train.parallel.context import context_parallel

            context_parallel(module, self.cp_group, cp_layout)
            self.name += "×cp"
        self.seq_split = tp if sp and tp > 1 else 1  # what passes between stages: [B, T/seq_split, d]
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        self._global_counts: list[int] = []
        self.s = dist.get_rank(self.pp_group) if self.pp_group is not None else self.rank
        self.world = self.dp  # the loop counts tokens × world: the stages of a pipeline share their rows
        self.stage = PipelineStage(module, self.s, pp)
        self.first, self.last = self.stage.is_first, self.stage.is_last
        self.view = _StageAsModel(self.stage)
        self.model = self.stage
        trainable = {id(p) for _, p in params}
        embed_trainable = id(module.model.embed_tokens.weight) in trainable
        own = [(n, p) for n, p in self.stage.named_parameters()
               if id(p) in trainable or (n == "lm_head.weight" and self.stage.tied and embed_trainable)]
        self.params = own
        self.optimizer = build_optimizer(own, **opt_args) if own else _NoOptimizer()
        self.dtype = next(module.parameters()).dtype
        self.device = next(module.parameters()).device
        self.freed = release_unowned(module, self.stage)
        self._tp_state_group, self._merge_state, self._merge_state_group = self.tp_group, True, self.pp_group
        if self.stage.tied:
            self._state_alias = {"lm_head.weight": "model.embed_tokens.weight"}  # the last stage's copy

    # ---------------------------------------------------------------- point to point
    def _send(self, t: torch.Tensor, stage: int, tag: int) -> Any:
        return dist.isend(t.contiguous(), _peer(self.pp_group, stage), group=self.pp_group, tag=tag)

    def _recv(self, shape: tuple[int, ...], stage: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        with tdist.collective_guard(f"pipeline recv from stage {stage}"):
            dist.recv(buf, _peer(self.pp_group, stage), group=self.pp_group, tag=tag)
        return buf

    def _from_last_stage(self, payload: Any) -> Any:
        box = [payload]
        with tdist.collective_guard("pipeline loss broadcast"):
            dist.broadcast_object_list(box, src=_peer(self.pp_group, self.pp - 1), group=self.pp_group)
        return box[0]

    # ---------------------------------------------------------------- the loop's hooks
    def local_batch(self, batch: Any) -> Any:
        if self.cp > 1:  # each chunk's loss weight is its share of the global micro-batch's labelled tokens
            self._global_counts.append(global_label_count(batch))
        return _slice_rows(batch, self.dp_rank, self.dp)

    def _chunks(self, batches: list[Any]) -> list[tuple[Any, float, torch.Tensor | None]]:
        """Per micro-batch: (what this rank runs, its loss weight, its tokens' global positions or None)."""
        k = len(batches)
        if self.cp == 1:
            return [(b, 1.0, None) for b in batches]
        counts, self._global_counts = self._global_counts[-k:], []
        out = []
        for batch, everyone in zip(batches, counts, strict=True):
            part, mine, idx = cut_chunk(batch, self.cp_rank, self.cp, self.cp_layout)
            out.append((part, mine / max(everyone, 1), idx))
        return out

    def _sum(self, values: list[float], group: Any) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        with tdist.collective_guard("pipeline × context-parallel loss all-reduce"):
            dist.all_reduce(t, group=group)
        return t.tolist()

    def forward_backward(self, task: Any, batches: list[Any], autocast: Any) -> tuple[float, int, dict]:
        """Run the schedule over the k micro-batches; returns (Σ micro-batch losses, tokens, task metrics) of this
        pipeline's rows, the same on every stage."""
        k = len(batches)
        hidden = self.stage.config.hidden_size
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        sends: list = []
        total, tokens, metrics = 0.0, 0, {}
        parts = self._chunks(batches)
        for kind, i in schedule(self.kind, self.pp, k)[self.s]:
            batch, w, self.stage.positions = parts[i]
            ids = input_ids_of(batch)
            shape = (ids.shape[0], ids.shape[1] // self.seq_split, hidden)
            if kind == "F":
                x = ids if self.first else self._recv(shape, self.s - 1, i).requires_grad_()
                with autocast:
                    if self.last:
                        self.view.x = x
                        loss, metrics = task.loss(self.view, batch)
                        self.view.x = None
                        out = loss * (w / k)
                    else:
                        out = self.stage(x)
                if self.last:
                    if w:  # a chunk without labelled tokens (weight 0) adds nothing
                        total += loss.item() * w
                        tokens += int(metrics.get("tokens", ids.numel()))
                else:
                    sends.append(self._send(out.detach().to(self.dtype), self.s + 1, i))
                inputs[i], outputs[i] = x, out
            else:
                out = outputs.pop(i)
                grad = None if self.last else self._recv(shape, self.s + 1, k + i).to(out.dtype)
                torch.autograd.backward(out, grad)
                x = inputs.pop(i)
                if not self.first:
                    sends.append(self._send(x.grad, self.s - 1, k + i))
        with tdist.collective_guard("pipeline sends"):
            for work in sends:
                work.wait()
        self.stage.positions = None
        total, tokens, metrics = self._from_last_stage((total, tokens, metrics) if self.last else None)
        if self.cp > 1:  # the weights make the sum over the stage's replicas the global mean
            total, tokens = self._sum([total, tokens], self.replicas)
        return total, int(tokens), metrics

    @torch.no_grad()
    def eval_loss(self, task: Any, batch: Any, autocast: Any) -> float:
        """Forward only: the whole eval batch as one micro-batch through the stages; the last stage's loss."""
        w = 1.0
        if self.cp > 1:
            everyone = global_label_count(batch)
            batch, mine, self.stage.positions = cut_chunk(batch, self.cp_rank, self.cp, self.cp_layout)
            w = mine / max(everyone, 1)
        ids = input_ids_of(batch)
        x = ids if self.first else self._recv((ids.shape[0], ids.shape[1] // self.seq_split,
                                               self.stage.config.hidden_size), self.s - 1, 0)
        value = None
        with autocast:
            if self.last:
                self.view.x = x
                value = task.loss(self.view, batch)[0].item()  # always run: the ring is collective
                value = value * w if w else 0.0
                self.view.x = None
            else:
                out = self.stage(x)
        self.stage.positions = None
        if not self.last:
            with tdist.collective_guard("pipeline send"):
                self._send(out.to(self.dtype), self.s + 1, 0).wait()
        value = self._from_last_stage(value)
        return self._sum([value], self.cp_group)[0] if self.cp > 1 else value

    def clip_grad_norm(self, max_norm: float) -> float:
        if self.cp > 1:
            all_reduce_grads([p for _, p in self.params], self.replicas, average=False)
        elif self.dp_group is not None:
            all_reduce_grads([p for _, p in self.params], self.dp_group, average=True)
        sync_tied_grads(self.stage, self.pp_group)
        return float(clip_grad_norm_(self.stage, max_norm, self.pp_group, self.tp_group))

    def mean(self, x: float) -> float:
        if self.dp_group is None or self.cp > 1:  # with cp: already summed over the replicas
            return x  # every stage of the one pipeline holds the same (broadcast) loss
        t = torch.tensor([x], dtype=torch.float64, device=self._comm_device())
        with tdist.collective_guard("loss all-reduce"):
            dist.all_reduce(t, group=self.dp_group)
        return t.item() / self.dp

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.tp > 1:  # the stage's tensor-parallel shards first, then the stages
            from tinyllm.train.parallel.layout import gather_full_state_dict

            mine = {k: v.cpu() for k, v in gather_full_state_dict(self.stage, self.tp_group).items()}
        else:
            mine = self.stage.state_dict()
        return gather_pipeline_state_dict(mine, self.pp_group, tied=self.stage.tied)

    def full_model(self) -> nn.Module | None:
        state = self.full_state_dict()  # a collective over the pipeline: every stage takes part
        return _copy_with(self.module, state) if self.rank == 0 else None


class _NoOptimizer:
    """A stage without trainable parameters (everything it holds is frozen)."""

    def __init__(self) -> None:
        self.param_groups: list = []

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {}
