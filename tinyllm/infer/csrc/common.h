// Shared helpers of the native kernels: the horizontal sum of a register, and which code path this build has.
// Part of cpu_kernels.cpp's one translation unit (included there, in this order).
#pragma once

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

}  // namespace
