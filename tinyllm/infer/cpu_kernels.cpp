// tinyllm's native CPU kernels: paged decode attention and weight-only int8/int4 matrix-vector products.
// The concepts and the Python side live in cpu_kernels.py. One source, three builds chosen by compiler flags:
//   -mavx512f -mavx512bw -mavx512vl -mfma   AVX-512 intrinsics (16-wide fp32 FMA)
//   -mavx2 -mfma -mf16c                      AVX2 intrinsics (8-wide fp32 FMA)
//   no -m flags                              plain loops the compiler vectorises for the baseline ISA
// TINYLLM_NS (a -D define) names the op namespace, so every build can be loaded side by side in one process.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__)
#define TINYLLM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define TINYLLM_AVX2 1
#endif
#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
#include <immintrin.h>
#endif
#ifndef TINYLLM_NS
#error "build with -DTINYLLM_NS=<op namespace>"
#endif

namespace {

#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
// the sum of a register's eight floats
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

std::string compiled_isa() {
#if defined(TINYLLM_AVX512)
  return "avx512";
#elif defined(TINYLLM_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// ---------------------------------------------------------------- paged decode attention
// Calls f(t, row) for t = t0..L-1 with row the address of token t's [h] slot in `plane` ([NB, B, Hkv, D]): walks
// the block table a block at a time (no division per token).
template <typename T, typename F>
static inline void for_rows(const T* plane, const int64_t* table, int64_t t0, int64_t L, int64_t B, int64_t Hkv,
                            int64_t h, int64_t D, F&& f) {
  for (int64_t t = t0; t < L;) {
    const int64_t blk = t / B, end = std::min(L, (blk + 1) * B);
    const T* row = plane + ((table[blk] * B + t % B) * Hkv + h) * D;
    for (; t < end; ++t, row += Hkv * D) f(t, row);
  }
}

// One query head against its kv head's cached rows t0..L-1 (through the block table): scores, softmax, weighted
// sum of V into out [D]. `s` holds L - t0 floats. The plain version: loops with `omp simd` that the compiler
// vectorises at whatever width the build allows; the reference of the vector version below.
template <typename T>
static void attend_plain(const float* q, const T* kv, const T* vbase, const int64_t* table, int64_t t0, int64_t L,
                         int64_t B, int64_t Hkv, int64_t h, int64_t D, float scale, float* s, float* out) {
  const int64_t T_ = L - t0;
  for_rows(kv, table, t0, L, B, Hkv, h, D, [&](int64_t t, const T* k) {
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(k[d]);
    s[t - t0] = dot * scale;
  });
  float m = -INFINITY;
  for (int64_t t = 0; t < T_; ++t) m = std::max(m, s[t]);
  float z = 0.f;
  for (int64_t t = 0; t < T_; ++t) { s[t] = std::exp(s[t] - m); z += s[t]; }
  const float inv = 1.f / z;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for_rows(vbase, table, t0, L, B, Hkv, h, D, [&](int64_t t, const T* v) {
    const float p = s[t - t0] * inv;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * static_cast<float>(v[d]);
  });
}

#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
// 8 floats from fp32 or bf16 (a bf16 is the top half of an fp32)
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// e^x for x ≤ 0 (softmax after subtracting the max), 8 at a time: x = n·ln2 + r with |r| ≤ ln2/2, e^r by a
// degree-6 polynomial (the Taylor-like minimax fit used for single precision since Cephes), 2^n through the
// exponent bits; below −87.3 (under the smallest normal float) it returns e^−87.3 ≈ 1e−38 instead of 0.
// Within 1 ulp of std::exp over [−87, 0] (checked at 7 million points).
static inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact high, small low
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// out[0..8R) = Σ_t s[t−t0]·inv · V_t[0..8R) over the rows of `plane` (already offset to the first column), the R
// sums held in registers
template <int R, typename T>
static inline void v_sums(const T* plane, const int64_t* table, int64_t t0, int64_t L, int64_t B, int64_t Hkv,
                          int64_t h, int64_t D, const float* s, float inv, float* out) {
  __m256 acc[R];
  for (int c = 0; c < R; ++c) acc[c] = _mm256_setzero_ps();
  for_rows(plane, table, t0, L, B, Hkv, h, D, [&](int64_t t, const T* v) {
    const __m256 p = _mm256_set1_ps(s[t - t0] * inv);
    for (int c = 0; c < R; ++c) acc[c] = _mm256_fmadd_ps(p, load8(v + 8 * c), acc[c]);
  });
  for (int c = 0; c < R; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

// The same computation with 8-wide registers, for D a multiple of 8: each score's dot product in two
// accumulators reduced once, the exponentials 8 at a time, V summed in registers 64 columns at a time. Its sums
// associate differently from the plain loops; tests hold both to the torch reference.
template <typename T>
static void attend_vec(const float* q, const T* kv, const T* vbase, const int64_t* table, int64_t t0, int64_t L,
                       int64_t B, int64_t Hkv, int64_t h, int64_t D, float scale, float* s, float* out) {
  const int64_t T_ = L - t0;
  for_rows(kv, table, t0, L, B, Hkv, h, D, [&](int64_t t, const T* k) {
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a);
      b = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k + d + 8), b);
    }
    if (d < D) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a);
    s[t - t0] = hsum256(_mm256_add_ps(a, b)) * scale;
  });
  float m = -INFINITY;
  for (int64_t t = 0; t < T_; ++t) m = std::max(m, s[t]);
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vz = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= T_; t += 8) {
    const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, e);
    vz = _mm256_add_ps(vz, e);
  }
  float z = hsum256(vz);
  for (; t < T_; ++t) { s[t] = std::exp(s[t] - m); z += s[t]; }
  const float inv = 1.f / z;
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) v_sums<8>(vbase + d0, table, t0, L, B, Hkv, h, D, s, inv, out + d0);
  for (; d0 < D; d0 += 8) v_sums<1>(vbase + d0, table, t0, L, B, Hkv, h, D, s, inv, out + d0);
}
#endif

// Paged decode attention for N sequences of one query token each, parallel over (sequence, query head): a
// lone sequence's 9 heads split 5/4 over two threads, where (sequence, kv head) units split SmolLM2's 3 kv heads
// 2/1. Each unit is computed by one thread in a fixed order, so results do not depend on the thread count.
template <typename T>
void decode(const float* q, const T* kv, const int64_t* tables, const int64_t* lens, float* out,
            int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t NB, int64_t B, int64_t nbmax,
            float scale, int64_t window) {
  const int64_t g = H / Hkv;
  const T* vbase = kv + NB * B * Hkv * D;  // V plane follows the K plane
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> s;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = w / H, hq = w % H, L = lens[n];
      const int64_t t0 = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      s.resize(static_cast<size_t>(std::max<int64_t>(L - t0, 1)));
      const float* qq = q + (n * H + hq) * D;
      float* o = out + (n * H + hq) * D;
#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
      if (D % 8 == 0) {
        attend_vec<T>(qq, kv, vbase, tables + n * nbmax, t0, L, B, Hkv, hq / g, D, scale, s.data(), o);
        continue;
      }
#endif
      attend_plain<T>(qq, kv, vbase, tables + n * nbmax, t0, L, B, Hkv, hq / g, D, scale, s.data(), o);
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

// ---------------------------------------------------------------- streaming the weights
// A decode step reads each weight once, from memory (a model's weights exceed the caches), so what limits it is
// how many cache lines a core keeps in flight. Every kernel computes four weight rows per step (each load of x
// serves four rows), and the four come from four regions of the thread's rows: four sequential streams the
// hardware prefetchers follow side by side, each region's next row starting where its last one ended. Four
// *adjacent* rows, with the next ones software-prefetched, read 0.5–0.9x as fast from memory on an AVX2 EPYC
// (fp32, Q8_0, Q4_1 matrices of SmolLM2's shapes; BENCHMARKS.md, batch-1 decode). Leftover rows (fewer than
// four) go through the same four-row kernel with the row repeated, so every row is computed by the same code
// wherever it falls: a row's value does not depend on the thread count or on its neighbours.
// `step(rows, count)`: compute rows[0..4), keep the first `count`.
template <typename F>
static void four_streams(int64_t r0, int64_t r1, F&& step) {
  const int64_t h = (r1 - r0) / 4;
  int64_t rows[4];
  for (int64_t i = 0; i < h; ++i) {
    for (int s = 0; s < 4; ++s) rows[s] = r0 + s * h + i;
    step(rows, 4);
  }
  for (int64_t r = r0 + 4 * h; r < r1; ++r) {
    rows[0] = rows[1] = rows[2] = rows[3] = r;
    step(rows, 1);
  }
}

// ---------------------------------------------------------------- int8: y[m, n] = scale[n] · Σ_k x[m, k] · q[n, k]
// Four rows w[0..4) against one x, out[r] unscaled.
#if defined(TINYLLM_AVX512)
static inline void dot4_i8(const float* x, const int8_t* const* w, int64_t K, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w[0] + k)))), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w[1] + k)))), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w[2] + k)))), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w[3] + k)))), a3);
  }
  out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) out[r] += x[k] * static_cast<float>(w[r][k]);
}
#elif defined(TINYLLM_AVX2)

// eight int8 codes → eight floats (sign-extend to int32, then convert)
static inline __m256 i8x8_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

static inline void dot4_i8(const float* x, const int8_t* const* w, int64_t K, float* out) {
  // two accumulators per row (low and high 8 of each 16 codes): eight independent FMA chains hide the latency
  __m256 a[4], b[4];
  for (int r = 0; r < 4; ++r) a[r] = b[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < 4; ++r) {
      a[r] = _mm256_fmadd_ps(x0, i8x8_ps(_mm_loadl_epi64((const __m128i*)(w[r] + k))), a[r]);
      b[r] = _mm256_fmadd_ps(x1, i8x8_ps(_mm_loadl_epi64((const __m128i*)(w[r] + k + 8))), b[r]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    for (int r = 0; r < 4; ++r)
      a[r] = _mm256_fmadd_ps(x0, i8x8_ps(_mm_loadl_epi64((const __m128i*)(w[r] + k))), a[r]);
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum256(_mm256_add_ps(a[r], b[r]));
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) out[r] += x[k] * static_cast<float>(w[r][k]);
}
#else
static inline void dot4_i8(const float* x, const int8_t* const* w, int64_t K, float* out) {
  const int8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t k = 0; k < K; ++k) {
    const float xv = x[k];
    a0 += xv * static_cast<float>(w0[k]); a1 += xv * static_cast<float>(w1[k]);
    a2 += xv * static_cast<float>(w2[k]); a3 += xv * static_cast<float>(w3[k]);
  }
  out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
}
#endif

// ---------------------------------------------------------------- int4, group-wise, two codes per byte
// y[m, n] = Σ_g s[n, g] · Σ_{j ∈ g} x[m, j] · c[n, j] + z[n, g] · Σ_{j ∈ g} x[m, j]
// x is split into even and odd columns once, so the low nibbles of a byte run meet x_even and the high ones x_odd.
// Four rows at a time (every load of x serves four rows): out[r] = Σ_g s[r, g] · t[r, g] + z[r, g] · xs[g] with
// t[r, g] = Σ_j e[j]·lo(p_r[j]) + o[j]·hi(p_r[j]) over the group's `half` bytes; p[r], s[r], z[r] are row r's.
#if defined(TINYLLM_AVX512)
static inline void rows4_i4(const float* e, const float* o, const float* xs, const uint8_t* const* p, int64_t G,
                            int64_t half, const float* const* s, const float* const* z, float* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  float zsum[4] = {0.f, 0.f, 0.f, 0.f};
  const __m512i mask = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g) {
    __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = g * half; c < (g + 1) * half; c += 16) {
      const __m512 ev = _mm512_loadu_ps(e + c), ov = _mm512_loadu_ps(o + c);
      for (int r = 0; r < 4; ++r) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p[r] + c)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        t[r] = _mm512_fmadd_ps(ev, lo, _mm512_fmadd_ps(ov, hi, t[r]));
      }
    }
    for (int r = 0; r < 4; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r][g]), t[r], acc[r]);
      zsum[r] += z[r][g] * xs[g];
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + zsum[r];
}
#elif defined(TINYLLM_AVX2)
static inline void rows4_i4(const float* e, const float* o, const float* xs, const uint8_t* const* p, int64_t G,
                            int64_t half, const float* const* s, const float* const* z, float* out) {
  // per 8 bytes of a row: widen to 8 int32, low nibble = and 15, high = shift right 4, convert, FMA with the
  // even / odd x; low and high nibbles go to separate accumulators (eight FMA chains for four rows)
  __m256 acc[4];
  float zsum[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g) {
    __m256 a[4], b[4];
    for (int r = 0; r < 4; ++r) a[r] = b[r] = _mm256_setzero_ps();
    for (int64_t c = g * half; c < (g + 1) * half; c += 8) {
      const __m256 e0 = _mm256_loadu_ps(e + c), o0 = _mm256_loadu_ps(o + c);
      for (int r = 0; r < 4; ++r) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p[r] + c)));
        a[r] = _mm256_fmadd_ps(e0, _mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), a[r]);
        b[r] = _mm256_fmadd_ps(o0, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), b[r]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(s[r][g]), _mm256_add_ps(a[r], b[r]), acc[r]);
      zsum[r] += z[r][g] * xs[g];
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum256(acc[r]) + zsum[r];
}
#else
static inline void rows4_i4(const float* e, const float* o, const float* xs, const uint8_t* const* p, int64_t G,
                            int64_t half, const float* const* s, const float* const* z, float* out) {
  // decode a group's codes of the four rows to floats first (a plain u8 → f32 loop), then take float dot
  // products: two simple loops the compiler vectorises for the baseline ISA (~15% faster than one loop
  // mixing bytes, nibbles and four float reductions)
  thread_local std::vector<float> buf;
  buf.resize(8 * half);
  float* lo = buf.data();
  float* hi = lo + 4 * half;
  for (int r = 0; r < 4; ++r) out[r] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    for (int r = 0; r < 4; ++r) {
      const uint8_t* pr = p[r] + g * half;
      float* l = lo + r * half;
      float* h = hi + r * half;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) { l[j] = static_cast<float>(pr[j] & 15); h[j] = static_cast<float>(pr[j] >> 4); }
    }
    const float* eg = e + g * half;
    const float* og = o + g * half;
    for (int r = 0; r < 4; ++r) {
      const float* l = lo + r * half;
      const float* h = hi + r * half;
      float t = 0.f;
#pragma omp simd reduction(+ : t)
      for (int64_t j = 0; j < half; ++j) t += eg[j] * l[j] + og[j] * h[j];
      out[r] += s[r][g] * t + z[r][g] * xs[g];
    }
  }
}
#endif

// x as the int4 kernels read it: even and odd columns apart (the low and high nibbles of a byte), Σ x per group
struct XInt4 {
  std::vector<float> e, o, sum;
  int64_t group = 0;
  void prepare(const float* x, int64_t K, int64_t g) {
    if (group == g) return;
    TORCH_CHECK(group == 0, "matrices reading the same x must share one int4 group size");
    group = g;
    e.resize(K / 2); o.resize(K / 2); sum.resize(K / g);
    for (int64_t j = 0; j < K / 2; ++j) { e[j] = x[2 * j]; o[j] = x[2 * j + 1]; }
    for (int64_t b = 0; b < K / g; ++b) {
      float t = 0.f;
      for (int64_t j = 0; j < g; ++j) t += x[b * g + j];
      sum[b] = t;
    }
  }
};


// ---------------------------------------------------------------- GGUF blocks as stored: Q4_0, Q4_1, Q8_0
// y[m, n] = Σ_b Σ_{j<32} x[m, 32b + j] · w(block b of row n, j), straight from llama.cpp's 32-weight blocks
// (row n is the bytes [n·rb, (n+1)·rb) of `blocks`, rb = K/32 · block bytes):
//   Q4_0  [fp16 d][16 B nibbles]          w = d·(q − 8)
//   Q4_1  [fp16 d][fp16 m][16 B nibbles]  w = d·q + m       → Σ_j x_j w_j = d·Σ_j x_j q_j + m·Σ_j x_j
//   Q8_0  [fp16 d][32 × int8]             w = d·q
// byte j of the nibbles holds element j (low 4 bits) and element j + 16 (high 4 bits), so a block's codes
// meet x[32b .. 32b+15] and x[32b+16 .. 32b+31] without any shuffle. The codes become floats in registers
// only; x stays fp32 (llama.cpp rounds x to int8 instead), so the result is the dequantized matmul's up to
// summation order.
enum GgmlType : int64_t { kF32 = 0, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

static inline int64_t ggml_block_bytes(int64_t type) {
  return type == kQ4_0 ? 18 : type == kQ4_1 ? 20 : type == kQ8_0 ? 34 : 0;
}

static inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// four rows w[0..4) against one x; out[r] for r < 4. xs[b] = Σ x over block b (Q4_1).
template <int64_t T>
static void ggml_rows4(const float* x, const float* xs, const uint8_t* const* w, int64_t nb, float* out) {
  constexpr int64_t bytes = T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : 34;
  constexpr int64_t off = T == kQ4_1 ? 4 : 2;  // where the codes start
  float zsum[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(TINYLLM_AVX512)
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const __m512i mask = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
    for (int r = 0; r < 4; ++r) {
      const uint8_t* blk = w[r] + b * bytes;
      __m512 c0, c1;
      if constexpr (T == kQ8_0) {
        c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + off))));
        c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + off + 16))));
      } else {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + off)));
        __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_srli_epi32(v, 4);
        if constexpr (T == kQ4_0) { lo = _mm512_sub_epi32(lo, eight); hi = _mm512_sub_epi32(hi, eight); }
        c0 = _mm512_cvtepi32_ps(lo);
        c1 = _mm512_cvtepi32_ps(hi);
      }
      const __m512 t = _mm512_fmadd_ps(x0, c0, _mm512_mul_ps(x1, c1));
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(blk)), t, acc[r]);
      if constexpr (T == kQ4_1) zsum[r] += half_to_float(blk + 2) * xs[b];
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + zsum[r];
#elif defined(TINYLLM_AVX2)
  __m256 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8), x2 = _mm256_loadu_ps(xb + 16),
                 x3 = _mm256_loadu_ps(xb + 24);
    for (int r = 0; r < 4; ++r) {
      const uint8_t* blk = w[r] + b * bytes;
      __m256 c0, c1, c2, c3;  // elements 0–7, 8–15, 16–23, 24–31
      if constexpr (T == kQ8_0) {
        c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + off))));
        c1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + off + 8))));
        c2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + off + 16))));
        c3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + off + 24))));
      } else {
        const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + off)));
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + off + 8)));
        __m256i l0 = _mm256_and_si256(v0, mask), l1 = _mm256_and_si256(v1, mask);
        __m256i h0 = _mm256_srli_epi32(v0, 4), h1 = _mm256_srli_epi32(v1, 4);
        if constexpr (T == kQ4_0) {
          l0 = _mm256_sub_epi32(l0, eight); l1 = _mm256_sub_epi32(l1, eight);
          h0 = _mm256_sub_epi32(h0, eight); h1 = _mm256_sub_epi32(h1, eight);
        }
        c0 = _mm256_cvtepi32_ps(l0); c1 = _mm256_cvtepi32_ps(l1);
        c2 = _mm256_cvtepi32_ps(h0); c3 = _mm256_cvtepi32_ps(h1);
      }
      __m256 t = _mm256_mul_ps(x0, c0);
      t = _mm256_fmadd_ps(x1, c1, t);
      t = _mm256_fmadd_ps(x2, c2, t);
      t = _mm256_fmadd_ps(x3, c3, t);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(blk)), t, acc[r]);
      if constexpr (T == kQ4_1) zsum[r] += half_to_float(blk + 2) * xs[b];
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum256(acc[r]) + zsum[r];
#else
  // codes of one block to floats first, then a float dot product: two loops the compiler vectorises
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  float c[32];
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    for (int r = 0; r < 4; ++r) {
      const uint8_t* blk = w[r] + b * bytes;
      if constexpr (T == kQ8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + off);
        for (int j = 0; j < 32; ++j) c[j] = static_cast<float>(q[j]);
      } else {
        const uint8_t* q = blk + off;
        const int bias = T == kQ4_0 ? 8 : 0;
        for (int j = 0; j < 16; ++j) {
          c[j] = static_cast<float>((q[j] & 15) - bias);
          c[j + 16] = static_cast<float>((q[j] >> 4) - bias);
        }
      }
      float t = 0.f;
#pragma omp simd reduction(+ : t)
      for (int j = 0; j < 32; ++j) t += xb[j] * c[j];
      acc[r] += half_to_float(blk) * t;
      if constexpr (T == kQ4_1) zsum[r] += half_to_float(blk + 2) * xs[b];
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = acc[r] + zsum[r];
#endif
}

// ---------------------------------------------------------------- llama.cpp's arithmetic: x as int8 blocks
// A type id with kXQ8 set rounds x to int8 blocks of 32 first, as llama.cpp's CPU backend does (its "vec_dot
// type": Q8_0 for Q4_0/Q8_0 weights, Q8_1 for Q4_1): d = amax/127 kept as fp16, q = round-to-even(x · 127/amax),
// and for Q4_1 also s = d·Σq as fp16. A block's product is then an integer dot product (32 int8·int8 or
// uint4·int8 products summed exactly) scaled once by d_w·d_x (plus m_w·s_x for Q4_1) — a third of the
// instructions of turning every code into a float. The result is the dequantized matmul with x replaced by
// its int8 rounding (the reference in the tests), not the fp32 result: llama.cpp's logits, not transformers'.
constexpr int64_t kXQ8 = 256;
constexpr int64_t kOwnI8 = 1024, kOwnI4 = 1025;  // tinyllm's own int8 / int4 formats beside ggml's type ids

static inline float as_fp16(float v) { return static_cast<float>(c10::Half(v)); }

static void quantize_x_q8(const float* x, int64_t nb, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float dd = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * id));
      q[32 * b + j] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = as_fp16(dd);
    s[b] = as_fp16(dd * static_cast<float>(sum));
  }
}

// the integer code of element j of a weight block (Q4_0 centred on 8, Q4_1 unsigned, Q8_0 signed)
template <int64_t T>
static inline int ggml_code(const uint8_t* blk, int j) {
  if constexpr (T == kQ8_0) return reinterpret_cast<const int8_t*>(blk + 2)[j];
  const uint8_t byte = blk[(T == kQ4_1 ? 4 : 2) + (j & 15)];
  return (j < 16 ? byte & 15 : byte >> 4) - (T == kQ4_0 ? 8 : 0);
}

#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
// 16 bytes of nibbles → 32 bytes: elements 0–15 (low nibbles) then 16–31 (high nibbles)
static inline __m256i nibbles32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
}
#endif

template <int64_t T>
static void ggml_rows4_q8(const int8_t* xq, const float* xd, const float* xs, const uint8_t* const* w, int64_t nb,
                          float* out) {
  constexpr int64_t bytes = T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : 34;
  constexpr int64_t off = T == kQ4_1 ? 4 : 2;
  float zsum[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
  __m256 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * b));
    const float dx = xd[b];
    for (int r = 0; r < 4; ++r) {
      const uint8_t* blk = w[r] + b * bytes;
      __m256i p16;
      if constexpr (T == kQ4_1) {
        p16 = _mm256_maddubs_epi16(nibbles32(blk + off), xv);  // unsigned codes · signed x, pairs summed
      } else {
        const __m256i wv = T == kQ8_0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + off))
                                      : _mm256_sub_epi8(nibbles32(blk + off), _mm256_set1_epi8(8));
        // maddubs wants its first operand unsigned: |w| · (x with w's sign)
        p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
      }
      const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(blk) * dx), p, acc[r]);
      if constexpr (T == kQ4_1) zsum[r] += half_to_float(blk + 2) * xs[b];
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum256(acc[r]) + zsum[r];
#else
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xb = xq + 32 * b;
    for (int r = 0; r < 4; ++r) {
      const uint8_t* blk = w[r] + b * bytes;
      int dot = 0;
      for (int j = 0; j < 32; ++j) dot += ggml_code<T>(blk, j) * xb[j];
      acc[r] += half_to_float(blk) * xd[b] * static_cast<float>(dot);
      if constexpr (T == kQ4_1) zsum[r] += half_to_float(blk + 2) * xs[b];
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = acc[r] + zsum[r];
#endif
}

// x as the kernels of one weight format read it: the float vector; Σx per 32-block (Q4_1); for kXQ8 types x
// rounded to int8 blocks with their scales and sums; for own int4 (`group` columns per scale) x split into even and
// odd columns. Built once per x and shared by every matrix that reads it (each part at most once).
struct XBlocks {
  const float* x = nullptr;
  std::vector<float> xs;         // Σ x over each block (fp32 activations, Q4_1)
  std::vector<int8_t> q;         // int8 codes (kXQ8)
  std::vector<float> d, s;       // their scales and d·Σq (kXQ8)
  XInt4 i4;                      // own int4 formats
  void prepare(const float* xp, int64_t K, int64_t type, int64_t group = 0) {
    x = xp;
    const int64_t nb = K / 32;
    if (type == kOwnI4) {
      i4.prepare(xp, K, group);
    } else if (type & kXQ8) {
      if (!q.empty()) return;
      q.resize(K); d.resize(nb); s.resize(nb);
      quantize_x_q8(xp, nb, q.data(), d.data(), s.data());
    } else if (type == kQ4_1 && xs.empty()) {
      xs.resize(nb);
      for (int64_t b = 0; b < nb; ++b) {
        float t = 0.f;
        for (int j = 0; j < 32; ++j) t += xp[32 * b + j];
        xs[b] = t;
      }
    }
  }
};

// ---------------------------------------------------------------- fp32 weights: y[n] = Σ_k w[n, k] · x[k]
// The batch-1 fp32 path reads 4 bytes per weight: a stream over memory, four rows w[0..4) at a time. The AVX-512
// build uses the same 256-bit loads as the AVX2 one: on a 2-core AMD EPYC with AVX-512, 512-bit loads streamed
// fp32 rows from memory at 22.5-24.6 GB/s and 256-bit loads at 24.6-28.9 GB/s in the same build (one thread;
// arithmetic is not the limit here), so both builds also give bit-identical fp32 products.
static inline void dot4_f32(const float* x, const float* const* w, int64_t K, float* out) {
  int64_t k = 0;
#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
  __m256 a[4], b[4];
  for (int r = 0; r < 4; ++r) a[r] = b[r] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < 4; ++r) {
      a[r] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w[r] + k), a[r]);
      b[r] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w[r] + k + 8), b[r]);
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum256(_mm256_add_ps(a[r], b[r]));
#else
  const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t j = 0; j < K; ++j) {
    a0 += x[j] * w0[j]; a1 += x[j] * w1[j]; a2 += x[j] * w2[j]; a3 += x[j] * w3[j];
  }
  out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
  k = K;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) out[r] += x[k] * w[r][k];
}

// Four weight rows against R rows of x at once (x[j] for j < R), out[j][0..4): each weight load serves R rows of
// x, where R calls of `dot4_f32` would load it R times — a few rows of x (a speculative verification, a small
// decode batch) stay bound by the weight stream instead of by loads. Every (weight row, x row) pair is summed
// exactly as `dot4_f32` sums it (even and odd 8-column chunks apart, then the tail), so the products are
// bit-identical to R single-row calls. The AVX-512 build holds R = 3 in its 32 registers; AVX2 keeps R = 1.
#if defined(TINYLLM_AVX512)
constexpr int kF32RowBlock = 3;
#else
constexpr int kF32RowBlock = 1;
#endif
#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
template <int R>
static inline void dot4_f32_rows(const float* const* x, const float* const* w, int64_t K, float (*out)[4]) {
  __m256 a[R][4], b[R][4];
  for (int j = 0; j < R; ++j)
    for (int r = 0; r < 4; ++r) a[j][r] = b[j][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm256_loadu_ps(w[r] + k);
    for (int j = 0; j < R; ++j) {
      const __m256 xv = _mm256_loadu_ps(x[j] + k);
      for (int r = 0; r < 4; ++r) a[j][r] = _mm256_fmadd_ps(xv, wv[r], a[j][r]);
    }
    for (int r = 0; r < 4; ++r) wv[r] = _mm256_loadu_ps(w[r] + k + 8);
    for (int j = 0; j < R; ++j) {
      const __m256 xv = _mm256_loadu_ps(x[j] + k + 8);
      for (int r = 0; r < 4; ++r) b[j][r] = _mm256_fmadd_ps(xv, wv[r], b[j][r]);
    }
  }
  for (int j = 0; j < R; ++j)
    for (int r = 0; r < 4; ++r) out[j][r] = hsum256(_mm256_add_ps(a[j][r], b[j][r]));
  for (; k < K; ++k)
    for (int j = 0; j < R; ++j)
      for (int r = 0; r < 4; ++r) out[j][r] += x[j][k] * w[r][k];
}
#endif

// ---------------------------------------------------------------- y = W x for any weight format
// fp32 (kF32, ggml's F32 id), GGUF blocks (a ggml type id, kXQ8 set: x as int8 blocks), and tinyllm's own
// weight-only formats (`QuantLinear`, kOwnI8 / kOwnI4): int8 per row (q [N, K], scale [N]) and int4 per group
// (packed [N, K/2], scale and zero [N, K/group]).

struct MvJob {
  int64_t type;  // kF32, a ggml type id (kXQ8 allowed), kOwnI8 or kOwnI4
  const at::Tensor* w;
  float* y;  // y for row m of x at y + m·N
  const at::Tensor* s = nullptr;  // own formats: scales
  const at::Tensor* z = nullptr;  // kOwnI4: zeros
};

template <int64_t T>
static void ggml_rows4_x(const XBlocks& x, bool xq8, const uint8_t* const* w, int64_t nb, float* out) {
  if (xq8) ggml_rows4_q8<T>(x.q.data(), x.d.data(), x.s.data(), w, nb, out);
  else ggml_rows4<T>(x.x, x.xs.data(), w, nb, out);
}

// rows r[0..4) of job m's matrix times x → out[0..4)
static void rows4_of(const MvJob& m, const XBlocks& x, int64_t K, const int64_t* r, float* out) {
  if (m.type == kF32) {
    const float* wp = m.w->data_ptr<float>();
    const float* w[4] = {wp + r[0] * K, wp + r[1] * K, wp + r[2] * K, wp + r[3] * K};
    dot4_f32(x.x, w, K, out);
  } else if (m.type == kOwnI8) {
    const int8_t* qp = m.w->data_ptr<int8_t>();
    const int8_t* w[4] = {qp + r[0] * K, qp + r[1] * K, qp + r[2] * K, qp + r[3] * K};
    dot4_i8(x.x, w, K, out);
    const float* sp = m.s->data_ptr<float>();
    for (int i = 0; i < 4; ++i) out[i] *= sp[r[i]];
  } else if (m.type == kOwnI4) {
    const int64_t Kh = K / 2, G = m.s->size(1);
    const uint8_t* pp = m.w->data_ptr<uint8_t>();
    const float* sp = m.s->data_ptr<float>();
    const float* zp = m.z->data_ptr<float>();
    const uint8_t* p[4] = {pp + r[0] * Kh, pp + r[1] * Kh, pp + r[2] * Kh, pp + r[3] * Kh};
    const float* s[4] = {sp + r[0] * G, sp + r[1] * G, sp + r[2] * G, sp + r[3] * G};
    const float* z[4] = {zp + r[0] * G, zp + r[1] * G, zp + r[2] * G, zp + r[3] * G};
    rows4_i4(x.i4.e.data(), x.i4.o.data(), x.i4.sum.data(), p, G, x.i4.group / 2, s, z, out);
  } else {
    const bool xq8 = (m.type & kXQ8) != 0;
    const int64_t t = m.type & ~kXQ8, nb = K / 32, rb = nb * ggml_block_bytes(t);
    const uint8_t* wp = m.w->data_ptr<uint8_t>();
    const uint8_t* w[4] = {wp + r[0] * rb, wp + r[1] * rb, wp + r[2] * rb, wp + r[3] * rb};
    if (t == kQ4_0) ggml_rows4_x<kQ4_0>(x, xq8, w, nb, out);
    else if (t == kQ4_1) ggml_rows4_x<kQ4_1>(x, xq8, w, nb, out);
    else ggml_rows4_x<kQ8_0>(x, xq8, w, nb, out);
  }
}

// y = W x for up to three matrices that read the same M rows of x (q, k, v; gate, up; or one matrix), as one
// parallel loop over all their rows: one hand-off to the threads instead of one per matrix, and k and v (a third
// of q's rows each under GQA) do not split into slivers. Each thread's rows of each matrix are read as four
// streams, and each step's four weight rows meet every row of x while they are in L1.
static void mv_group(const float* x, int64_t M, int64_t K, std::initializer_list<MvJob> jobs) {
  const MvJob* job = jobs.begin();
  const int64_t n = static_cast<int64_t>(jobs.size());
  TORCH_CHECK(n <= 3, "at most three matrices per group");
  int64_t first[4] = {0, 0, 0, 0};  // job j owns rows [first[j], first[j + 1])
  std::vector<XBlocks> xb(M);
  for (int64_t j = 0; j < n; ++j) {
    first[j + 1] = first[j] + job[j].w->size(0);
    const int64_t group = job[j].type == kOwnI4 ? K / job[j].s->size(1) : 0;
    for (int64_t i = 0; i < M; ++i) xb[i].prepare(x + i * K, K, job[j].type, group);
  }
  at::parallel_for(0, first[n], 64, [&](int64_t begin, int64_t end) {
    float out[4];
    for (int64_t j = 0; j < n; ++j) {
      const int64_t a = std::max(begin, first[j]), b = std::min(end, first[j + 1]), N = job[j].w->size(0);
      if (a >= b) continue;
      four_streams(a - first[j], b - first[j], [&](const int64_t* r, int count) {
        int64_t i = 0;
#if defined(TINYLLM_AVX512) || defined(TINYLLM_AVX2)
        if (job[j].type == kF32 && kF32RowBlock > 1) {  // several rows of x per weight load
          const float* wp = job[j].w->data_ptr<float>();
          const float* w[4] = {wp + r[0] * K, wp + r[1] * K, wp + r[2] * K, wp + r[3] * K};
          auto block = [&](auto rows) {  // rows of x i..i+R against the four weight rows
            constexpr int R = decltype(rows)::value;
            const float* xs[R];
            float outs[R][4];
            for (int q = 0; q < R; ++q) xs[q] = x + (i + q) * K;
            dot4_f32_rows<R>(xs, w, K, outs);
            for (int q = 0; q < R; ++q)
              for (int c = 0; c < count; ++c) job[j].y[(i + q) * N + r[c]] = outs[q][c];
            i += R;
          };
          while (i + kF32RowBlock <= M) block(std::integral_constant<int, kF32RowBlock>());
          if (i + 2 <= M) block(std::integral_constant<int, 2>());  // a remainder of two rows
        }
#endif
        for (; i < M; ++i) {
          rows4_of(job[j], xb[i], K, r, out);
          for (int c = 0; c < count; ++c) job[j].y[i * N + r[c]] = out[c];
        }
      });
    }
  });
}

at::Tensor wo_int8(at::Tensor x, at::Tensor q, at::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == x.size(1), "q must be int8 [N, K]");
  x = x.contiguous(); q = q.contiguous(); scale = scale.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(scale.numel() == N, "scale must have one entry per weight row");
  auto y = at::empty({M, N}, x.options());
  mv_group(x.data_ptr<float>(), M, K, {{kOwnI8, &q, y.data_ptr<float>(), &scale}});
  return y;
}

at::Tensor wo_int4(at::Tensor x, at::Tensor packed, at::Tensor scale, at::Tensor zero, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, Kp]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 2 == x.size(1),
              "packed must be uint8 [N, Kp/2]");
  x = x.contiguous(); packed = packed.contiguous();
  scale = scale.contiguous().to(at::kFloat); zero = zero.contiguous().to(at::kFloat);
  TORCH_CHECK(group > 0, "group must be positive, got ", group);
  const int64_t M = x.size(0), Kp = x.size(1), N = packed.size(0), G = Kp / group, half = group / 2;
  TORCH_CHECK(G * group == Kp && scale.numel() == N * G && zero.numel() == N * G && half % 16 == 0,
              "group layout disagrees (group % 32 == 0, scale and zero [N, Kp/group]), group=", group);
  scale = scale.view({N, G}); zero = zero.view({N, G});
  auto y = at::empty({M, N}, x.options());
  mv_group(x.data_ptr<float>(), M, Kp, {{kOwnI4, &packed, y.data_ptr<float>(), &scale, &zero}});
  return y;
}

at::Tensor ggml_matvec(at::Tensor x, at::Tensor blocks, int64_t type) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  const int64_t bytes = ggml_block_bytes(type & ~kXQ8);
  TORCH_CHECK(bytes > 0, "ggml type ", type, " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8), optionally + ", kXQ8);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32 (the block size), got ", K);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.size(1) == K / 32 * bytes,
              "blocks must be uint8 [N, K/32 * ", bytes, "]");
  x = x.contiguous(); blocks = blocks.contiguous();
  auto y = at::empty({M, blocks.size(0)}, x.options());
  mv_group(x.data_ptr<float>(), M, K, {{type, &blocks, y.data_ptr<float>()}});
  return y;
}

// y[m] = W x[m] for the M rows of x. For a few rows (a short prompt's prefill, a small decode batch, a speculative
// verification) this streams the weights at the matvec's rate, where torch's GEMM measured 5–9 GB/s for M ≤ 16
// on 2-core EPYCs (it repacks the weight on every call). Row m is bit-identical to the matvec of x[m].
at::Tensor f32_matvec(at::Tensor x, at::Tensor w) {
  TORCH_CHECK((x.dim() == 1 || x.dim() == 2) && x.scalar_type() == at::kFloat, "x must be float32 [K] or [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(1) == x.size(-1),
              "w must be float32 [N, K] with K = x's last dimension");
  x = x.contiguous(); w = w.contiguous();
  const int64_t M = x.dim() == 2 ? x.size(0) : 1, N = w.size(0);
  auto y = x.dim() == 2 ? at::empty({M, N}, x.options()) : at::empty({N}, x.options());
  mv_group(x.data_ptr<float>(), M, w.size(1), {{kF32, &w, y.data_ptr<float>()}});
  return y;
}

static void rms_norm(const float* x, const float* w, float eps, float* y, int64_t d) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) y[i] = w[i] * (x[i] * r);
}

static void rope_heads(float* a, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  float tmp[1024];
  for (int64_t h = 0; h < heads; ++h) {
    float* p = a + h * D;
    for (int64_t i = 0; i < D; ++i) tmp[i] = p[i] * cos[i] + p[i < half ? i + half : i - half] * sin[i];
    std::copy(tmp, tmp + D, p);
  }
}

// ---------------------------------------------------------------- one decoder layer of a batch-1 decode step
// The whole pre-norm LLaMA layer for one token, weights as GGUF blocks (any of Q4_0/Q4_1/Q8_0 per matrix), plain
// fp32 [N, K] matrices or tinyllm's own int8/int4, in one call: at batch 1 the torch path spends as long on ~25
// op dispatches per layer as on the weights.
//   y = rms(x)·ln1;  q, k, v = Wq y, Wk y, Wv y;  rope(q), rope(k) (rotate-half, cos/sin of this position, sin
//   signed as [−sin₁, sin₂]);  k, v → pool slot of `pos`;  a = paged attention over tokens 0..pos;
//   x += Wo a;  y = rms(x)·ln2;  x += Wd (silu(Wg y) ⊙ Wu y)
// The torch twin is FusedForward over the same modules (same matrix-vector kernels); matrices that read the same
// x run as one `mv_group`, and each row is computed exactly as a lone matvec computes it.

// One layer's checked weights: the tensors (held), their types, and per projection where its codes, scales and
// zeros sit in `w`.
struct LayerWeights {
  std::vector<at::Tensor> w;
  int64_t types[7];
  const at::Tensor* W[7];
  const at::Tensor* S[7];
  const at::Tensor* Z[7];
  at::Tensor ln1, ln2;
  float eps1, eps2;
  int64_t I;  // the MLP's width
};

// Checks the seven projections (q, k, v, o, gate, up, down) against a layer of width d with H query heads and Hkv
// key/value heads of size D. `w` holds each matrix's tensors in order: one (fp32, ggml blocks), two (kOwnI8: q,
// scale) or three (kOwnI4: packed, scale, zero).
static LayerWeights check_layer(std::vector<at::Tensor> w, const std::vector<int64_t>& types, at::Tensor ln1,
                                at::Tensor ln2, double eps1, double eps2, int64_t d, int64_t H, int64_t Hkv,
                                int64_t D) {
  TORCH_CHECK(types.size() == 7, "seven weights (q, k, v, o, gate, up, down) and their types");
  auto tensors_of = [](int64_t t) -> size_t { return t == kOwnI4 ? 3 : t == kOwnI8 ? 2 : 1; };
  size_t gate_at = 0;
  for (int i = 0; i < 4; ++i) gate_at += tensors_of(types[i]);
  TORCH_CHECK(gate_at < w.size() && w[gate_at].dim() == 2, "too few weight tensors for the types given");
  LayerWeights L;
  L.w = std::move(w);
  L.I = L.w[gate_at].size(0);
  const int64_t I = L.I;
  const int64_t K[7] = {d, d, d, H * D, d, d, I};
  const int64_t Nexp[7] = {H * D, Hkv * D, Hkv * D, d, I, I, d};
  size_t at_w = 0;
  for (int i = 0; i < 7; ++i) {
    const size_t need = tensors_of(types[i]);
    TORCH_CHECK(at_w + need <= L.w.size(), "too few weight tensors for the types given");
    L.types[i] = types[i];
    L.W[i] = &L.w[at_w];
    L.S[i] = need > 1 ? &L.w[at_w + 1] : nullptr;
    L.Z[i] = need > 2 ? &L.w[at_w + 2] : nullptr;
    at_w += need;
    const at::Tensor& wi = *L.W[i];
    if (types[i] == kF32) {
      TORCH_CHECK(wi.scalar_type() == at::kFloat && wi.is_contiguous() && wi.dim() == 2 &&
                      wi.size(0) == Nexp[i] && wi.size(1) == K[i],
                  "weight ", i, " (fp32) must be a contiguous float32 [", Nexp[i], ", ", K[i], "] matrix");
      continue;
    }
    if (types[i] == kOwnI8) {
      const at::Tensor& s = *L.S[i];
      TORCH_CHECK(wi.scalar_type() == at::kChar && wi.is_contiguous() && wi.dim() == 2 && wi.size(0) == Nexp[i] &&
                      wi.size(1) == K[i] && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                      s.numel() == Nexp[i],
                  "weight ", i, " (int8) must be contiguous int8 [", Nexp[i], ", ", K[i], "] with float32 scales [",
                  Nexp[i], "]");
      continue;
    }
    if (types[i] == kOwnI4) {
      const at::Tensor &s = *L.S[i], &z = *L.Z[i];
      const int64_t G = s.dim() == 2 ? s.size(1) : 0;
      TORCH_CHECK(wi.scalar_type() == at::kByte && wi.is_contiguous() && wi.dim() == 2 && wi.size(0) == Nexp[i] &&
                      2 * wi.size(1) == K[i] && G > 0 && K[i] % G == 0 && (K[i] / G) % 32 == 0 &&
                      s.scalar_type() == at::kFloat && s.is_contiguous() && s.size(0) == Nexp[i] &&
                      z.scalar_type() == at::kFloat && z.is_contiguous() && z.sizes() == s.sizes(),
                  "weight ", i, " (int4) must be contiguous uint8 [", Nexp[i], ", ", K[i] / 2,
                  "] with float32 scales and zeros [", Nexp[i], ", K/group], group a multiple of 32");
      continue;
    }
    const int64_t bytes = ggml_block_bytes(types[i] & ~kXQ8);
    TORCH_CHECK(bytes > 0 && wi.scalar_type() == at::kByte && wi.is_contiguous() && wi.dim() == 2 &&
                    K[i] % 32 == 0 && wi.size(0) == Nexp[i] && wi.size(1) == K[i] / 32 * bytes,
                "weight ", i, " does not match its ggml type and the layer's shapes");
  }
  TORCH_CHECK(at_w == L.w.size(), "more weight tensors than the types use");
  TORCH_CHECK(ln1.numel() == d && ln2.numel() == d, "norm weights must have ", d, " entries");
  L.ln1 = ln1.contiguous().to(at::kFloat);
  L.ln2 = ln2.contiguous().to(at::kFloat);
  L.eps1 = static_cast<float>(eps1);
  L.eps2 = static_cast<float>(eps2);
  return L;
}

// Where one step writes and reads: R rows (tokens), each with its position, rotary row and block table (rows of
// one sequence share a table; their positions are consecutive), and the pool layer geometry.
struct StepAt {
  int64_t R, NB, B, Hkv, D, H, nbmax, window;
  const float *cos, *sin;  // [R, D]
  const int64_t* tables;   // [R, nbmax]
  const int64_t* pos;      // [R]
  float scale;
};

// The layer for R rows at once: each row's products are computed exactly as for a lone row (`mv_group`), every
// row's K/V is written before any row attends, and row r attends over positions 0..pos[r] of its table — so R
// consecutive tokens of one sequence give what R single-token steps give, bit for bit.
static void run_layer(const LayerWeights& L, float* xp, int64_t d, float* kvp, const StepAt& at) {
  const int64_t R = at.R, H = at.H, Hkv = at.Hkv, D = at.D, I = L.I, B = at.B, NB = at.NB;
  thread_local std::vector<float> buf;
  thread_local std::vector<int64_t> lens;
  buf.resize(R * (2 * d + (H + 2 * Hkv) * D + H * D + 2 * I));
  lens.resize(R);
  float* y = buf.data();
  float* t = y + R * d;
  float* q = t + R * d;
  float* k = q + R * H * D;
  float* v = k + R * Hkv * D;
  float* att = v + R * Hkv * D;
  float* g = att + R * H * D;
  float* u = g + R * I;
  const int64_t* ty = L.types;
  for (int64_t r = 0; r < R; ++r) rms_norm(xp + r * d, L.ln1.data_ptr<float>(), L.eps1, y + r * d, d);
  mv_group(y, R, d, {{ty[0], L.W[0], q, L.S[0], L.Z[0]}, {ty[1], L.W[1], k, L.S[1], L.Z[1]},
                     {ty[2], L.W[2], v, L.S[2], L.Z[2]}});
  for (int64_t r = 0; r < R; ++r) {
    rope_heads(q + r * H * D, H, D, at.cos + r * D, at.sin + r * D);
    rope_heads(k + r * Hkv * D, Hkv, D, at.cos + r * D, at.sin + r * D);
    const int64_t p = at.pos[r], block = at.tables[r * at.nbmax + p / B];
    TORCH_CHECK(block >= 0 && block < NB, "block ", block, " is outside the pool");
    const int64_t slot = block * B + p % B;
    std::copy(k + r * Hkv * D, k + (r + 1) * Hkv * D, kvp + slot * Hkv * D);
    std::copy(v + r * Hkv * D, v + (r + 1) * Hkv * D, kvp + (NB * B + slot) * Hkv * D);
    lens[r] = p + 1;
  }
  decode<float>(q, kvp, at.tables, lens.data(), att, R, H, Hkv, D, NB, B, at.nbmax, at.scale, at.window);
  mv_group(att, R, H * D, {{ty[3], L.W[3], t, L.S[3], L.Z[3]}});
  for (int64_t i = 0; i < R * d; ++i) xp[i] += t[i];
  for (int64_t r = 0; r < R; ++r) rms_norm(xp + r * d, L.ln2.data_ptr<float>(), L.eps2, y + r * d, d);
  mv_group(y, R, d, {{ty[4], L.W[4], g, L.S[4], L.Z[4]}, {ty[5], L.W[5], u, L.S[5], L.Z[5]}});
  for (int64_t i = 0; i < R * I; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  mv_group(g, R, I, {{ty[6], L.W[6], t, L.S[6], L.Z[6]}});
  for (int64_t i = 0; i < R * d; ++i) xp[i] += t[i];
}

// x [R, d] (or [d]: one row), cos/sin [R, D], one pool layer kv [2, NB, B, Hkv, D] (or the whole pool
// [L, 2, NB, B, Hkv, D]), tables [R, nbmax] (or [nbmax]) and positions [R] int64
static StepAt check_step(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv,
                         const at::Tensor& tables, const at::Tensor& pos, double scale, int64_t H,
                         int64_t window) {
  TORCH_CHECK((x.dim() == 1 || x.dim() == 2) && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be contiguous float32 [d] or [rows, d]");
  const int64_t R = x.dim() == 2 ? x.size(0) : 1;
  const int64_t r = kv.dim() - 5;
  TORCH_CHECK((r == 0 || r == 1) && kv.size(r) == 2 && kv.scalar_type() == at::kFloat && kv.is_contiguous(),
              "kv must be a contiguous float32 pool layer [2, blocks, B, Hkv, D] or pool [layers, 2, ...]");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.is_contiguous() && tables.numel() > 0 &&
                  (tables.dim() == 1 ? R == 1 : tables.dim() == 2 && tables.size(0) == R),
              "tables must be contiguous int64 [rows, blocks] with one row per row of x");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == R,
              "positions must be contiguous int64 with one entry per row of x");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(), "cos and sin must be contiguous float32");
  StepAt at;
  at.R = R; at.NB = kv.size(r + 1); at.B = kv.size(r + 2); at.Hkv = kv.size(r + 3); at.D = kv.size(r + 4); at.H = H;
  TORCH_CHECK(at.D <= 1024 && at.D % 2 == 0 && H % at.Hkv == 0 && cos.numel() == R * at.D &&
                  sin.numel() == R * at.D, "head shapes (cos and sin must be [rows, D])");
  at.nbmax = tables.numel() / R;
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] / at.B < at.nbmax, "position ", pp[i], " is past the block table");
  at.window = window; at.scale = static_cast<float>(scale);
  at.cos = cos.data_ptr<float>(); at.sin = sin.data_ptr<float>(); at.tables = tables.data_ptr<int64_t>();
  at.pos = pp;
  return at;
}

void decode_layer(at::Tensor x, at::Tensor ln1, at::Tensor ln2, double eps1, double eps2, std::vector<at::Tensor> w,
                  std::vector<int64_t> types, at::Tensor cos, at::Tensor sin, at::Tensor kv, at::Tensor table,
                  int64_t pos, double scale, int64_t H, int64_t window) {
  cos = cos.contiguous().to(at::kFloat); sin = sin.contiguous().to(at::kFloat);
  TORCH_CHECK(x.dim() == 1, "x must be contiguous float32 [d]");
  const at::Tensor p = at::full({1}, pos, at::TensorOptions().dtype(at::kLong));
  const StepAt at = check_step(x, cos, sin, kv, table, p, scale, H, window);
  TORCH_CHECK(kv.dim() == 5, "kv must be one pool layer [2, blocks, B, Hkv, D]");
  const LayerWeights L = check_layer(std::move(w), types, ln1, ln2, eps1, eps2, x.size(0), H, at.Hkv, at.D);
  run_layer(L, x.data_ptr<float>(), x.size(0), kv.data_ptr<float>(), at);
}

// ---------------------------------------------------------------- a decode plan: every layer in one call
// `decode_layer` per layer costs a Python → dispatcher → C++ crossing and a check of seven weights each time;
// measured on SmolLM2-135M fp32 at 2 threads that was ~2 ms of a 25 ms step (30 crossings, each starting with
// caches the previous layer's weights had flushed). A plan checks and holds every layer's weights once; a step
// is then one call that runs the layers in order, each exactly as `decode_layer` runs it.
struct DecodePlan {
  std::vector<LayerWeights> layers;
  int64_t d, H, Hkv, D;
};

static std::mutex plans_lock;
static std::unordered_map<int64_t, std::shared_ptr<const DecodePlan>> plans;
static int64_t next_plan = 1;

// weights and types: every layer's `decode_layer` lists, concatenated; norms: ln1, ln2 per layer; eps likewise
int64_t decode_plan_new(std::vector<at::Tensor> w, std::vector<int64_t> types, std::vector<at::Tensor> norms,
                        std::vector<double> eps, int64_t H, int64_t Hkv, int64_t D) {
  const int64_t n = static_cast<int64_t>(norms.size()) / 2;
  TORCH_CHECK(n > 0 && norms.size() == 2 * static_cast<size_t>(n) && eps.size() == norms.size() &&
                  types.size() == 7 * static_cast<size_t>(n),
              "a plan takes 7 types, 2 norms and 2 eps per layer: got ", types.size(), " types, ", norms.size(),
              " norms, ", eps.size(), " eps");
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0 && D <= 1024 && D % 2 == 0, "head shapes");
  auto plan = std::make_shared<DecodePlan>();
  plan->d = norms[0].numel(); plan->H = H; plan->Hkv = Hkv; plan->D = D;
  auto tensors_of = [](int64_t t) -> size_t { return t == kOwnI4 ? 3 : t == kOwnI8 ? 2 : 1; };
  size_t at_w = 0;
  for (int64_t l = 0; l < n; ++l) {
    std::vector<int64_t> ty(types.begin() + 7 * l, types.begin() + 7 * (l + 1));
    size_t need = 0;
    for (int64_t t : ty) need += tensors_of(t);
    TORCH_CHECK(at_w + need <= w.size(), "layer ", l, ": too few weight tensors for the types given");
    std::vector<at::Tensor> wl(w.begin() + at_w, w.begin() + at_w + need);
    at_w += need;
    plan->layers.push_back(check_layer(std::move(wl), ty, norms[2 * l], norms[2 * l + 1], eps[2 * l],
                                       eps[2 * l + 1], plan->d, H, Hkv, D));
  }
  TORCH_CHECK(at_w == w.size(), "more weight tensors than the types use");
  std::lock_guard<std::mutex> g(plans_lock);
  plans[next_plan] = std::move(plan);
  return next_plan++;
}

void decode_plan_free(int64_t id) {
  std::lock_guard<std::mutex> g(plans_lock);
  plans.erase(id);
}

int64_t decode_plan_count() {
  std::lock_guard<std::mutex> g(plans_lock);
  return static_cast<int64_t>(plans.size());
}

// every layer of the plan on x [R, d] (or [d]) in place; kv is the whole pool [layers, 2, NB, B, Hkv, D]; row r
// is the token at positions[r] of the sequence whose block table is tables[r]
void decode_plan_run(int64_t id, at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor kv, at::Tensor tables,
                     at::Tensor positions, double scale, int64_t window) {
  std::shared_ptr<const DecodePlan> plan;
  {
    std::lock_guard<std::mutex> g(plans_lock);
    auto it = plans.find(id);
    TORCH_CHECK(it != plans.end(), "no decode plan ", id, " (freed, or made by another build)");
    plan = it->second;
  }
  const StepAt at = check_step(x, cos, sin, kv, tables, positions, scale, plan->H, window);
  const int64_t n = static_cast<int64_t>(plan->layers.size());
  TORCH_CHECK(kv.dim() == 6 && kv.size(0) == n && at.Hkv == plan->Hkv && at.D == plan->D &&
                  x.size(x.dim() - 1) == plan->d,
              "kv must be the pool [", n, ", 2, blocks, B, ", plan->Hkv, ", ", plan->D, "] and x [rows, ", plan->d,
              "]");
  float* kvp = kv.data_ptr<float>();
  const int64_t stride = kv.stride(0);
  for (int64_t l = 0; l < n; ++l) run_layer(plan->layers[l], x.data_ptr<float>(), plan->d, kvp + l * stride, at);
}

}  // namespace

// TORCH_LIBRARY pastes its first argument, so a -D name needs one macro level to be expanded first
#define TINYLLM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
TINYLLM_LIBRARY(TINYLLM_NS, m) {
  m.def("compiled_isa", &compiled_isa);
  m.def("paged_decode", &paged_decode);
  m.def("wo_int8", &wo_int8);
  m.def("wo_int4", &wo_int4);
  m.def("ggml_matvec", &ggml_matvec);
  m.def("decode_layer", &decode_layer);
  m.def("decode_plan_new", &decode_plan_new);
  m.def("decode_plan_run", &decode_plan_run);
  m.def("decode_plan_free", &decode_plan_free);
  m.def("decode_plan_count", &decode_plan_count);
  m.def("f32_matvec", &f32_matvec);
}
