"""Weights on transparent huge pages (`hugepages.rehome`): the same bytes, the same objects, views kept as views,
one storage per original storage (saving works as before), the OS's huge pages where it offers them, and an
engine whose greedy tokens and log-probabilities are those of the engine on ordinary pages."""

from __future__ import annotations

import re

import pytest
import torch
from hf_helpers import smollm2_path
from safetensors.torch import load_file, save_file

from tinyllm import LLM, SamplingParams
from tinyllm.infer import hugepages

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this machine")


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps") as f:
        return sum(int(v) for v in re.findall(r"AnonHugePages:\s+(\d+) kB", f.read()))


@needs_thp
def test_rehome_keeps_values_objects_and_views() -> None:
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(3 * 1024, 512, generator=g)  # a q/k/v matrix and the module weights that view it
    p = torch.nn.Parameter(fused[:1024])
    tail = fused[1024:]
    small = torch.randn(8, generator=g)  # under min_bytes: left where it is
    half = torch.randn(600_000, generator=g).to(torch.bfloat16)  # 1.2 MB: under min_bytes too
    expect = [t.clone() for t in (fused, p, tail, small, half)]
    small_ptr, half_ptr = small.data_ptr(), half.data_ptr()

    moved = hugepages.rehome([fused, p, tail, small, half, p])  # a tensor given twice counts once
    assert moved == fused.nbytes
    for t, e in zip((fused, p, tail, small, half), expect, strict=True):
        assert torch.equal(t, e)
    assert isinstance(p, torch.nn.Parameter) and p.requires_grad
    assert p.data_ptr() == fused.data_ptr() and tail.data_ptr() == fused.data_ptr() + 1024 * 512 * 4
    assert p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert fused.untyped_storage().data_ptr() % hugepages.HUGE_PAGE == 0  # the arena starts on a huge page
    assert fused.untyped_storage().nbytes() == fused.nbytes  # a storage of its own, not the whole arena
    assert small.data_ptr() == small_ptr and half.data_ptr() == half_ptr
    fused.mul_(2)  # still one storage: writes through the fused matrix show in its views
    assert torch.equal(p, 2 * expect[1])
    assert _anon_huge_kb() >= fused.nbytes // 1024 // 2  # the OS gave huge pages (most of a 6 MiB storage)


@needs_thp
def test_rehomed_tensors_save_as_before(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(700, 1024, generator=g)
    expect = {"a": a.clone(), "b": b.clone()}
    hugepages.rehome([a, b])
    save_file({"a": a, "b": b}, tmp_path / "w.safetensors")  # would refuse tensors that share one storage
    got = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], v) for k, v in expect.items())
    torch.save(b, tmp_path / "b.pt")  # one tensor saves its own bytes, not the arena's
    assert (tmp_path / "b.pt").stat().st_size < b.nbytes + 4096


def test_switched_off_or_empty(monkeypatch) -> None:
    with pytest.raises(ValueError, match="nbytes=-1"):
        hugepages.empty_bytes(-1)
    assert hugepages.empty_bytes(0).numel() == 0
    monkeypatch.setenv("TINYLLM_HUGE_PAGES", "0")
    assert not hugepages.available()
    t = torch.randn(1 << 20)
    ptr = t.data_ptr()
    assert hugepages.rehome([t]) == 0 and t.data_ptr() == ptr
    assert hugepages.empty_bytes(100).numel() == 100


@needs_thp
def test_engine_on_huge_pages_decodes_the_same() -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    outs = []
    for huge in (False, True):
        llm = LLM(smollm2_path(), max_model_len=64, max_num_seqs=2, huge_pages=huge)
        model = llm.engine.runner.model
        on_arena = [p.untyped_storage().data_ptr() for p in model.parameters() if p.nbytes >= hugepages.HUGE_PAGE]
        assert on_arena and (min(on_arena) % hugepages.HUGE_PAGE == 0) == huge
        if huge:  # the fused q/k/v matrix and the module weights that view it moved together
            lay = llm.engine.runner.fused.layers[0]
            assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == lay.qkv[0].data_ptr()
        o = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        outs.append((o.token_ids, [lp[t] for t, lp in zip(o.token_ids, o.logprobs, strict=True)]))
        del llm, model
    assert outs[0] == outs[1]
