"""THE training loop with `--pp` (pipeline parallel) and `--cp` (context parallel) equals the same loop in one
process (float64; same global batch and order; accumulation = the pipeline's micro-batches, clipping, cosine
schedule): losses on every rank, tokens, and the full weights rank 0 assembles; tied and untied embeddings;
GPipe and 1F1B; SFT-style labels with ignored positions and a sequence that does not divide by cp; dp × pp and
dp × cp on 4 ranks; zig-zag and contiguous cp chunks; a run resumed under dp, cp, ZeRO-1/3, tp, pp and ep continues the
uninterrupted one, and across layouts (the optimizer state gathered by parameter name); 4 ranks: tp × pp, cp × tp, ZeRO × tp; `torchrun ... pretrain --pp 2` / `--cp 2` save the single-process run's checkpoint."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from _ref import SEQ, assert_close_dicts, global_batches, tiny_model
from _spawn import run_ranks
from test_strategy import ACCUM, GBS, STEPS, _cfg, _compare

from tinyllm.train.loop import train
from tinyllm.train.parallel.config import ParallelConfig


class _Task:
    """(x, y) batches, or {"input_ids", "labels"} with some labels ignored and an odd length (sft=True)."""

    def __init__(self, batches: list, eval_batches: list | None = None) -> None:
        self.batches, self.evals = batches, eval_batches

    def train_batches(self):
        return _Cursor(self.batches)

    def eval_batches(self):
        return self.evals

    def loss(self, model, batch):
        x, y = (batch["input_ids"], batch["labels"]) if isinstance(batch, dict) else batch
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, {"tokens": int((y != -100).sum())}

    def trainable_parameters(self, model):
        return model.named_parameters()


class _Cursor:
    """The batches in a cycle, resumable: its state is the position."""

    def __init__(self, batches: list) -> None:
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


def _sft_like(batches: list[tuple]) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for j, (x, y) in enumerate(batches):
        y = y[:, :SEQ - 3].clone()  # 13 tokens: not a multiple of 2
        y[torch.rand(y.shape, generator=g) < 0.4] = -100
        if j % 3 == 0:
            y[:, :7] = -100  # a prompt: the first sequence chunk of cp=2 has no labelled token
        out.append({"input_ids": x[:, :SEQ - 3], "labels": y})
    return out


def _run(out: Path, parallel: ParallelConfig | None, sft: bool = False, evals: bool = False, **over) -> dict:
    batches = [b for step in global_batches(STEPS, ACCUM, GBS, learnable=True) for b in step]
    if sft:
        batches = _sft_like(batches)
    model = tiny_model(seed=0, dtype=torch.float64, **over)
    cfg = _cfg(out)
    if evals:
        cfg.eval_steps, cfg.eval_interval = 2, 2
    res = train(model, _Task(batches, batches[:2] if evals else None), cfg, parallel=parallel)
    weights = {k: v.detach().cpu().clone() for k, v in res.model.state_dict().items()} if res.model else None
    held = sum(p.numel() for p in model.parameters())
    return {"losses": res.losses, "weights": weights, "tokens": res.tokens, "eval": res.eval_losses, "held": held}


CASES = {  # name: (ParallelConfig kwargs, _run kwargs)
    "pp-1f1b": (dict(pp=2), dict(evals=True)),
    "pp-gpipe-untied": (dict(pp=2, pp_schedule="gpipe"), dict(tie_word_embeddings=False)),
    "pp-sft": (dict(pp=2), dict(sft=True, num_hidden_layers=3)),
    "cp": (dict(cp=2), dict(evals=True)),
    "cp-sft-untied": (dict(cp=2), dict(sft=True, tie_word_embeddings=False)),  # zig-zag, 13 tokens padded to 16
    "cp-contiguous-sft": (dict(cp=2, cp_layout="contiguous"), dict(sft=True)),
    "tp-cp": (dict(cp=2, tp=2), dict(sft=True, evals=True)),  # 4 ranks: the ring over heads split in two
    "tp-pp": (dict(pp=2, tp=2), dict(sft=True, evals=True)),  # 4 ranks: Megatron shards in each stage
    "tp-sp-pp": (dict(pp=2, tp=2, sp=True), dict(evals=True)),  # 4 ranks: stages pass [B, T/2, d] slices
    "tp-sp-cp": (dict(cp=2, tp=2, sp=True), dict(evals=True)),  # 4 ranks: each ring chunk split again for norms
    "pp-cp": (dict(pp=2, cp=2), dict(sft=True, evals=True)),  # 4 ranks: a ring inside each stage
    "pp-cp-gpipe-contiguous-untied": (dict(pp=2, cp=2, pp_schedule="gpipe", cp_layout="contiguous"),
                                      dict(tie_word_embeddings=False, num_hidden_layers=3)),
}


def _ranks(rank: int, world: int, root: str, names: tuple[str, ...]) -> dict:
    out = {}
    for name in names:
        pkw, rkw = CASES[name]
        strategy = "dp" if world > 2 else "none"
        out[name] = _run(Path(root) / name, ParallelConfig(strategy, **pkw), **rkw)
    return out


def _check(tmp_path: Path, per_rank: list[dict], names: tuple[str, ...]) -> None:
    for name in names:
        want = _run(tmp_path / f"single-{name}", None, **CASES[name][1])
        got = [{name: r[name]} for r in per_rank]
        _compare(got, want, rtol=1e-10, atol=1e-12)
        for r in per_rank:
            assert r[name]["eval"].keys() == want["eval"].keys()
            for s, v in want["eval"].items():
                assert r[name]["eval"][s] == pytest.approx(v, rel=1e-10), (name, s)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("pp") and "cp" not in n])
def test_loop_pipeline_parallel_equals_single_process(tmp_path: Path, name: str):
    per_rank = run_ranks(_ranks, 2, args=(str(tmp_path), (name,)), timeout_s=240)
    _check(tmp_path, per_rank, (name,))
    assert (tmp_path / name / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors").exists()
    # each rank keeps only its stage: about half the layers, and the embeddings or the head, not both
    model_kw = {k: v for k, v in CASES[name][1].items() if k not in ("sft", "evals")}
    full = sum(p.numel() for p in tiny_model(seed=0, **model_kw).parameters())
    assert all(r[name]["held"] < 0.75 * full for r in per_rank), ([r[name]["held"] for r in per_rank], full)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("cp")])
def test_loop_context_parallel_equals_single_process(tmp_path: Path, name: str):
    per_rank = run_ranks(_ranks, 2, args=(str(tmp_path), (name,)), timeout_s=240)
    _check(tmp_path, per_rank, (name,))


@pytest.mark.slow  # 4 processes on a 2-core machine
def test_loop_dp_times_pp_dp_times_cp_and_tp_inside_cp_and_pp_on_4_ranks(tmp_path: Path):
    names = ("pp-1f1b", "cp-sft-untied", "tp-cp", "tp-pp", "tp-sp-pp", "tp-sp-cp")
    per_rank = run_ranks(_ranks, 4, args=(str(tmp_path), names), timeout_s=400)
    _check(tmp_path, per_rank, names)
    full = sum(p.numel() for p in tiny_model(seed=0).parameters())
    assert all(r["tp-cp"]["held"] < 0.75 * full for r in per_rank)  # the tensor-parallel shards, not copies
    assert all(r[n]["held"] < 0.5 * full for r in per_rank for n in ("tp-pp", "tp-sp-pp"))  # half the layers,
    # each half its weights


@pytest.mark.slow  # 4 processes on a 2-core machine
@pytest.mark.parametrize("name", ["pp-cp", "pp-cp-gpipe-contiguous-untied"])
def test_loop_pipeline_times_context_parallel_on_4_ranks(tmp_path: Path, name: str):
    per_rank = run_ranks(_ranks, 4, args=(str(tmp_path), (name,)), timeout_s=300)
    _check(tmp_path, per_rank, (name,))
    model_kw = {k: v for k, v in CASES[name][1].items() if k not in ("sft", "evals")}
    full = sum(p.numel() for p in tiny_model(seed=0, **model_kw).parameters())
    assert all(r[name]["held"] < 0.75 * full for r in per_rank)  # each rank its stage only


MOE_EXPORTABLE = {"num_local_experts": 4, "model_type": "mixtral"}  # checkpoints are HF folders
RESUMES = {  # name: (strategy of the uninterrupted run, strategy of the resumed one, model overrides)
    "dp": (ParallelConfig("dp"), ParallelConfig("dp"), {}),
    "cp": (ParallelConfig("none", cp=2), ParallelConfig("none", cp=2), {}),
    "zero1": (ParallelConfig("zero1"), ParallelConfig("zero1"), {}),
    "zero3": (ParallelConfig("zero3"), ParallelConfig("zero3"), {}),
    "zero2-to-dp": (ParallelConfig("zero2"), ParallelConfig("dp"), {}),  # the gathered state in AdamW's layout
    "dp-to-zero3": (ParallelConfig("dp"), ParallelConfig("zero3"), {}),
    "tp": (ParallelConfig("none", tp=2), ParallelConfig("none", tp=2), {}),  # the shards' moments by name
    "tp-to-dp": (ParallelConfig("none", tp=2), ParallelConfig("dp"), {}),
    "pp": (ParallelConfig("none", pp=2), ParallelConfig("none", pp=2), {}),  # tied: the last stage's copy
    "dp-to-pp-untied": (ParallelConfig("dp"), ParallelConfig("none", pp=2), {"tie_word_embeddings": False}),
    "pp-to-tp": (ParallelConfig("none", pp=2), ParallelConfig("none", tp=2), {}),
    "ep": (ParallelConfig("none", ep=2), ParallelConfig("none", ep=2), MOE_EXPORTABLE),
    "ep-to-dp": (ParallelConfig("none", ep=2), ParallelConfig("dp"), MOE_EXPORTABLE),
    "fsdp": (ParallelConfig("fsdp"), ParallelConfig("fsdp"), {}),  # DTensor moments gathered, then cut again
    "fsdp-to-dp": (ParallelConfig("fsdp"), ParallelConfig("dp"), {}),
    "zero3-to-fsdp": (ParallelConfig("zero3"), ParallelConfig("fsdp"), {}),
}
RESUMES_4 = {  # 4 ranks
    "tp-pp": (ParallelConfig("dp", pp=2, tp=2), ParallelConfig("dp", pp=2, tp=2), {}),
    "cp-tp-to-zero1-tp": (ParallelConfig("dp", cp=2, tp=2), ParallelConfig("zero1", tp=2), {}),
    "zero3-tp-to-pp": (ParallelConfig("zero3", tp=2), ParallelConfig("dp", pp=2), {}),
    # the experts' moments by expert, the TP shards' by name; a MoE run resumes across layouts only with the same
    # data ranks (2 here): the balance loss N·Σ f_i·P_i is taken over each rank's own rows, so it follows the split
    # (ep-tp → dp over 4 ranks differs by ~1e-8: the split's doing, not the checkpoint's)
    "ep-tp": (ParallelConfig("none", ep=2, tp=2), ParallelConfig("none", ep=2, tp=2), MOE_EXPORTABLE),
}


RESUMES_DS = {  # DeepSpeed keeps fp32 partitions: float32 runs
    "ds2": (ParallelConfig("deepspeed", zero_stage=2), ParallelConfig("deepspeed", zero_stage=2), {}),
    "ds3-to-dp": (ParallelConfig("deepspeed", zero_stage=3), ParallelConfig("dp"), {}),
    "zero1-to-ds3": (ParallelConfig("zero1"), ParallelConfig("deepspeed", zero_stage=3), {}),
}


def _resume_ranks(rank: int, world: int, root: str, names: tuple[str, ...], dtype=torch.float64) -> dict:
    """An uninterrupted run saving at step 2 and STEPS, and a run resumed from its step-2 checkpoint (a differently
    initialised model: the weights and optimizer state must come from the checkpoint), possibly under another
    strategy."""
    import shutil

    from tinyllm.train.parallel.dist import barrier

    out = {}
    # full rows: every rank's slice holds the same number of tokens, so the data-parallel mean of rank means is the
    # global mean and a run may change its number of data-parallel ranks on resume (tp=2 → dp=2)
    batches = [b for step in global_batches(STEPS, ACCUM, GBS, learnable=True) for b in step]
    for name in names:
        first, then, over = {**RESUMES, **RESUMES_4, **RESUMES_DS}[name]
        full_dir, res_dir = Path(root) / f"{name}-full", Path(root) / f"{name}-resumed"
        full = train(tiny_model(seed=0, dtype=dtype, **over), _Task(batches),
                     dataclasses.replace(_cfg(full_dir), save_interval=2), parallel=first)
        if rank == 0:
            ck = f"step-{2:06d}"
            shutil.copytree(full_dir / "checkpoints" / ck, res_dir / "checkpoints" / ck)
            (res_dir / "checkpoints" / "latest").write_text(ck + "\n")
        barrier("test checkpoint copy")
        resumed = train(tiny_model(seed=5, dtype=dtype, **over), _Task(batches),
                        dataclasses.replace(_cfg(res_dir), save_interval=2, resume=True), parallel=then)
        weights = [{k: v.detach().cpu().clone() for k, v in r.model.state_dict().items()} if r.model else None
                   for r in (full, resumed)]
        out[name] = {"full": full.losses, "resumed": resumed.losses, "start": resumed.start_step,
                     "weights": weights}
    return out


def _check_resumes(per_rank: list[dict], table: dict, fp32: bool = False) -> None:
    for rank, r in enumerate(per_rank):
        for name, got in r.items():
            assert got["start"] == 2, name
            tol = 1e-12 if table[name][0] == table[name][1] else 1e-10  # across strategies: other sum orders
            tol = 2e-5 if fp32 else tol
            torch.testing.assert_close(torch.tensor(got["resumed"]), torch.tensor(got["full"][2:]), rtol=tol,
                                       atol=0, msg=f"{name}: resumed {got['resumed']}, uninterrupted {got['full']}")
            if rank == 0:
                assert_close_dicts(got["weights"][1], got["weights"][0], rtol=tol, atol=tol / 100)


def test_resume_continues_the_uninterrupted_run_under_every_layout_and_across_them(tmp_path: Path):
    _check_resumes(run_ranks(_resume_ranks, 2, args=(str(tmp_path), tuple(RESUMES)), timeout_s=400), RESUMES)


@pytest.mark.slow  # 4 processes on a 2-core machine
def test_resume_under_tp_pp_cp_zero_combinations_on_4_ranks(tmp_path: Path):
    _check_resumes(run_ranks(_resume_ranks, 4, args=(str(tmp_path), tuple(RESUMES_4)), timeout_s=500), RESUMES_4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed not installed (DS_BUILD_OPS=0 pip install deepspeed --no-build-isolation)")
def test_resume_under_deepspeed_and_across_to_our_layouts(tmp_path: Path):
    per_rank = run_ranks(_resume_ranks, 2, args=(str(tmp_path), tuple(RESUMES_DS), torch.float32), timeout_s=600,
                         group_timeout_s=300, env={"DS_ACCELERATOR": "cpu"})
    _check_resumes(per_rank, RESUMES_DS, fp32=True)


def _bad(rank: int, world: int, root: str) -> str:
    try:
        _run(Path(root), ParallelConfig("none", pp=2), num_local_experts=4)
    except ValueError as e:
        return str(e)
    return "no error"


def test_pipeline_refuses_moe_clearly(tmp_path: Path):
    msgs = run_ranks(_bad, 2, args=(str(tmp_path),), timeout_s=120)
    assert all("MoE" in m for m in msgs), msgs



# ------------------------------------------------------------------ under torchrun, through the CLI
@pytest.fixture(scope="module")
def pp_run(tmp_path_factory) -> dict:
    """Token shards, the single-process pretraining run and `torchrun --nproc-per-node 2 ... --pp 2` of it."""
    import numpy as np
    from test_parallel_cli import COMMON, _flags, torchrun

    from tinyllm.data.text import write_token_shards
    from tinyllm.train.pretrain import PretrainConfig, run_pretrain

    root = tmp_path_factory.mktemp("ppcp")
    rng = np.random.default_rng(0)
    docs = [[int(t) for t in rng.integers(0, 40, int(rng.integers(10, 40)))] for _ in range(120)]
    write_token_shards(docs, root / "shards", vocab_size=48, eos_token_id=47, shard_tokens=500, val_fraction=0.1,
                       progress=False)
    data = str(root / "shards")
    torch.set_num_threads(1)
    ref = run_pretrain(PretrainConfig(data_dir=data, out_dir=str(root / "ref"), **COMMON))
    res = torchrun(["pretrain", "--data-dir", data, "--out-dir", str(root / "pp"), "--pp", "2", *_flags(COMMON)])
    return {"root": root, "data": data, "ref": ref, "res": res}


def _assert_same_checkpoint(got_dir: Path, want_dir: Path) -> None:
    from tinyllm.model.hf import load_model

    want, got = load_model(want_dir).state_dict(), load_model(got_dir).state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=2e-5, msg=k)


def test_torchrun_pretrain_with_pp_equals_single_process(pp_run):
    import numpy as np
    from test_parallel_cli import _losses
    from transformers import AutoModelForCausalLM

    from tinyllm.model.hf import load_model

    root, res = pp_run["root"], pp_run["res"]
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(_losses(root / "pp"), pp_run["ref"].losses, rtol=2e-5)
    _assert_same_checkpoint(root / "pp" / "final", root / "ref" / "final")
    _assert_same_checkpoint(root / "pp" / "checkpoints" / "step-000003", root / "ref" / "checkpoints" / "step-000003")
    hf = AutoModelForCausalLM.from_pretrained(root / "pp" / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 48, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_model(root / "pp" / "final").eval()(ids), rtol=1e-4,
                                   atol=1e-4)


def test_torchrun_pretrain_with_cp_continues_the_pp_checkpoint(pp_run):
    """The checkpoint the pipeline run saved, continued under context parallel, equals its single-process
    continuation (one layout's checkpoint loads under another)."""
    import numpy as np
    from test_parallel_cli import COMMON, _flags, _losses, torchrun

    from tinyllm.train.pretrain import PretrainConfig, run_pretrain

    root, data = pp_run["root"], pp_run["data"]
    assert pp_run["res"].returncode == 0, pp_run["res"].stderr[-3000:]
    more = dict(COMMON, max_steps=3, save_interval=0, warmup_steps=0)
    init = str(root / "pp" / "final")
    res = torchrun(["pretrain", "--data-dir", data, "--out-dir", str(root / "cp"), "--cp", "2", "--init-from", init,
                    *_flags(more)])
    assert res.returncode == 0, res.stderr[-3000:]
    single = run_pretrain(PretrainConfig(data_dir=data, out_dir=str(root / "one"), init_from=init, **more))
    np.testing.assert_allclose(_losses(root / "cp"), single.losses, rtol=2e-5)
    _assert_same_checkpoint(root / "cp" / "final", root / "one" / "final")
