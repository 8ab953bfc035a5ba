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

Building needs g++ and torch's headers (both present wherever torch was pip-installed on Linux); the
shared library is cached under `$TINYLLM_CACHE` (default `~/.cache/tinyllm`) keyed by the source, compiler
flags, torch version and CPU model/flags (the code is built for this CPU), written to a temporary name and renamed. When anything fails the engine keeps the
torch path and says why once (`kernel_status()`); `TINYLLM_NATIVE=0` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from tinyllm.atomic import atomic_path

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

template <typename T>
void decode(const float* q, const T* kv, const int64_t* tables, const int64_t* lens, float* out,
            int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t NB, int64_t B, int64_t nbmax,
            float scale, int64_t window) {
  const int64_t g = H / Hkv;
  const T* vbase = kv + NB * B * Hkv * D;  // V plane follows the K plane
  at::parallel_for(0, N * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, acc, qf;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = w / Hkv, h = w % Hkv, L = lens[n];
      const int64_t t0 = window > 0 ? std::max<int64_t>(0, L - window) : 0, T_ = L - t0;
      s.assign(g * T_, 0.f);
      acc.assign(g * D, 0.f);
      const float* qn = q + (n * H + h * g) * D;
      const int64_t* table = tables + n * nbmax;
      for (int64_t t = t0; t < L; ++t) {
        const T* k = kv + ((table[t / B] * B + t % B) * Hkv + h) * D;
        for (int64_t j = 0; j < g; ++j) {
          const float* qq = qn + j * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qq[d] * static_cast<float>(k[d]);
          s[j * T_ + (t - t0)] = dot * scale;
        }
      }
      for (int64_t j = 0; j < g; ++j) {
        float* sj = s.data() + j * T_;
        float m = -INFINITY;
        for (int64_t t = 0; t < T_; ++t) m = std::max(m, sj[t]);
        float z = 0.f;
        for (int64_t t = 0; t < T_; ++t) { sj[t] = std::exp(sj[t] - m); z += sj[t]; }
        const float inv = 1.f / z;
        for (int64_t t = 0; t < T_; ++t) sj[t] *= inv;
      }
      for (int64_t t = t0; t < L; ++t) {
        const T* v = vbase + ((table[t / B] * B + t % B) * Hkv + h) * D;
        for (int64_t j = 0; j < g; ++j) {
          const float p = s[j * T_ + (t - t0)];
          float* a = acc.data() + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(v[d]);
        }
      }
      std::copy(acc.begin(), acc.end(), out + (n * H + h * g) * D);
    }
  });
}

at::Tensor paged_decode(at::Tensor q, at::Tensor kv, at::Tensor tables, at::Tensor lens, double scale,
                        int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be float32 [N, H, D]");
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2, "kv must be [2, blocks, B, Hkv, D]");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables/lens");
  q = q.contiguous(); kv = kv.contiguous(); tables = tables.contiguous(); lens = lens.contiguous();
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = kv.size(1), B = kv.size(2), Hkv = kv.size(3);
  TORCH_CHECK(kv.size(4) == D && H % Hkv == 0, "head shapes disagree");
  auto out = at::empty({N, H, D}, q.options());
  const float sc = static_cast<float>(scale);
  if (kv.scalar_type() == at::kFloat) {
    decode<float>(q.data_ptr<float>(), kv.data_ptr<float>(), tables.data_ptr<int64_t>(),
                  lens.data_ptr<int64_t>(), out.data_ptr<float>(), N, H, Hkv, D, NB, B, tables.size(1), sc, window);
  } else if (kv.scalar_type() == at::kBFloat16) {
    decode<at::BFloat16>(q.data_ptr<float>(), kv.data_ptr<at::BFloat16>(), tables.data_ptr<int64_t>(),
                         lens.data_ptr<int64_t>(), out.data_ptr<float>(), N, H, Hkv, D, NB, B, tables.size(1), sc,
                         window);
  } else {
    TORCH_CHECK(false, "kv cache dtype must be float32 or bfloat16");
  }
  return out;
}

// y[m, n] = scale[n] · Σ_k x[m, k] · q[n, k]        int8 per-channel absmax weights
// One row's dot product; with AVX-512, four rows at a time share every load of x.
static inline float dot_i8(const float* x, const int8_t* w, int64_t K) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < K; ++k) acc += x[k] * static_cast<float>(w[k]);
  return acc;
}

#ifdef __AVX512F__
static inline void dot4_i8(const float* x, const int8_t* w, int64_t K, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k)))), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + K + k)))), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 2 * K + k)))), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 3 * K + k)))), a3);
  }
  out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) out[r] += x[k] * static_cast<float>(w[r * K + k]);
}
#endif

at::Tensor wo_int8(at::Tensor x, at::Tensor q, at::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == x.size(1), "q must be int8 [N, K]");
  x = x.contiguous(); q = q.contiguous(); scale = scale.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * 4, rows = std::min<int64_t>(4, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xp + m * K;
        float out[4];
#ifdef __AVX512F__
        if (rows == 4) {
          dot4_i8(xm, qp + n0 * K, K, out);
        } else
#endif
        {
          for (int64_t r = 0; r < rows; ++r) out[r] = dot_i8(xm, qp + (n0 + r) * K, K);
        }
        for (int64_t r = 0; r < rows; ++r) yp[m * N + n0 + r] = out[r] * sp[n0 + r];
      }
    }
  });
  return y;
}

// y[m, n] = Σ_groups s[n, g] · Σ_j x[m, j] · c[n, j] + z[n, g] · Σ_j x[m, j]     int4 codes, 2 per byte
at::Tensor wo_int4(at::Tensor x, at::Tensor packed, at::Tensor scale, at::Tensor zero, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, Kp]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.size(1) * 2 == x.size(1), "packed must be uint8 [N, Kp/2]");
  x = x.contiguous(); packed = packed.contiguous();
  scale = scale.contiguous().to(at::kFloat); zero = zero.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), Kp = x.size(1), N = packed.size(0), G = Kp / group, half = group / 2;
  TORCH_CHECK(G * group == Kp && scale.size(1) == G && half % 16 == 0, "group layout disagrees (group % 32 == 0)");
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>(); const float* zp = zero.data_ptr<float>(); float* yp = y.data_ptr<float>();
  std::vector<float> xsum(M * G), xeven(M * Kp / 2), xodd(M * Kp / 2);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < Kp / 2; ++j) { xeven[m * Kp / 2 + j] = xp[m * Kp + 2 * j]; xodd[m * Kp / 2 + j] = xp[m * Kp + 2 * j + 1]; }
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.f;
      for (int64_t j = 0; j < group; ++j) t += xp[m * Kp + g * group + j];
      xsum[m * G + g] = t;
    }
  }
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * 4, rows = std::min<int64_t>(4, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const float* xe = xeven.data() + m * Kp / 2; const float* xo = xodd.data() + m * Kp / 2;
        const float* xs = xsum.data() + m * G;
#ifdef __AVX512F__
        if (rows == 4) {
          // four rows share each load of x; per group t = x_even·lo + x_odd·hi, acc += s_g · t
          __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          float zsum[4] = {0.f, 0.f, 0.f, 0.f};
          const __m512i mask = _mm512_set1_epi32(15);
          for (int64_t g = 0; g < G; ++g) {
            __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t c = 0; c < half; c += 16) {
              const __m512 ev = _mm512_loadu_ps(xe + g * half + c), ov = _mm512_loadu_ps(xo + g * half + c);
              for (int r = 0; r < 4; ++r) {
                const __m512i v = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i*)(pp + (n0 + r) * Kp / 2 + g * half + c)));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                t[r] = _mm512_fmadd_ps(ev, lo, _mm512_fmadd_ps(ov, hi, t[r]));
              }
            }
            for (int r = 0; r < 4; ++r) {
              acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sp[(n0 + r) * G + g]), t[r], acc[r]);
              zsum[r] += zp[(n0 + r) * G + g] * xs[g];
            }
          }
          for (int r = 0; r < 4; ++r) yp[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r]) + zsum[r];
          continue;
        }
#endif
        for (int64_t r = 0; r < rows; ++r) {
          const uint8_t* row = pp + (n0 + r) * Kp / 2;
          const int64_t n = n0 + r;
          float acc = 0.f;
          for (int64_t g = 0; g < G; ++g) {
            const uint8_t* p = row + g * half;
            const float* e = xe + g * half; const float* o = xo + g * half;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < half; ++j)
              dot += e[j] * static_cast<float>(p[j] & 15) + o[j] * static_cast<float>(p[j] >> 4);
            acc += sp[n * G + g] * dot + zp[n * G + g] * xs[g];
          }
          yp[m * N + n] = acc;
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tinyllm_cpu, m) {
  m.def("paged_decode", &paged_decode);
  m.def("wo_int8", &wo_int8);
  m.def("wo_int4", &wo_int4);
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None}


def _cpu_signature() -> str:
    """The CPU model and flags: -march=native code must never be loaded on another kind of CPU (shared homes)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _cache_dir() -> Path:
    return Path(os.environ.get("TINYLLM_CACHE", Path.home() / ".cache" / "tinyllm")) / "kernels"


def _build(target: Path) -> None:
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
        src.write_text(_SOURCE)
        cmd = [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *incs, str(src), "-o", str(tmp_so),
               f"-L{libdir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libdir}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def load() -> bool:
    """Build (once, cached) and load the kernels; False (with `kernel_status()` saying why) when unavailable."""
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        try:
            if os.environ.get("TINYLLM_NATIVE", "1") == "0":
                raise RuntimeError("disabled by TINYLLM_NATIVE=0")
            if not sys.platform.startswith("linux"):
                raise RuntimeError(f"native kernels are built on Linux only, not {sys.platform}")
            parts = [_SOURCE, *_FLAGS, torch.__version__, _cpu_signature()]
            key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
            target = _cache_dir() / f"tinyllm_cpu_{key}.so"
            if not target.exists():
                _build(target)
            torch.ops.load_library(str(target))
            _state["loaded"] = True
        except Exception as e:  # the torch path still works; remember why
            _state["loaded"], _state["error"] = False, f"{type(e).__name__}: {e}"
        return bool(_state["loaded"])


def kernel_status() -> str:
    """'loaded', 'not built yet', or the reason the native kernels are unavailable."""
    if _state["loaded"] is None:
        return "not built yet"
    return "loaded" if _state["loaded"] else str(_state["error"])


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                           scale: float, window: int | None = None) -> torch.Tensor:
    """q [N, H, D] (one query per sequence) over the pool `kv_layer` [2, blocks, B, Hkv, D] through block
    `tables` [N, max_blocks] and context lengths `lens` [N] → [N, H, D] in q's dtype. Requires `load()`."""
    out = torch.ops.tinyllm_cpu.paged_decode(q.float(), kv_layer, tables, lens, float(scale),
                                             int(window) if window else 0)
    return out.to(q.dtype)


NATIVE_MAX_ROWS = 16  # QuantLinear: up to this many input rows use the native matrix–vector kernels


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] · (scale[:, None] · q)ᵀ → [M, N] in fp32; q int8 [N, K]. Requires `load()`."""
    return torch.ops.tinyllm_cpu.wo_int8(x.float(), q, scale)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, Kp] (zero-padded to whole groups) · ŵᵀ with ŵ = scale·codes + zero per group → [M, N] fp32;
    packed uint8 [N, Kp/2] (even column in the low nibble). Requires `load()`."""
    return torch.ops.tinyllm_cpu.wo_int4(x.float(), packed, scale, zero, int(group_size))
