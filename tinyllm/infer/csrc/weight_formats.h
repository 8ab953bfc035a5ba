// Four weight rows against x: the four-stream row order, int8 and int4 (own formats), fp32.
// Part of cpu_kernels.cpp's one translation unit (included there, in this order).
#pragma once

namespace {

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

}  // namespace
