"""Tensor parallel (Megatron) on 2 gloo ranks equals the single-process run (float64): loss, first-step
gradients and parameters after 3 AdamW steps; split and replicated K/V heads; vocab-parallel loss and the
gathered-logits loss; the same model through torch's DTensor `parallelize_module` over 20 steps; DP×TP on 4."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _mp import all_reduce_mean_grads, exact_loss, reference64, train
from _ref import CLIP, VOCAB, assert_close_dicts, local_rows, tiny_model
from _spawn import run_ranks

from tinyllm.train.parallel import tensor as tp
from tinyllm.train.parallel.layout import gather_full_state_dict, load_full_state_dict


def _tp_train(rank: int, world: int, sp: bool, loss: str, hkv: int) -> dict:
    model = tp.tensor_parallel(tiny_model(seed=0, num_key_value_heads=hkv), None, sequence_parallel=sp)
    # "gathered": full logits all-gathered, then plain float64 cross entropy
    loss_fn = tp.tp_lm_loss if loss == "vocab" else exact_loss
    return train(model, loss_fn, clip=lambda m: tp.clip_grad_norm_(m.parameters(), CLIP),
                 gather_grads=lambda m: gather_full_state_dict(m, grads=True),
                 gather_params=gather_full_state_dict)


@pytest.mark.parametrize("loss,hkv", [("vocab", 2), pytest.param("gathered", 1, marks=pytest.mark.slow)],
                         ids=["split-kv", "replicated-kv"])
def test_tensor_parallel_equals_single_process(loss, hkv):
    ref = reference64(num_key_value_heads=hkv)
    for out in run_ranks(_tp_train, 2, args=(False, loss, hkv)):
        torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
        assert_close_dicts(out["grads0"], ref["grads0"])
        assert_close_dicts(out["params"], ref["params"])


def _ce_and_layout(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, VOCAB, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (12,), generator=g)
    labels[[2, 7]] = -100
    n = VOCAB // world
    local = logits.detach()[:, rank * n:(rank + 1) * n].clone().requires_grad_()
    ours = tp.vocab_parallel_cross_entropy(local, labels, rank * n, None)
    ours.backward()
    ref = F.cross_entropy(logits, labels, ignore_index=-100)
    ref.backward()
    # a full state dict sharded in and gathered back is the same dict; a model of another layout is refused
    full = tiny_model(seed=5).state_dict()
    model = tp.tensor_parallel(tiny_model(seed=0), None)
    load_full_state_dict(model, full)
    back = gather_full_state_dict(model)
    errors = []
    for bad in (dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=36),
                dict(num_local_experts=4, num_experts_per_tok=2)):
        try:
            tp.tensor_parallel(tiny_model(**bad), None)
        except ValueError as e:
            errors.append(str(e))
    try:
        load_full_state_dict(model, tiny_model(seed=0, intermediate_size=96).state_dict())
    except ValueError as e:
        errors.append(str(e))
    return {"loss": (ours.item(), ref.item()), "grad": (local.grad, logits.grad[:, rank * n:(rank + 1) * n]),
            "same": all(torch.equal(back[k], full[k]) for k in full), "errors": errors}


def test_vocab_parallel_cross_entropy_and_checkpoint_round_trip():
    for out in run_ranks(_ce_and_layout, 2):
        assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-12)
        torch.testing.assert_close(*out["grad"], rtol=1e-12, atol=1e-14)
        assert out["same"]
        e = out["errors"]
        assert "num_attention_heads=3 does not divide by tp=2" in e[0]
        assert "expert_parallel" in e[1]
        assert "mlp.gate_proj.weight" in e[2] and "does not split into 2" in e[2]


# ------------------------------------------------------------------ DTensor reference
def _dtensor_vs_ours(rank: int, world: int, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    model = tiny_model(seed=0, tie_word_embeddings=False)
    for i, layer in enumerate(model.model.layers):
        for n in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{n}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        for n in ("gate_proj", "up_proj"):
            plan[f"model.layers.{i}.mlp.{n}"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
        layer.self_attn.num_heads //= world  # the local view a rank's q/k/v outputs have
        layer.self_attn.num_kv_heads //= world
    dt = parallelize_module(model, mesh, plan)

    def dt_clip(m):
        sq = sum((p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).pow(2).sum()
                 for p in m.parameters())
        coef = (CLIP / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in m.parameters():
            p.grad.mul_(coef)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)

    def dt_params(m):
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in m.state_dict().items()}

    theirs = train(dt, exact_loss, clip=dt_clip, optimizer=adamw,
                   gather_grads=lambda m: {}, gather_params=dt_params, steps=steps, accum=1)
    ours_model = tp.tensor_parallel(tiny_model(seed=0, tie_word_embeddings=False), mesh.get_group())
    ours = train(ours_model, tp.tp_lm_loss, clip=lambda m: tp.clip_grad_norm_(m.parameters(), CLIP),
                 optimizer=adamw, gather_grads=lambda m: {}, gather_params=gather_full_state_dict,
                 steps=steps, accum=1)
    return {"theirs": theirs, "ours": ours}


@pytest.mark.slow  # 2 × 20 steps on two ranks: ~35 s
def test_dtensor_parallelize_module_matches_ours_over_20_steps():
    out = run_ranks(_dtensor_vs_ours, 2, args=(20,))[0]
    torch.testing.assert_close(torch.tensor(out["ours"]["losses"], dtype=torch.float64),
                               torch.tensor(out["theirs"]["losses"], dtype=torch.float64), rtol=1e-9, atol=0)
    assert_close_dicts(out["ours"]["params"], out["theirs"]["params"], rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ DP × TP on 4 ranks
def _dp_tp(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp_g, dp_g = mesh.get_group("tp"), mesh.get_group("dp")
    d = dist.get_rank(dp_g)
    model = tp.tensor_parallel(tiny_model(seed=0), tp_g, sequence_parallel=True)

    def reduce_loss(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t, group=dp_g)
        return t.item() / 2

    return train(model, tp.tp_lm_loss, rows=lambda x, y: (local_rows(x, d, 2), local_rows(y, d, 2)),
                 sync=lambda m: all_reduce_mean_grads(m, dp_g),
                 clip=lambda m: tp.clip_grad_norm_(m.parameters(), CLIP, tp_g),
                 gather_grads=lambda m: gather_full_state_dict(m, tp_g, grads=True),
                 gather_params=lambda m: gather_full_state_dict(m, tp_g), reduce_loss=reduce_loss)


@pytest.mark.slow  # four processes on two cores: ~60 s
def test_dp_times_tp_with_sequence_parallel_on_4_ranks():
    ref = reference64()
    for out in run_ranks(_dp_tp, 4, timeout_s=120):
        torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=1e-10, atol=0)
        assert_close_dicts(out["grads0"], ref["grads0"])
        assert_close_dicts(out["params"], ref["params"])


@pytest.mark.slow  # torchrun starts 2 fresh interpreters
@pytest.mark.parametrize("strategy", ["tp", "ep"])
def test_parallel_check_under_torchrun(strategy):
    import os
    import subprocess
    import sys

    from _spawn import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tinyllm", "parallel", "check", "--strategy", strategy]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'"strategy": "{strategy}", "world_size": 2' in out.stdout and '"equal": true' in out.stdout


# ------------------------------------------------------------------ the training loop with --tp
def _loop_tp(rank: int, world: int, root: str) -> dict:
    from pathlib import Path

    from test_strategy import _run

    from tinyllm.train.parallel.config import ParallelConfig

    if world == 2:
        return {f"sp={sp}": _run(Path(root) / f"tp-sp{int(sp)}", torch.float64, ParallelConfig("none", tp=2, sp=sp))
                for sp in (False, True)}
    # 4 ranks: two data-parallel replicas of a 2-way TP group, all-reduced (dp) or ZeRO-sharded over the pair
    return {name: _run(Path(root) / name, torch.float64, ParallelConfig(strategy, tp=2, sp=sp))
            for name, strategy, sp in (("tp-sp1", "dp", True), ("zero1-tp", "zero1", False),
                                       ("zero3-tp-sp", "zero3", True))}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_training_loop_with_tensor_parallel_equals_single_process(tmp_path, world):
    from test_strategy import _compare, _run

    want = _run(tmp_path / "single", torch.float64, None)
    per_rank = run_ranks(_loop_tp, world, args=(str(tmp_path),), timeout_s=240)
    _compare(per_rank, want, rtol=1e-10, atol=1e-12)
    assert (tmp_path / "tp-sp1" / "checkpoints" / "step-000004" / "model.safetensors").exists()


@pytest.mark.slow  # a single-process pretrain and a torchrun of two fresh interpreters
def test_torchrun_pretrain_with_tp_and_sp_equals_single_process(tmp_path):
    import numpy as np
    from test_parallel_cli import COMMON, _flags, _losses, torchrun

    from tinyllm.data.text import write_token_shards
    from tinyllm.model.hf import load_model
    from tinyllm.train.pretrain import PretrainConfig, run_pretrain

    rng = np.random.default_rng(0)
    docs = [[int(t) for t in rng.integers(0, 40, int(rng.integers(10, 40)))] for _ in range(120)]
    write_token_shards(docs, tmp_path / "shards", vocab_size=48, eos_token_id=47, shard_tokens=500,
                       val_fraction=0.1, progress=False)
    data = str(tmp_path / "shards")
    torch.set_num_threads(1)
    ref = run_pretrain(PretrainConfig(data_dir=data, out_dir=str(tmp_path / "ref"), **COMMON))
    res = torchrun(["pretrain", "--data-dir", data, "--out-dir", str(tmp_path / "tp"), "--tp", "2", "--sp", "true",
                    *_flags(COMMON)])
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "tp"), ref.losses, rtol=2e-5)
    want, got = load_model(tmp_path / "ref" / "final").state_dict(), load_model(tmp_path / "tp" / "final").state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=2e-5, msg=k)
