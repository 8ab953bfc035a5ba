"""Activation checkpointing applied from outside: gradients identical in every mode (float64), and the
measured peak memory of a forward + backward drops: full < selective < none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _ref import global_batches, lm_loss, tiny_model

from tinyllm.train.parallel.checkpointing import apply_activation_checkpointing


def _grads(mode: str) -> dict[str, torch.Tensor]:
    model = apply_activation_checkpointing(tiny_model(seed=0), mode)
    x, y = global_batches(1, 1, 4)[0][0]
    lm_loss(model, x, y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradients_identical_in_every_mode():
    want = _grads("none")
    for mode in ("full", "selective"):
        got = _grads(mode)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_bad_mode_and_double_application():
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        apply_activation_checkpointing(tiny_model(), "some")
    m = apply_activation_checkpointing(tiny_model(), "full")
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(m, "selective")
    with pytest.raises(ValueError, match="no `layers`"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "full")


_MEASURE = r"""
import json, torch
from tinyllm.model.config import preset
from tinyllm.model.hf import build_model
from tinyllm.train.parallel.checkpointing import apply_activation_checkpointing, peak_memory_delta
torch.set_num_threads(1)
out = {}
for mode in ("none", "selective", "full"):
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                               num_attention_heads=4, max_position_embeddings=512))
    apply_activation_checkpointing(model, mode)
    x = torch.randint(0, 256, (4, 512))
    def step():
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x.reshape(-1)).backward()
    step()  # warm-up: one-off allocations (kernels, thread pools) do not count
    model.zero_grad(set_to_none=False)
    out[mode] = peak_memory_delta(step)[1]
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from /proc/self/status")
def test_measured_memory_effect():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _MEASURE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    mb = {k: v / 2**20 for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
    assert mb["full"] < 0.6 * mb["none"], mb
    assert mb["full"] < mb["selective"] < mb["none"], mb
