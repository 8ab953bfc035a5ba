"""Text prompts that spell the model's special tokens (notes ch.06.4; vLLM's `LLM.generate` on a string).

Regression: `LLM.generate` on a rendered ChatML prompt encoded "<|im_start|>" / "<|im_end|>" as plain text
(69 ordinary tokens where transformers' tokenizer gives 40 for the prompt below), so greedy output differed from
transformers. A text prompt now goes through the tokenizer the way vLLM and a transformers tokenizer take it:
special-token spellings are the special tokens. The same holds for `/v1/completions`, `/v1/embeddings` and
`tinyllm generate` without `--chat`.

The model is a tiny random HF LLaMA with SmolLM2's vocabulary (49152 ids), so the reference tokenizer is
transformers' own reading of the real SmolLM2 GGUF file and the reference generator is transformers' `generate`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_helpers import save_tiny_hf, smollm2_path

from tinyllm.infer.engine import LLM
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

MESSAGES = [{"role": "user", "content": "What is 2+2? Answer briefly."}]
NEW = 16


def _smollm2() -> Path:
    return smollm2_path()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint dir with our SmolLM2 tokenizer, transformers tokenizer, transformers model, ChatML prompt)."""
    gguf = _smollm2()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ckpt = save_tiny_hf(tmp_path_factory.mktemp("smol-vocab"), "llama", seed=0, vocab_size=49152,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    load_tokenizer("smollm2").save(ckpt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompt = ref_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>" in prompt and "<|im_end|>" in prompt
    return ckpt, ref_tok, ref, prompt


def test_text_prompt_ids_and_greedy_equal_transformers(setup) -> None:
    ckpt, ref_tok, ref, prompt = setup
    hf_ids = ref_tok(prompt).input_ids
    llm = LLM(str(ckpt))
    plain = llm.get_tokenizer().encode(prompt)  # the old reading: every special spelled out as text
    assert len(hf_ids) < len(plain)
    (out,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=NEW), use_tqdm=False)
    assert out.prompt_token_ids == hf_ids
    with torch.no_grad():
        expected = ref.generate(torch.tensor([hf_ids]), max_new_tokens=NEW, do_sample=False)[0, len(hf_ids):]
    # token ids: exact by construction (both greedy over the same fp32 weights; a near-tie would show here)
    assert out.outputs[0].token_ids == expected.tolist()


def test_completions_endpoint_and_cli_encode_like_transformers(setup) -> None:
    """/v1/completions, /v1/embeddings and `tinyllm generate` (no --chat) read special-token spellings the same way."""
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from tinyllm.infer.cli_generate import GenerateConfig, _encode
    from tinyllm.serve import create_app
    from tinyllm.serve.embeddings import Embedder

    ckpt, ref_tok, _, prompt = setup
    hf_ids = ref_tok(prompt).input_ids
    llm = LLM(str(ckpt))
    assert _encode(GenerateConfig(model=str(ckpt), prompt=prompt), llm.get_tokenizer(), prompt) == hf_ids
    assert Embedder.from_model(llm.engine.model, llm.get_tokenizer(), "smol").encode(prompt) == hf_ids
    (offline,) = llm.generate(hf_ids, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    with TestClient(create_app(llm.engine, model_name="smol")) as client:
        r = client.post("/v1/completions", json={"model": "smol", "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(hf_ids)
    assert body["choices"][0]["text"] == offline.outputs[0].text
