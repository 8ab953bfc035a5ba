"""THE training loop (tinyllm/train/loop.py) and its checkpoints (checkpoint.py)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tinyllm.model.config import ModelConfig
from tinyllm.model.transformer import CausalLM
from tinyllm.train import TrainConfig, train
from tinyllm.train.checkpoint import latest_checkpoint, list_checkpoints
from tinyllm.train.loop import Task, model_flops_per_token
from tinyllm.train.losses import causal_lm_loss
from tinyllm.train.optim import lr_at

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                initializer_range=0.1))


class Batches:
    """A list of batches served in a cycle; optionally raises KeyboardInterrupt before batch `fail_at`."""

    def __init__(self, batches: list[Any], fail_at: int | None = None) -> None:
        self.batches, self.i, self.fail_at = batches, 0, fail_at

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        if self.i == self.fail_at:
            self.fail_at = None
            raise KeyboardInterrupt
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.i = s["i"]


class LMTask:
    def __init__(self, batches: list[Any], fail_at: int | None = None, eval_batches: list[Any] | None = None):
        self.batches, self.fail_at, self._eval = batches, fail_at, eval_batches

    def train_batches(self) -> Batches:
        it = Batches(self.batches, self.fail_at)
        self.fail_at = None  # only the first run is interrupted
        return it

    def eval_batches(self) -> list[Any] | None:
        return self._eval

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        return causal_lm_loss(model(x), y), {}

    def trainable_parameters(self, model: nn.Module) -> Any:
        return model.named_parameters()


def random_batches(n: int, b: int, t: int = 12, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, V, (b, t + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def cfg(tmp: Path, **kw: Any) -> TrainConfig:
    base = dict(out_dir=str(tmp), max_steps=4, batch_size=2, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                weight_decay=0.1, grad_clip=1.0, eval_interval=0, eval_steps=0, log_interval=1,
                save_interval=0, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_task_protocol_and_config_errors(tmp_path: Path) -> None:
    assert isinstance(LMTask([]), Task)
    for field, bad in (("max_steps", 0), ("precision", "fp16"), ("schedule", "linear"), ("betas", [0.9]),
                       ("min_lr", 1.0), ("grad_accum_steps", -1), ("grad_clip", -1.0)):
        with pytest.raises(ValueError, match=field):
            cfg(tmp_path, **{field: bad})


def test_accumulating_4x2_equals_one_batch_of_8(tmp_path: Path) -> None:
    micro = random_batches(8, 2)  # two optimizer steps of 4 micro-batches
    full = [(torch.cat([x for x, _ in micro[i:i + 4]]), torch.cat([y for _, y in micro[i:i + 4]]))
            for i in (0, 4)]
    a, b = tiny_model(), tiny_model()
    train(a, LMTask(micro), cfg(tmp_path / "a", max_steps=2, grad_accum_steps=4))
    train(b, LMTask(full), cfg(tmp_path / "b", max_steps=2, batch_size=8))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def test_loop_equals_a_plain_pytorch_loop(tmp_path: Path) -> None:
    """Schedule, clipping (= clip_grad_norm_), decoupled decay groups and AdamW, written out by hand."""
    batches = random_batches(3, 4)
    ours, ref = tiny_model(), tiny_model()
    c = cfg(tmp_path, max_steps=3, grad_clip=0.05, warmup_steps=1)  # small clip: every step clips
    train(ours, LMTask(batches), c)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    other = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.95), eps=1e-8)
    norms = []
    for step, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, "cosine", c.lr, c.min_lr, 1, 3)
        causal_lm_loss(ref(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        opt.step()
        opt.zero_grad()
    for (name, pa), pb in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["grad_norm"] for r in logged] == pytest.approx(norms, rel=1e-5)
    assert all(n > 0.05 for n in norms)


def _copy_checkpoint(src_out: Path, step: int, dst_out: Path) -> None:
    name = f"step-{step:06d}"
    (dst_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_out / "checkpoints" / name, dst_out / "checkpoints" / name)
    (dst_out / "checkpoints" / "latest").write_text(name + "\n")


def test_resume_reproduces_the_uninterrupted_run_bit_exactly(tmp_path: Path) -> None:
    batches = random_batches(5, 2)
    full_model = tiny_model()
    full = train(full_model, LMTask(batches), cfg(tmp_path / "full", max_steps=6, save_interval=3))
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step-000003", "step-000006"]
    _copy_checkpoint(tmp_path / "full", 3, tmp_path / "resumed")
    # a differently initialised model: the weights must come from the checkpoint
    resumed_model = tiny_model(seed=123)
    second = train(resumed_model, LMTask(batches), cfg(tmp_path / "resumed", max_steps=6, resume=True))
    assert second.start_step == 3 and second.step == 6
    assert second.losses == full.losses[3:]  # bit-exact in fp32
    for pa, pb in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(pa, pb)


def test_keyboard_interrupt_saves_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    batches = random_batches(7, 2)
    full = train(tiny_model(), LMTask(batches), cfg(tmp_path / "full", max_steps=5, grad_accum_steps=2))
    # interrupted while fetching the second micro-batch of step 3 (micro-batch index 2·2 + 1)
    task = LMTask(batches, fail_at=5)
    out = tmp_path / "run"
    first = train(tiny_model(), task, cfg(out, max_steps=5, grad_accum_steps=2))
    assert first.interrupted and first.step == 2 and first.losses == full.losses[:2]
    assert latest_checkpoint(out).name == "step-000002"
    state = torch.load(latest_checkpoint(out) / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["data"] == {"i": 4}  # the data position at the step boundary
    model = tiny_model(seed=7)
    second = train(model, task, cfg(out, max_steps=5, grad_accum_steps=2, resume=True))
    assert not second.interrupted and second.losses == full.losses[2:]
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_outputs_eval_bf16_and_pruning(tmp_path: Path) -> None:
    batches = random_batches(4, 2)
    model = tiny_model()
    res = train(model, LMTask(batches, eval_batches=batches[:2]),
                cfg(tmp_path, max_steps=6, precision="bf16", eval_interval=3, eval_steps=5, log_interval=2,
                    save_interval=2, keep_last=2, warmup_steps=0, lr=3e-3))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights under autocast
    assert sorted(res.eval_losses) == [3, 6] and all(v == v for v in res.eval_losses.values())
    assert res.losses[-1] < res.losses[0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert res.checkpoint == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000006"
    for f in ("config.json", "model.safetensors", "trainer_state.pt", "train_config.json"):
        assert (res.checkpoint / f).exists()
    records = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    train_rec = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rec] == [2, 4, 6]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train_rec)
    assert train_rec[-1]["tokens"] == 6 * 2 * 12
    assert res.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "train_config.json").read_text())["precision"] == "bf16"


def test_flops_per_token_counts_matmul_parameters_and_attention() -> None:
    m = tiny_model()
    linear = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert model_flops_per_token(m, 12) == 6 * linear + 12 * 2 * 4 * 8 * 12
    assert copy.deepcopy(m).config.head_dim == 8


@pytest.mark.slow
def test_compiled_forward_trains_like_eager(tmp_path: Path) -> None:
    """cfg.compile wraps the forward in torch.compile (minutes of compilation on CPU: slow)."""
    batches = random_batches(2, 2)
    eager = train(tiny_model(), LMTask(batches), cfg(tmp_path / "eager", max_steps=2))
    compiled = train(tiny_model(), LMTask(batches), cfg(tmp_path / "compiled", max_steps=2, compile=True))
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-4)
