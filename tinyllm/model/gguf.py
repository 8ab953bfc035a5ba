"""GGUF checkpoints: llama.cpp's single-file format read into a ModelConfig and an HF-named state dict
(notes ch.02 architecture, ch.06 "quantization / deployment"; format: ggml's GGUF specification, block
quantization after Dettmers et al. "LLM.int8()" style absmax scaling, here per 32-element block).

A GGUF file is a header, a key/value metadata table (architecture hyper-parameters under `<arch>.*`, the
tokenizer under `tokenizer.ggml.*`) and a table of tensors stored in ggml's dimension order (fastest axis
first, so a torch shape is the reversed ggml shape). The `gguf` package parses the container; the block
dequantizers below are our own vectorised numpy code. Block layouts (32 weights per block):

  Q8_0  [fp16 d][32 × int8 q]             w = d · q
  Q4_0  [fp16 d][16 bytes of nibbles]     w = d · (q − 8)
  Q4_1  [fp16 d][fp16 m][16 bytes]        w = d · q + m
  nibbles: byte j holds element j in its low 4 bits and element j + 16 in its high 4 bits.
  F32 / F16 / BF16 are plain element arrays (BF16 = the top 16 bits of an fp32).

k-quants (256 weights per super-block, sub-block scales quantized too):

  Q4_K  [fp16 d][fp16 dmin][12 B: eight 6-bit scales sc and mins m][128 B nibbles]
        sub-block i (32 weights): w = (d·sc_i)·q − dmin·m_i; bytes 32c..32c+31 hold sub-block 2c in their
        low nibbles and 2c+1 in their high ones; sc/m: bytes 0–3 / 4–7 give the low 6 bits of sc_0..3 / m_0..3,
        bytes 8–11 give sc_4..7 (low 4 bits) and m_4..7 (high 4 bits), whose top 2 bits are the top 2 bits of
        bytes 0–3 (sc) and 4–7 (m)
  Q6_K  [128 B low nibbles ql][64 B high pairs qh][16 × int8 scales][fp16 d]
        w = (d·scale_{j/16})·(q − 32), q = 4 low bits from ql | 2 high bits from qh; per 128-weight half,
        ql[0:32] / ql[32:64] low nibbles are weights 0–31 / 32–63 and their high nibbles 64–95 / 96–127,
        qh[0:32] bits 0–1, 2–3, 4–5, 6–7 are the high bits of those four runs
  (the float operations in this order, so the result is bit-identical to the `gguf` package's dequantizers)

llama.cpp's converter permutes the rows of the LLaMA q/k projections so its RoPE can rotate adjacent pairs
(x₀,x₁),(x₂,x₃)… instead of HF's split halves (x_i, x_{i+d/2}); per head the HF row order
[0, 1, …, d/2−1 | d/2, …, d−1] is stored as [0, d/2, 1, d/2+1, …]. `_unpermute_rows` undoes that, so the
weights drop into HF-layout attention with rotate-half RoPE. Qwen2 files are stored unpermuted.

Covers architectures `llama` and `qwen2` with tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and
linear RoPE scaling. `read_gguf_blocks` returns the Q4_0/Q4_1/Q8_0 matrices as their raw block rows (q/k rows
un-permuted the same way) for kernels that compute on the blocks as stored (`tinyllm.infer.ggml_linear`).
Not covered: the other k-quants (Q2_K, Q3_K, Q5_K, Q8_K), i-quants, MoE GGUFs, llama3-style `rope_freqs` tensors,
writing GGUF files. Everything unsupported raises CheckpointError naming the file and the value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyllm.model.config import ConfigError, ModelConfig
from tinyllm.model.hf import CheckpointError

SUPPORTED_ARCHS = ("llama", "qwen2")

# ggml type id → (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
_TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}


# ------------------------------------------------------------------ block dequantizers
def _fp16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """Bytes [start, start+2) of every block as an fp32 column [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n_blocks, 16] packed bytes → [n_blocks, 32] values 0..15 (low nibbles first, then high)."""
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin = _fp16_column(blocks, 0), _fp16_column(blocks, 2)  # [n, 1]
    sb = blocks[:, 4:16].reshape(n, 3, 4)
    lo6, hi2_m, packed = sb[:, 0], sb[:, 1], sb[:, 2]  # bytes 0–3, 4–7, 8–11
    sc = np.concatenate([lo6 & 0x3F, (packed & 0x0F) | ((lo6 >> 2) & 0x30)], axis=1)  # [n, 8]
    mn = np.concatenate([hi2_m & 0x3F, (packed >> 4) | ((hi2_m >> 2) & 0x30)], axis=1)
    scale = (d * sc.astype(np.float32))[:, :, None]  # [n, 8, 1]
    offset = (dmin * mn.astype(np.float32))[:, :, None]
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (scale * q - offset).reshape(-1)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 2, 32)  # [n, half, run 0/1, 32]
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    d = _fp16_column(blocks, 208)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, 4 runs, 32]
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return ((d * scales)[:, :, None] * q).reshape(-1)


def dequantize(raw: np.ndarray, ggml_type: int | str) -> np.ndarray:
    """Raw tensor bytes (uint8, any shape) of one ggml type → a flat float32 array."""
    tid = _TYPE_IDS.get(ggml_type, -1) if isinstance(ggml_type, str) else int(ggml_type)
    if tid not in GGML_TYPES:
        raise ValueError(f"ggml tensor type {ggml_type!r} is not supported; "
                         f"supported: {[n for n, _, _ in GGML_TYPES.values()]}")
    name, _, nbytes = GGML_TYPES[tid]
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size % nbytes:
        raise ValueError(f"{name}: {raw.size} bytes is not a whole number of {nbytes}-byte blocks")
    if name == "F32":
        return raw.view(np.float32).copy()
    if name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if name == "BF16":
        # bf16 is the high half of an fp32: shift the 16 stored bits into place
        return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    blocks = raw.reshape(-1, nbytes)
    if name == "Q4_K":
        return _dequantize_q4_k(blocks)
    if name == "Q6_K":
        return _dequantize_q6_k(blocks)
    d = _fp16_column(blocks, 0)
    if name == "Q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    if name == "Q4_0":
        q = _nibbles(blocks[:, 2:]).astype(np.float32) - np.float32(8)
        return (d * q).reshape(-1)
    # Q4_1: an fp16 minimum m is added instead of centering the nibbles at 8
    m = _fp16_column(blocks, 2)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return (d * q + m).reshape(-1)


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleave: per head, rows (i, pair j) go back to (j, i)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# ------------------------------------------------------------------ container access
def _open(path: Path) -> Any:
    try:
        import gguf
    except ImportError:  # pragma: no cover - optional dependency
        raise CheckpointError(f"{path}: reading GGUF needs the 'gguf' package (pip install tinyllm[gguf])") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the parser raises ValueError/IndexError/KeyError/... on damaged headers
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
    return reader


def _field_value(field: Any) -> Any:
    """A GGUF metadata field as a plain python value (str, int, float, bool or list of them)."""
    value = field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_gguf_metadata(path: str | os.PathLike, arrays: bool = True) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain python values.

    With `arrays=False`, long arrays (the tokenizer's tokens, scores, merges) are replaced by their length,
    which is much faster when only the hyper-parameters are wanted.
    """
    path = Path(path)
    return _metadata(path, _open(path), arrays)


def _metadata(path: Path, reader: Any, arrays: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            is_array = len(field.types) > 1 or (field.types and field.types[0].name == "ARRAY")
            if is_array and not arrays and len(field.data) > 16:
                out[key] = len(field.data)
            else:
                out[key] = _field_value(field)
        except Exception as e:
            raise CheckpointError(f"{path}: metadata key {key!r} is unreadable ({type(e).__name__}: {e})") from None
    return out


# ------------------------------------------------------------------ config
def _config_from_metadata(path: Path, meta: dict[str, Any], has_output: bool, embed_rows: int,
                          has_bias: bool) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {list(SUPPORTED_ARCHS)}")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise CheckpointError(f"{path}: metadata key {full!r} is missing")
            return default
        return meta[full]

    hidden = int(get("embedding_length", required=True))
    n_head = int(get("attention.head_count", required=True))
    head_dim = int(get("attention.key_length", hidden // n_head))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else tokens if isinstance(tokens, int) else None
    vocab = int(vocab or get("vocab_size", embed_rows))
    kw: dict[str, Any] = dict(
        model_type=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)),
        num_attention_heads=n_head,
        num_key_value_heads=int(get("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings=not has_output,
        attention_bias=has_bias,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        kw["partial_rotary_factor"] = int(rot) / head_dim
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(f"{path}: rope scaling type {scaling!r} is not supported (only 'linear')")
        kw["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: metadata gives an invalid config: {e}") from None


# ------------------------------------------------------------------ names
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_to_hf_name(name: str) -> str | None:
    """llama.cpp tensor name → HF LLaMA parameter name (None when there is no counterpart)."""
    m = _BLOCK_RE.fullmatch(name)
    if m:
        part = _BLOCK_NAMES.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    stem, _, kind = name.rpartition(".")
    base = _GLOBAL_NAMES.get(stem)
    return None if base is None or kind not in ("weight", "bias") else f"{base}.{kind}"


# ------------------------------------------------------------------ main entry
def _checked(path: Path, t: Any, size: int) -> tuple[int, tuple[int, ...]]:
    """(ggml type id, torch shape) of a reader tensor whose type we read and whose bytes the file holds."""
    tid = int(t.tensor_type)
    if tid not in GGML_TYPES:
        raise CheckpointError(f"{path}: tensor {t.name} has ggml type {t.tensor_type.name} "
                              f"which is not supported; supported: {[n for n, _, _ in GGML_TYPES.values()]}")
    _, block, nbytes = GGML_TYPES[tid]
    n = int(t.n_elements)
    expected = n // block * nbytes
    # the reader maps the file lazily; check the extent ourselves so a cut file fails here, clearly
    if n % block or int(t.data_offset) + expected > size or t.data.nbytes != expected:
        raise CheckpointError(f"{path}: tensor {t.name} needs bytes [{int(t.data_offset)}, "
                              f"{int(t.data_offset) + expected}) but the file has {size} bytes "
                              f"(truncated or corrupt)")
    return tid, tuple(int(s) for s in reversed(t.shape.tolist()))


def read_gguf_blocks(path: str | os.PathLike, types: tuple[str, ...] = ("Q4_0", "Q4_1", "Q8_0")
                     ) -> dict[str, tuple[str, torch.Tensor]]:
    """The 2-D tensors of a GGUF file stored as one of `types`, as they are stored: HF name → (type name,
    uint8 [rows, row bytes]), each row the blocks of one output row (q/k rows un-permuted as in `read_gguf`).
    The tensors are copied out of the file's memory map (the caller may close or replace the file)."""
    path = Path(path)
    reader = _open(path)
    size = path.stat().st_size
    meta = _metadata(path, reader, arrays=False)
    arch = meta.get("general.architecture")
    heads = {".attn_q.": meta.get(f"{arch}.attention.head_count")}
    heads[".attn_k."] = meta.get(f"{arch}.attention.head_count_kv", heads[".attn_q."])
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None or len(t.shape) != 2 or GGML_TYPES.get(int(t.tensor_type), ("",))[0] not in types:
            continue
        tid, shape = _checked(path, t, size)
        name = GGML_TYPES[tid][0]
        rows = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True).reshape(shape[0], -1))
        if arch == "llama" and t.name.startswith("blk."):
            for part, n_head in heads.items():
                if part in t.name:
                    rows = _unpermute_rows(rows, int(n_head))
        out[hf_name] = (name, rows)
    return out


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF file: its ModelConfig and an fp32 state dict in HF LLaMA parameter names.

    A tied lm_head is not materialised (the config says `tie_word_embeddings=True`).
    """
    path = Path(path)
    reader = _open(path)
    meta = _metadata(path, reader, arrays=False)
    size = path.stat().st_size
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    has_bias = any(n.endswith(".bias") and ".attn_" in n for n in names)
    cfg = _config_from_metadata(path, meta, "output.weight" in names, int(embed.shape[-1]), has_bias)
    permute = cfg.model_type == "llama"

    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            raise CheckpointError(f"{path}: tensor {t.name!r} has no tinyllm counterpart")
        tid, shape = _checked(path, t, size)
        w = torch.from_numpy(dequantize(t.data, tid).reshape(shape))
        if permute and t.name.startswith("blk."):
            if ".attn_q." in t.name:
                w = _unpermute_rows(w, cfg.num_attention_heads)
            elif ".attn_k." in t.name:
                w = _unpermute_rows(w, cfg.num_key_value_heads)
        sd[hf_name] = w
    return cfg, sd
