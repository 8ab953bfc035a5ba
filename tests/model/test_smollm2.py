"""Real-weights truth: SmolLM2-135M-Instruct (Q4_1 GGUF) loaded by tinyllm and by transformers' GGUF loader
gives the same last-position logits on English and Chinese prompts and the same 32-token greedy continuation.

Measured max |Δlogit| is about 2e-5 (fp32, tolerance 1e-3). Loading the model twice and generating takes
minutes on 2 shared cores, hence `slow`.
"""

from __future__ import annotations

import pytest
import torch
from hf_helpers import smollm2_path

from tinyllm.infer.kv_cache import ContiguousKVCache
from tinyllm.model.config import preset
from tinyllm.model.hf import load_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "中国的首都是",
    "请用一句话介绍一下机器学习。",
    "<|im_start|>user\nWhat is attention in a transformer?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smol():
    path = smollm2_path()
    torch.manual_seed(0)
    ours = load_model(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ours, ref, tok


def test_config_matches_preset(smol) -> None:
    ours, _, _ = smol
    expected = preset("smollm2-135m")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours.config, name) == getattr(expected, name), name
    assert ours.config.rms_norm_eps == pytest.approx(expected.rms_norm_eps)


def test_last_position_logits_match_transformers(smol) -> None:
    ours, ref, tok = smol
    worst = 0.0
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            a = ours(ids, last_only=True)[0, -1]
            b = ref(ids).logits[0, -1]
            err = (a - b).abs().max().item()
            worst = max(worst, err)
            assert err < 1e-3, f"{text!r}: max |Δlogit| = {err:.2e}"
            assert a.argmax() == b.argmax()
    print(f"smollm2 max |Δlogit| over {len(PROMPTS)} prompts: {worst:.2e}")


def _greedy_loop(model, ids: torch.Tensor, new: int, eos: int) -> torch.Tensor:
    """Prefill once, then one token per step through a contiguous KV cache."""
    cache = ContiguousKVCache.for_model(model, batch=1, capacity=ids.shape[1] + new)
    out = ids
    with torch.no_grad():
        logits = model(ids, cache=cache, last_only=True)
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if nxt.item() == eos:
                break
            logits = model(nxt, cache=cache)
    return out


@pytest.mark.parametrize("text", [PROMPTS[1], PROMPTS[3]])
def test_greedy_continuation_is_token_identical(smol, text: str) -> None:
    ours, ref, tok = smol
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref.generate(ids, do_sample=False, max_new_tokens=32, attention_mask=torch.ones_like(ids))
    got = _greedy_loop(ours, ids, 32, ours.config.eos_token_id)
    assert got.tolist() == expected.tolist()
    try:
        from tinyllm.infer.generate import GenerationConfig, generate
    except ImportError:
        return
    got = generate(ours, ids, GenerationConfig(max_new_tokens=32, do_sample=False))
    assert got.tolist() == expected.tolist()
