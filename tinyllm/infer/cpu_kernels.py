"""Native CPU kernels for the engine, compiled on first use with the system C++ compiler.

Two kinds of kernel live here: paged decode attention, and weight-only int8/int4 matrix–vector products.

Paged decode attention (`paged_decode_attention`): without it, a decode step gathers
every running sequence's whole context out of the block pool (`index_select` copies K and V, then SDPA reads
the copy): at batch 64 with 300-token contexts that is ~1 GB of copies per step on a 30-layer model — more
bytes than the weights themselves. The kernel walks each sequence's block table and reads every cached
K/V row exactly once, straight from the pool, the way vLLM's PagedAttention does on a GPU:

    for each (sequence n, kv head h):            # parallel over threads (at::parallel_for)
        s[j, t] = scale · q[n, h·g + j] · K[block(t), t mod B, h]      j < g = heads per kv head (GQA)
        p[j, :] = softmax(s[j, :])                                     window: t ≥ len − window
        o[n, h·g + j] = Σ_t p[j, t] · V[block(t), t mod B, h]

The torch path (`PagedKVCache.attend` without the kernel) stays the reference; tests check equality.

Weight-only linears (`int8_linear`, `int4_linear`) for the few rows of a decode step: a batch-1 decode is a
matrix–vector product whose time is the bytes of the weight matrix, so reading int8 (1 B) or packed int4
(0.5 B + group scales) instead of fp32 (4 B) is the whole gain — if the codes are turned into floats inside
the dot product and never written out. Torch's packed int8/int4 CPU kernels are slower than the fp32 GEMV
at M = 1 on this build; these loops read each code once (int4: y = Σ_g s_g·Σ x_j c_j + z_g·Σ x_j).
`QuantLinear` uses them for inputs of at most `NATIVE_MAX_ROWS` rows (prefill stays dequantize + matmul,
which is compute-bound and where BLAS wins) and keeps the dequantize path as the reference.

One build per instruction set, chosen when loaded. The C++ (`cpu_kernels.cpp` and `csrc/*.h`, beside this file)
has three code paths selected by the compiler flags of its build, never by `-march=native`:

    avx512    -mavx512f -mavx512bw -mavx512vl -mfma   16-wide fp32 FMA intrinsics
    avx2      -mavx2 -mfma -mf16c                      8-wide fp32 FMA intrinsics (int8 codes widened with
                                                       vpmovsxbd, int4 nibbles with vpmovzxbd + and / shift)
    portable  no -m flag                               plain loops the compiler vectorises for its baseline

`load()` builds and loads the widest one `capability.cpu_isa()` finds in the CPU's flags (an AVX2-only EPYC
or laptop gets avx2, not scalar code); `TINYLLM_NATIVE_ISA=avx2|portable` forces a narrower one, and one the
CPU lacks falls back to the widest it has with a warning that `kernel_status()` repeats. Each build registers
its ops under its own namespace (`torch.ops.tinyllm_cpu_<isa>`), so one process can load several: the tests
run every build the machine supports against the references. The builds sum in different orders, so they
agree with each other and with torch to rounding, not bit for bit.

Building needs g++ and torch's headers (both present wherever torch was pip-installed on Linux); each
shared library is cached under `$TINYLLM_CACHE` (default `~/.cache/tinyllm`) keyed by the source, the ISA and
its flags, the compiler and the torch version, written to a temporary name and renamed. When anything fails
the engine keeps the torch path and says why once (`kernel_status()`); `TINYLLM_NATIVE=0` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch

from tinyllm import capability
from tinyllm.atomic import atomic_path

ISAS = ("avx512", "avx2", "portable")  # widest first
# what each build is compiled with; the portable build has no -m flag (the compiler's baseline, SSE2 on x86-64)
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "portable": (),
}
# the /proc/cpuinfo flags each build needs (as in `capability.cpu_isa`)
_ISA_CPU_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "fma", "f16c"), "avx2": ("avx2", "fma", "f16c"),
                  "portable": ()}
_SOURCE_FILE = Path(__file__).with_name("cpu_kernels.cpp")
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_lock = threading.Lock()
# the active path: loaded None (not tried) / True / False, its isa, the error when off, a note when lowered
_state: dict[str, object] = {"loaded": None, "error": None, "isa": None, "note": None}
_libs: dict[str, Any] = {}  # isa → torch.ops namespace of a library loaded in this process


def supported_isas() -> tuple[str, ...]:
    """The kernel builds this CPU can run, widest first (always ends with "portable")."""
    return ISAS[ISAS.index(capability.cpu_isa()):]


def isas_to_test() -> tuple[str, ...]:
    """The builds a test of the kernels should run: from the one `TINYLLM_NATIVE_ISA` asks for (else the widest
    the CPU has) down to portable, so a run imitating an AVX2-only machine tests avx2 and portable. An invalid
    request yields every supported build (the bad value is the subject of its own test)."""
    try:
        top, _ = resolve_isa()
    except ValueError:
        return supported_isas()
    return ISAS[ISAS.index(top):]


def resolve_isa(requested: str | None = None) -> tuple[str, str | None]:
    """The build to load and, when the request had to be lowered, why. `requested` (else `TINYLLM_NATIVE_ISA`,
    else nothing) may name any level the CPU runs; one it lacks falls back to the widest it has."""
    source = "isa" if requested is not None else "TINYLLM_NATIVE_ISA"
    req = (requested if requested is not None else os.environ.get("TINYLLM_NATIVE_ISA", "")).strip().lower()
    best = capability.cpu_isa()
    if not req:
        return best, None
    if req not in ISAS:
        raise ValueError(f"{source}={req!r} is not one of {list(ISAS)}")
    if ISAS.index(req) >= ISAS.index(best):
        return req, None
    lacks = sorted(set(_ISA_CPU_FLAGS[req]) - capability.cpu_flags())
    why = f" (lacks {', '.join(lacks)})" if lacks else ""
    return best, f"{source}={req} asks for instructions this CPU does not have{why}; using {best}"


def _cache_dir() -> Path:
    return Path(os.environ.get("TINYLLM_CACHE", Path.home() / ".cache" / "tinyllm")) / "kernels"


def _namespace(isa: str) -> str:
    return f"tinyllm_cpu_{isa}"


def _build(target: Path, source: str, flags: list[str]) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdir = cpp_extension.library_paths()[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    # the compiler writes a temp beside the target, renamed over it only when complete: a half-written
    # library is never loaded
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_path(target) as tmp_so:
        src = Path(tmp) / "kernels.cpp"
        src.write_text(source)
        shutil.copytree(_SOURCE_FILE.parent / "csrc", Path(tmp) / "csrc")  # the headers it includes
        cmd = [cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *incs, str(src), "-o", str(tmp_so),
               f"-L{libdir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libdir}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _load_library(isa: str) -> Any:
    """Build (cached on disk, keyed by source and headers, flags, compiler and torch) and load one ISA's library."""
    if isa in _libs:
        return _libs[isa]
    source = _SOURCE_FILE.read_text()
    headers = [h.read_text() for h in sorted((_SOURCE_FILE.parent / "csrc").glob("*.h"))]
    flags = [*_FLAGS, *ISA_FLAGS[isa], f"-DTINYLLM_NS={_namespace(isa)}"]
    parts = [source, *headers, *flags, os.environ.get("CXX", "g++"), torch.__version__]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = _cache_dir() / f"tinyllm_cpu_{isa}_{key}.so"
    if not target.exists():
        _build(target, source, flags)
    torch.ops.load_library(str(target))
    ops = getattr(torch.ops, _namespace(isa))
    built = ops.compiled_isa()
    if built != isa:  # the flags did not select the intended code path: never run it under the wrong name
        raise RuntimeError(f"the {isa} build compiled the {built!r} code path (flags {ISA_FLAGS[isa]})")
    _libs[isa] = ops
    return ops


def load(isa: str | None = None) -> bool:
    """Build (once, cached) and load the kernels and make them the active path; False (with
    `kernel_status()` saying why) when unavailable. `isa=None` keeps an earlier answer, or picks
    `TINYLLM_NATIVE_ISA` / the widest build the CPU runs; naming an isa switches to that build."""
    with _lock:
        if isa is None and _state["loaded"] is not None:
            return bool(_state["loaded"])
        try:
            if os.environ.get("TINYLLM_NATIVE", "1") == "0":
                raise RuntimeError("disabled by TINYLLM_NATIVE=0")
            if not sys.platform.startswith("linux"):
                raise RuntimeError(f"native kernels are built on Linux only, not {sys.platform}")
            chosen, note = resolve_isa(isa)
            if note:
                warnings.warn(note, RuntimeWarning, stacklevel=2)
            _load_library(chosen)
            _state.update(loaded=True, error=None, isa=chosen, note=note)
        except Exception as e:  # the torch path still works; remember why
            _state.update(loaded=False, error=f"{type(e).__name__}: {e}", isa=None, note=None)
        return bool(_state["loaded"])


def active_isa() -> str | None:
    """The build the kernel functions run ("avx512", "avx2", "portable"), None when not loaded."""
    return str(_state["isa"]) if _state["loaded"] else None


def kernel_status() -> str:
    """'loaded (<isa>)' (plus why a requested isa was lowered), 'not built yet', or why the kernels are off."""
    if _state["loaded"] is None:
        return "not built yet"
    if not _state["loaded"]:
        return str(_state["error"])
    return f"loaded ({_state['isa']})" + (f"; {_state['note']}" if _state["note"] else "")


def _ops() -> Any:
    if not _state["loaded"]:
        raise RuntimeError(f"native kernels are not loaded ({kernel_status()}); call cpu_kernels.load() first")
    return _libs[str(_state["isa"])]


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                           scale: float, window: int | None = None) -> torch.Tensor:
    """q [N, H, D] (one query per sequence) over the pool `kv_layer` [2, blocks, B, Hkv, D] through block
    `tables` [N, max_blocks] and context lengths `lens` [N] → [N, H, D] in q's dtype. Requires `load()`."""
    out = _ops().paged_decode(q.float(), kv_layer, tables, lens, float(scale),
                                             int(window) if window else 0)
    return out.to(q.dtype)


NATIVE_MAX_ROWS = 16  # QuantLinear: up to this many input rows use the native matrix–vector kernels


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] · (scale[:, None] · q)ᵀ → [M, N] in fp32; q int8 [N, K]. Requires `load()`."""
    return _ops().wo_int8(x.float(), q, scale)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, Kp] (zero-padded to whole groups) · ŵᵀ with ŵ = scale·codes + zero per group → [M, N] fp32;
    packed uint8 [N, Kp/2] (even column in the low nibble). Requires `load()`."""
    return _ops().wo_int4(x.float(), packed, scale, zero, int(group_size))


GGML_NATIVE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # ggml type ids `ggml_linear` runs as stored
F32_TYPE = 0  # ggml's F32 id: `decode_layer` takes a plain float32 [N, K] matrix under it
OWN_INT8_TYPE = 1024  # `decode_layer`: a `QuantLinear` int8 matrix, given as (q, scale)
OWN_INT4_TYPE = 1025  # `decode_layer`: a `QuantLinear` int4 matrix, given as (packed, scale, zero)


def f32_matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w [N, K] fp32 · x [K] → [N] (four rows at a time from four regions of each thread's rows): the batch-1 fp32 kernel
    of `decode_layer`, exposed for its test against torch. Requires `load()`."""
    return _ops().f32_matvec(x.float(), w)


X_Q8 = 256  # flag on a ggml type id: round x to int8 blocks first, as llama.cpp does (`ggml_linear(x_q8=True)`)


def ggml_linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: str, x_q8: bool = False) -> torch.Tensor:
    """x [M, K] · ŵᵀ → [M, N] fp32 with ŵ the llama.cpp blocks `blocks` uint8 [N, K/32 · block bytes] of
    type Q4_0, Q4_1 or Q8_0, read as stored (never dequantized to memory). `x_q8`: llama.cpp's arithmetic —
    each row of x rounded to int8 blocks of 32 (`quantize_x_q8`) and integer block dot products, ~2-3x fewer
    instructions; the result is then ŵ · x̂ for that rounding x̂, not ŵ · x. Requires `load()`."""
    return _ops().ggml_matvec(x.float(), blocks, GGML_NATIVE_TYPES[ggml_type] | (X_Q8 if x_q8 else 0))


def ggml_dequantize(blocks: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """ŵ [N, K] fp32 of the llama.cpp blocks uint8 [N, K/32 · block bytes] (Q4_0, Q4_1 or Q8_0): the values
    `model.gguf.dequantize` computes, in parallel native code. Requires `load()`."""
    return _ops().ggml_dequantize(blocks, GGML_NATIVE_TYPES[ggml_type])


def quantize_x_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference of the kernels' activation rounding, per block of 32 of the last axis of x [..., K]:
    (codes int8 [..., K], d [..., K/32], s [..., K/32]) with d = fp16(amax/127), codes = round-half-even(x ·
    127/amax) (0 where amax = 0) and s = fp16(amax/127 · Σcodes), as llama.cpp's Q8_0/Q8_1 `quantize_row`."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), torch.zeros_like(amax))
    codes = torch.round(xb * inv[..., None])
    d = amax / 127.0
    s = (d * codes.sum(-1)).half().float()
    return codes.to(torch.int8).reshape(x.shape), d.half().float(), s


def decode_layer(x: torch.Tensor, ln1: torch.Tensor, ln2: torch.Tensor, eps1: float, eps2: float,
                 weights: list[torch.Tensor], types: list[int], cos: torch.Tensor, sin: torch.Tensor,
                 kv_layer: torch.Tensor, table: torch.Tensor, pos: int, scale: float, heads: int,
                 window: int | None = None) -> None:
    """One pre-norm LLaMA layer for one token, in place on x [d] fp32: RMSNorm, q/k/v from GGUF blocks or fp32
    matrices (`weights` q, k, v, o, gate, up, down with ggml type ids `types`, `F32_TYPE` for fp32), RoPE with this position's cos and
    signed sin [D], K/V written to the fp32 pool layer `kv_layer` at `pos` through block `table`, paged
    attention over positions 0..pos, o-projection and residual, RMSNorm, SwiGLU MLP and residual."""
    _ops().decode_layer(x, ln1, ln2, float(eps1), float(eps2), weights, types, cos, sin, kv_layer, table, int(pos),
                        float(scale), int(heads), int(window) if window else 0)


class DecodePlan:
    """Every layer of a decode step in one native call: `layers` is a list of `decode_layer`'s per-layer arguments
    (ln1, ln2, eps1, eps2, weights, types), checked once here and held by the build that is active now.
    `plan(x, cos, sin, kv, tables, positions)` runs them in order on x [R, d] in place: row r is the token at
    positions[r] of the sequence with block table tables[r] (cos/sin [R, D] its rotary rows, kv the whole fp32
    pool [layers, 2, blocks, B, Hkv, D]); each row is computed exactly as `decode_layer` computes a lone token,
    every row's K/V written before any row attends. One call instead of one per layer: each crossing from
    Python into the kernels costs tens of microseconds when the layer before has flushed the caches
    (BENCHMARKS.md, batch-1 decode)."""

    def __init__(self, layers: list[tuple], heads: int, kv_heads: int, head_dim: int, scale: float,
                 window: int | None = None) -> None:
        self.ops, self.isa = _ops(), active_isa()
        weights = [w for lay in layers for w in lay[4]]
        types = [int(t) for lay in layers for t in lay[5]]
        norms = [n for lay in layers for n in lay[:2]]
        eps = [float(e) for lay in layers for e in lay[2:4]]
        self.id = self.ops.decode_plan_new(weights, types, norms, eps, int(heads), int(kv_heads), int(head_dim))
        self.scale, self.window = float(scale), int(window) if window else 0
        weakref.finalize(self, self.ops.decode_plan_free, self.id)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                 tables: torch.Tensor, positions: torch.Tensor) -> None:
        self.ops.decode_plan_run(self.id, x, cos, sin, kv, tables, positions, self.scale, self.window)
