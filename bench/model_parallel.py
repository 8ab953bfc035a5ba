"""Model-parallel training step time (DESIGN §7): our tensor parallel against torch's DTensor
`parallelize_module` (Colwise/RowwiseParallel), and our 1F1B / GPipe pipeline runner against
`torch.distributed.pipelining` (Schedule1F1B / ScheduleGPipe) — same model, same batch, same ranks.

The script re-launches itself under `torchrun --nproc_per_node 2` (worker mode). Each worker builds two
identical copies of the model, one for each implementation, and times whole optimizer steps (forward, backward,
AdamW) alternately, ours then the peer's, so load changes on a shared machine hit both; rank 0 prints one JSON
line per pair with ratio = our median step time / the peer's, then the machine ceilings (one thread per rank).

    python bench/model_parallel.py [--layers 4] [--batch 8] [--seq 256] [--micro 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _model(a: argparse.Namespace):
    import torch

    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model

    torch.manual_seed(0)
    cfg = preset("tiny", num_hidden_layers=a.layers, max_position_embeddings=a.seq, tie_word_embeddings=False)
    return build_model(cfg)


def _tp_pair(a, x, y):
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    from tinyllm.train.parallel import tensor as tp

    world = torch.distributed.get_world_size()
    ours = tp.tensor_parallel(_model(a), None)
    peer = _model(a)
    plan = {"lm_head": ColwiseParallel(use_local_output=False),  # logits stay vocab-sharded for loss_parallel
            "model.embed_tokens": RowwiseParallel(input_layouts=torch.distributed.tensor.Replicate())}
    for i, layer in enumerate(peer.model.layers):
        for n in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{n}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        for n in ("gate_proj", "up_proj"):
            plan[f"model.layers.{i}.mlp.{n}"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
        layer.self_attn.num_heads //= world
        layer.self_attn.num_kv_heads //= world
    parallelize_module(peer, init_device_mesh("cpu", (world,)), plan)
    o_opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    p_opt = torch.optim.AdamW(peer.parameters(), lr=1e-3)

    def ours_step():
        tp.tp_lm_loss(ours, x, y).backward()
        o_opt.step()
        o_opt.zero_grad(set_to_none=True)

    def peer_step():  # loss_parallel is the DTensor counterpart of our vocab-parallel cross entropy
        with loss_parallel():
            F.cross_entropy(peer(x).flatten(0, 1), y.flatten()).backward()
        p_opt.step()
        p_opt.zero_grad(set_to_none=True)

    return ours_step, peer_step


def _pp_pair(a, x, y, kind: str):
    import torch
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from tinyllm.train.parallel import pipeline as pp

    r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def ce(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    ours = pp.PipelineStage(_model(a), r, w)
    runner = pp.PipelineRunner(ours, None, a.micro, kind, loss_fn=ce)
    peer = pp.PipelineStage(_model(a), r, w)
    sched = (Schedule1F1B if kind == "1f1b" else ScheduleGPipe)(
        PipelineStage(peer, r, w, torch.device("cpu")), a.micro, loss_fn=ce)
    o_opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    p_opt = torch.optim.AdamW(peer.parameters(), lr=1e-3)

    def ours_step():
        runner.step(x, y)
        o_opt.step()
        o_opt.zero_grad(set_to_none=True)

    def peer_step():
        if r == 0:
            sched.step(x)
        elif r == w - 1:
            sched.step(target=y)
        else:
            sched.step()
        p_opt.step()
        p_opt.zero_grad(set_to_none=True)

    return ours_step, peer_step


def worker(a: argparse.Namespace) -> None:
    import torch
    from _common import machine_ceilings, paired_median_seconds, report

    from tinyllm.train.parallel import dist as tdist

    torch.set_num_threads(1)
    tdist.init_from_env("cpu", timeout_s=300)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8192, (a.batch, a.seq + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    tokens = a.batch * a.seq
    pairs = [("tp_vs_dtensor", _tp_pair(a, x, y)), ("pp_1f1b_vs_torch_pipelining", _pp_pair(a, x, y, "1f1b")),
             ("pp_gpipe_vs_torch_pipelining", _pp_pair(a, x, y, "gpipe"))]
    for name, (ours, peer) in pairs:
        t_ours, t_peer = paired_median_seconds(ours, peer, repeats=a.repeats, warmup=2)
        if tdist.is_main():
            report(f"model_parallel_{name}", t_ours, t_peer, "s/step", ranks=tdist.world_size(),
                   tokens_per_s_ours=round(tokens / t_ours), tokens_per_s_peer=round(tokens / t_peer),
                   layers=a.layers, batch=a.batch, seq=a.seq, micro_batches=a.micro)
    if tdist.is_main():
        import json

        print(json.dumps(machine_ceilings()), flush=True)
    tdist.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.abspath(__file__), "--worker", *sys.argv[1:]]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
