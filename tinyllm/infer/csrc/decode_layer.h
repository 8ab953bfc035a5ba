// A decoder layer for R rows in native code, and the decode plan that runs every layer in one call.
// Part of cpu_kernels.cpp's one translation unit (included there, in this order).
#pragma once

namespace {

// ---------------------------------------------------------------- one decoder layer of a decode step
// The whole pre-norm LLaMA layer for a few tokens, weights as GGUF blocks (any of Q4_0/Q4_1/Q8_0 per matrix), plain
// fp32 [N, K] matrices or tinyllm's own int8/int4, in native code: at batch 1 the torch path spends as long on ~25
// op dispatches per layer as on the weights.
//   y = rms(x)·ln1;  q, k, v = Wq y, Wk y, Wv y;  rope(q), rope(k) (rotate-half, cos/sin of this position, sin
//   signed as [−sin₁, sin₂]);  k, v → pool slot of `pos`;  a = paged attention over tokens 0..pos;
//   x += Wo a;  y = rms(x)·ln2;  x += Wd (silu(Wg y) ⊙ Wu y)
// The torch twin is FusedForward over the same modules (same matrix-vector kernels); matrices that read the same
// x run as one `mv_group`, and each row is computed exactly as a lone matvec computes it.

// how many tensors a projection of weight type t passes: codes (+ scales for kOwnI8, + zeros for kOwnI4)
static inline size_t tensors_of(int64_t t) { return t == kOwnI4 ? 3 : t == kOwnI8 ? 2 : 1; }

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
