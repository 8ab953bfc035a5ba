// y = W x for any weight format: the parallel loop over rows (`mv_group`) and the matrix-vector ops.
// Part of cpu_kernels.cpp's one translation unit (included there, in this order).
#pragma once

namespace {

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

// ŵ [N, K] fp32 from the blocks [N, K/32 · block bytes] of a ggml type: what `model.gguf.dequantize` computes,
// value for value (d·q and d·q + m rounded as numpy rounds them: two steps, no fused multiply-add), for the
// compute-bound products of a long prefill, where dequantize + GEMM beats the block kernels.
__attribute__((optimize("fp-contract=off"))) at::Tensor ggml_dequantize(at::Tensor blocks, int64_t type) {
  const int64_t bytes = ggml_block_bytes(type);
  TORCH_CHECK(bytes > 0, "ggml type ", type, " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.size(1) % bytes == 0,
              "blocks must be uint8 [N, K/32 * ", bytes, "]");
  blocks = blocks.contiguous();
  const int64_t N = blocks.size(0), nb = blocks.size(1) / bytes, K = 32 * nb;
  auto w = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  float* dst = w.data_ptr<float>();
  at::parallel_for(0, N * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* blk = src + i * bytes;
      float* out = dst + i * 32;
      const float d = half_to_float(blk);
      if (type == kQ8_0) {
        for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
      } else if (type == kQ4_0) {
        for (int j = 0; j < 16; ++j) {
          out[j] = d * static_cast<float>((blk[2 + j] & 15) - 8);
          out[j + 16] = d * static_cast<float>((blk[2 + j] >> 4) - 8);
        }
      } else {
        const float m = half_to_float(blk + 2);
        for (int j = 0; j < 16; ++j) {
          const float lo = d * static_cast<float>(blk[4 + j] & 15), hi = d * static_cast<float>(blk[4 + j] >> 4);
          out[j] = lo + m;
          out[j + 16] = hi + m;
        }
      }
    }
  });
  return w;
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

}  // namespace
