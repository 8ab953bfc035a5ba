"""GGUF reading: our block dequantizers equal gguf's reference, llama.cpp's q/k permutation is undone, and a
GGUF file written from a tiny HF model loads into tinyllm with logits equal to transformers (the original
HF model for F32, transformers' own GGUF loader for the quantized types)."""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from tinyllm.model.gguf import dequantize, read_gguf, read_gguf_blocks, read_gguf_metadata
from tinyllm.model.hf import CheckpointError, load_model

transformers = pytest.importorskip("transformers")

ROPE_THETA = 50000.0
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantize_matches_reference(qtype: Q) -> None:
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 3.0, (48, 1))).astype(np.float32)
    data[3] = 0.0  # an all-zero block (scale 0) must dequantize to zeros
    raw = ref_quantize(data, qtype)
    ours = dequantize(raw, int(qtype)).reshape(data.shape)
    ref = ref_dequantize(raw, qtype).reshape(data.shape)
    # element-wise d·q (+ m), one rounding per operation and no reduction: bit-equal on any CPU
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == np.float32
    if qtype == Q.F32:
        np.testing.assert_array_equal(ours, data)


@pytest.mark.parametrize(("qtype", "nbytes", "scales"), [(Q.Q4_K, 144, (0, 2)), (Q.Q6_K, 210, (208,))],
                         ids=["Q4_K", "Q6_K"])
def test_k_quant_dequantize_bit_identical(qtype: Q, nbytes: int, scales: tuple[int, ...]) -> None:
    # random super-blocks (every scale, min, code and high-bit pattern) with finite fp16 super-scales
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (96, nbytes), dtype=np.uint8)
    for off in scales:
        raw[:, off:off + 2] = rng.normal(0, 0.05, (96, 1)).astype(np.float16).view(np.uint8)
    ours = dequantize(raw, int(qtype))
    ref = ref_dequantize(raw, qtype).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == (96 * 256,)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(dequantize(raw, qtype.name).view(np.uint32), ours.view(np.uint32))


@pytest.mark.parametrize(("arch", "qtype"), [("llama", Q.Q4_1), ("llama", Q.Q8_0), ("qwen2", Q.Q4_0)])
def test_gguf_blocks_dequantize_to_read_gguf(tmp_path, arch: str, qtype: Q) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(_tiny_hf(arch, True), str(path), qtype, arch)
    _, sd = read_gguf(path)
    blocks = read_gguf_blocks(path)
    assert set(blocks) == {k for k, v in sd.items() if v.dim() == 2}  # every matrix, none of the norms
    for name, (tname, rows) in blocks.items():
        assert tname == qtype.name and rows.dtype == torch.uint8
        w = torch.from_numpy(dequantize(rows.numpy(), tname)).view(rows.shape[0], -1)
        assert torch.equal(w, sd[name]), name  # q/k rows un-permuted like the dequantized ones
    assert read_gguf_blocks(path, types=("Q5_0",)) == {}


def test_nibble_order_by_hand() -> None:
    # one Q4_1 block: d = 1, m = -8, byte j = (low nibble j, high nibble 15 - j)
    scales = np.array([1.0, -8.0], dtype=np.float16).view(np.uint8)
    qs = np.array([j | ((15 - j) << 4) for j in range(16)], dtype=np.uint8)
    block = np.concatenate([scales, qs])
    out = dequantize(block, "Q4_1")
    expected = [j - 8 for j in range(16)] + [15 - j - 8 for j in range(16)]
    np.testing.assert_array_equal(out, np.array(expected, dtype=np.float32))


def test_unknown_type_rejected() -> None:
    with pytest.raises(ValueError, match="Q5_K"):
        dequantize(np.zeros(176, np.uint8), "Q5_K")
    with pytest.raises(ValueError, match="210-byte blocks"):
        dequantize(np.zeros(200, np.uint8), "Q6_K")


# ------------------------------------------------------------------ tiny GGUF files
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows (what the reader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf(arch: str, tied: bool):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=ROPE_THETA, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def _write_gguf(model, path: str, qtype: Q, arch: str = "llama", arch_name: str | None = None) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(path, arch_name or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges(["t 1"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        stem, kind = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            i, part = stem.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{parts[part]}.{kind}"
        else:
            gname = f"{names[stem]}.{kind}"
        a = t.float().numpy()
        if arch == "llama" and ".attn_q." in gname:
            a = _permute(a, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in gname:
            a = _permute(a, cfg.num_key_value_heads)
        if a.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(gname, a)
        else:
            w.add_tensor(gname, ref_quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


IDS = torch.tensor([[1, 5, 9, 33, 17, 60, 2, 44, 81, 3, 7]])


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_f32_gguf_equals_original_hf_model(tmp_path, arch: str, tied: bool) -> None:
    hf = _tiny_hf(arch, tied)
    path = tmp_path / "tiny.gguf"
    _write_gguf(hf, str(path), Q.F32, arch)
    cfg, sd = read_gguf(path)
    assert (cfg.model_type, cfg.tie_word_embeddings, cfg.num_key_value_heads) == (arch, tied, 2)
    assert cfg.attention_bias == (arch == "qwen2")
    assert ("lm_head.weight" in sd) == (not tied)
    ref_sd = hf.state_dict()
    for k, v in sd.items():  # the permutation is undone exactly
        torch.testing.assert_close(v, ref_sd[k], rtol=0, atol=0)
    ours = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_gguf_matches_transformers_loader(tmp_path, qtype: Q) -> None:
    hf = _tiny_hf("llama", tied=False)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    _write_gguf(hf, str(path), qtype)
    _, sd = read_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ref_sd = ref.state_dict()
    for k, v in sd.items():  # the same dequantized values, moved, not recomputed
        torch.testing.assert_close(v, ref_sd[k], rtol=0, atol=0)
    ours = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, rtol=0, atol=1e-5)


def test_bf16_gguf_equals_rounded_hf_model(tmp_path) -> None:
    # a second reference independent of transformers' loader: the HF model with its matrices rounded to
    # bf16, which is exactly what the file stores
    hf = _tiny_hf("llama", tied=False)
    path = tmp_path / "tiny-bf16.gguf"
    _write_gguf(hf, str(path), Q.BF16)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(p.bfloat16().float())
    ours = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, rtol=0, atol=1e-5)


def test_metadata_is_plain_python(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(_tiny_hf("llama", True), str(path), Q.Q8_0)
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and isinstance(meta["llama.block_count"], int)
    assert isinstance(meta["llama.rope.freq_base"], float)
    assert meta["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert meta["tokenizer.ggml.bos_token_id"] == 1
    assert read_gguf_metadata(path, arrays=False)["tokenizer.ggml.tokens"] == 96


def test_unknown_architecture_rejected(tmp_path) -> None:
    path = tmp_path / "gpt2ish.gguf"
    _write_gguf(_tiny_hf("llama", True), str(path), Q.F32, "llama", arch_name="falcon")
    with pytest.raises(CheckpointError, match=r"gpt2ish\.gguf.*'falcon'"):
        read_gguf(path)


def test_unsupported_quant_type_rejected(tmp_path) -> None:
    path = tmp_path / "q5.gguf"
    _write_gguf(_tiny_hf("llama", True), str(path), Q.Q5_0)
    with pytest.raises(CheckpointError, match=r"q5\.gguf.*Q5_0"):
        read_gguf(path)


def test_truncated_file_rejected(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(_tiny_hf("llama", False), str(path), Q.Q4_1)
    cut = tmp_path / "cut.gguf"
    shutil.copy(path, cut)
    os.truncate(cut, path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*(truncated|corrupt)"):
        read_gguf(cut)
    with pytest.raises(CheckpointError, match=r"cut\.gguf"):
        load_model(cut)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.gguf"):
        read_gguf(garbage)
