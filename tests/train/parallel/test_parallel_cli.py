"""`torchrun --nproc_per_node 2 -m tinyllm pretrain --parallel zero2 ...` reproduces the single-process run (same
global batch and data order), rank 0 writes one HF checkpoint that transformers loads, a checkpoint saved under
ZeRO-3 continues under FSDP2 (slow); bad parallel settings fail with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _spawn import free_port

from tinyllm.data.text import write_token_shards
from tinyllm.model.hf import load_model
from tinyllm.train.pretrain import PretrainConfig, run_pretrain

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
COMMON = dict(seq_len=16, batch_size=4, grad_accum_steps=2, max_steps=6, lr=1e-2, min_lr=1e-3, warmup_steps=2,
              eval_interval=0, eval_steps=0, log_interval=1, save_interval=3, device="cpu", precision="fp32",
              progress=False, **SIZE)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(120):
        t, doc = int(rng.integers(0, 40)), []
        for _ in range(int(rng.integers(10, 40))):
            doc.append(t)
            t = (3 * t + 1) % 40 if rng.random() < 0.8 else int(rng.integers(0, 40))
        docs.append(doc)
    root = tmp_path_factory.mktemp("par")
    write_token_shards(docs, root / "shards", vocab_size=48, eos_token_id=47, shard_tokens=500, val_fraction=0.1,
                       progress=False)
    return root / "shards"


def _flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TINYLLM_BF16": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "tinyllm", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_torchrun_zero2_equals_single_process_and_saves_one_checkpoint(shards: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    ref = run_pretrain(PretrainConfig(data_dir=str(shards), out_dir=str(tmp_path / "ref"), **COMMON))
    res = torchrun(["pretrain", "--data-dir", str(shards), "--out-dir", str(tmp_path / "z2"), "--parallel", "zero2",
                    *_flags(COMMON)])
    assert res.returncode == 0, res.stderr[-3000:]
    got = _losses(tmp_path / "z2")
    assert len(got) == 6
    np.testing.assert_allclose(got, ref.losses, rtol=2e-5)
    # rank 0 alone wrote the run's files; the checkpoints hold the full weights in HF format
    assert sorted(p.name for p in (tmp_path / "z2" / "checkpoints").iterdir()) == ["latest", "step-000003",
                                                                                  "step-000006"]
    want = load_model(tmp_path / "ref" / "final").state_dict()
    ours = load_model(tmp_path / "z2" / "final").state_dict()
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=2e-4, atol=2e-5, msg=k)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "z2" / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 48, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_model(tmp_path / "z2" / "final").eval()(ids),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_checkpoint_continues_under_another_layout(shards: Path, tmp_path: Path):
    """Saved by ZeRO-3 (parameters sharded while training), continued under FSDP2 and in one process: equal."""
    torch.set_num_threads(1)
    first = dict(COMMON, max_steps=2, save_interval=0)
    res = torchrun(["pretrain", "--data-dir", str(shards), "--out-dir", str(tmp_path / "z3"), "--parallel", "zero3",
                    *_flags(first)])
    assert res.returncode == 0, res.stderr[-3000:]
    more = dict(COMMON, max_steps=2, save_interval=0, warmup_steps=0)
    cont = torchrun(["pretrain", "--data-dir", str(shards), "--out-dir", str(tmp_path / "fsdp"), "--parallel", "fsdp",
                     "--init-from", str(tmp_path / "z3" / "final"), *_flags(more)])
    assert cont.returncode == 0, cont.stderr[-3000:]
    single = run_pretrain(PretrainConfig(data_dir=str(shards), out_dir=str(tmp_path / "one"),
                                         init_from=str(tmp_path / "z3" / "final"), **more))
    np.testing.assert_allclose(_losses(tmp_path / "fsdp"), single.losses, rtol=2e-5)


def test_bad_parallel_settings_fail_clearly(shards: Path, tmp_path: Path):
    from tinyllm import cli

    args = ["pretrain", "--data-dir", str(shards), "--out-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit):  # argparse rejects an unknown strategy by its choices
        cli.main([*args, "--parallel", "ring"])
    assert cli.main([*args, "--sp", "true"]) == 2  # sequence parallel without tensor parallel
    res = torchrun([*args, "--parallel", "zero2", "--tp", "3", *_flags(dict(COMMON, max_steps=1))], timeout=120)
    assert res.returncode != 0
    assert "tp=3" in res.stderr and "WORLD_SIZE=2" in res.stderr, res.stderr[-2000:]


def test_torchrun_without_a_strategy_refuses_to_train_copies(shards: Path, tmp_path: Path):
    res = torchrun(["pretrain", "--data-dir", str(shards), "--out-dir", str(tmp_path / "y"),
                    *_flags(dict(COMMON, max_steps=1))], timeout=120)
    assert res.returncode != 0
    assert "parallel='none'" in res.stderr and "WORLD_SIZE=2" in res.stderr, res.stderr[-2000:]
