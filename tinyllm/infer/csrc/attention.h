// Paged decode attention: one query token per row against the block pool.
// Part of cpu_kernels.cpp's one translation unit (included there, in this order).
#pragma once

namespace {

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

}  // namespace
