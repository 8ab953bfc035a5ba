// tinyllm's native CPU kernels: paged decode attention and weight-only int8/int4 matrix-vector products.
// The concepts and the Python side live in cpu_kernels.py. One source, three builds chosen by compiler flags:
//   -mavx512f -mavx512bw -mavx512vl -mfma   AVX-512 intrinsics (16-wide fp32 FMA)
//   -mavx2 -mfma -mf16c                      AVX2 intrinsics (8-wide fp32 FMA)
//   no -m flags                              plain loops the compiler vectorises for the baseline ISA
// TINYLLM_NS (a -D define) names the op namespace, so every build can be loaded side by side in one process.
// This file registers the ops; the kernels live in csrc/*.h beside it.
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

// the kernels, one concept per header (one translation unit, so every build still compiles a single file)
#include "csrc/common.h"
#include "csrc/attention.h"
#include "csrc/weight_formats.h"
#include "csrc/ggml_blocks.h"
#include "csrc/matvec.h"
#include "csrc/decode_layer.h"

// TORCH_LIBRARY pastes its first argument, so a -D name needs one macro level to be expanded first
#define TINYLLM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
TINYLLM_LIBRARY(TINYLLM_NS, m) {
  m.def("compiled_isa", &compiled_isa);
  m.def("paged_decode", &paged_decode);
  m.def("wo_int8", &wo_int8);
  m.def("wo_int4", &wo_int4);
  m.def("ggml_matvec", &ggml_matvec);
  m.def("ggml_dequantize", &ggml_dequantize);
  m.def("decode_layer", &decode_layer);
  m.def("decode_plan_new", &decode_plan_new);
  m.def("decode_plan_run", &decode_plan_run);
  m.def("decode_plan_free", &decode_plan_free);
  m.def("decode_plan_count", &decode_plan_count);
  m.def("f32_matvec", &f32_matvec);
}
