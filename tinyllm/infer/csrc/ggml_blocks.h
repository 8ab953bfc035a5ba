// GGUF blocks as stored (Q4_0, Q4_1, Q8_0), with x in fp32 or rounded to int8 blocks as llama.cpp does; the
// per-row preparation of x for every format.
// Part of cpu_kernels.cpp's one translation unit (included there, in this order).
#pragma once

namespace {

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

}  // namespace
