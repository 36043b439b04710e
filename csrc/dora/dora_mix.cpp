// Fused multi-expert DoRA: the scalar kernels (the spec every SIMD variant
// matches up to rounding), fp16 conversion, adapter preparation, factored row
// norms, and the dispatcher that runs one ternary GEMM with the DoRA epilogue
// applied per worker on its cache-hot row range.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/huge_pages.h"
#include "common/thread_pool.h"
#include "dora/dora.h"
#include "ternary/ternary.h"

namespace r3mes {

// ---- fp16 -----------------------------------------------------------------

// ---- adapter preparation ("merge") ------------------------------------------

// Smallest power of two >= max|v| (1 for an all-zero tensor), so v / scale is
// exact and lies in [-1, 1].
static float pow2_scale(const float* v, std::size_t n) {
  float mx = 0.0f;
  for (std::size_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(v[i]));
  if (mx == 0.0f) return 1.0f;
  int e;
  std::frexp(mx, &e);  // mx = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0f, e);
}

DoraStorage parse_dora_storage(const std::string& name) {
  if (name == "fp32") return DoraStorage::F32;
  if (name == "fp16") return DoraStorage::F16;
  if (name == "int8") return DoraStorage::I8;
  throw std::invalid_argument("storage: expected 'fp16', 'fp32' or 'int8', got '" + name + "'");
}

const char* dora_storage_name(DoraStorage s) {
  switch (s) {
    case DoraStorage::F16: return "fp16";
    case DoraStorage::I8: return "int8";
    default: return "fp32";
  }
}

// Symmetric absmax int8 scale of n values with stride: max|v| / 127 (1 for all zeros).
static float int8_scale(const float* v, std::size_t n, std::size_t stride) {
  float mx = 0.0f;
  for (std::size_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(v[i * stride]));
  return mx == 0.0f ? 1.0f : mx / 127.0f;
}

static int8_t to_int8(float v, float scale) {
  const float r = std::nearbyint(v / scale);  // round half to even
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
}

DoraAdapter make_dora_adapter(const float* lora_a, const float* lora_b, const float* g,
                              std::size_t rank, std::size_t in, std::size_t out, float scaling,
                              DoraStorage storage) {
  if (rank == 0 || in == 0 || out == 0) throw std::invalid_argument("adapter: empty dimension");
  for (std::size_t i = 0; i < rank * in; ++i)
    if (!std::isfinite(lora_a[i])) throw std::invalid_argument("lora_A: contains NaN or Inf");
  for (std::size_t i = 0; i < out * rank; ++i)
    if (!std::isfinite(lora_b[i])) throw std::invalid_argument("lora_B: contains NaN or Inf");
  for (std::size_t i = 0; i < out; ++i)
    if (!std::isfinite(g[i])) throw std::invalid_argument("g: contains NaN or Inf");
  if (!std::isfinite(scaling)) throw std::invalid_argument("scaling: must be finite");

  DoraAdapter ad;
  ad.rank = rank;
  ad.in = in;
  ad.out = out;
  ad.out_padded = (out + kDoraTile - 1) / kDoraTile * kDoraTile;
  ad.storage = storage;
  ad.scaling = scaling;
  ad.rank2 = (rank + 1) / 2 * 2;
  // One arena buffer, each part 64-byte aligned: first the sizes, then the pointers.
  const bool i8 = storage == DoraStorage::I8, f16 = storage == DoraStorage::F16;
  const std::size_t a_n = rank * in, bt_n = ad.out_padded * (i8 ? ad.rank2 : rank);
  const std::size_t elem = i8 ? 1 : f16 ? 2 : 4;
  auto aligned = [](std::size_t bytes) { return (bytes + 63) / 64 * 64; };
  const std::size_t a_bytes = aligned(a_n * elem), bt_bytes = aligned(bt_n * elem),
                    g_bytes = aligned(ad.out_padded * 4), zs_bytes = i8 ? aligned(rank * 4) : 0;
  ad.buffer = arena_buffer(a_bytes + bt_bytes + g_bytes + zs_bytes);
  uint8_t* base = ad.buffer.get();
  auto span = [&](auto& s, std::size_t offset, std::size_t n) {
    s.ptr = reinterpret_cast<std::remove_reference_t<decltype(s[0])>*>(base + offset);
    s.n = n;
  };
  span(ad.g, a_bytes + bt_bytes, ad.out_padded);  // zero-padded: the buffer starts zeroed
  std::copy(g, g + out, ad.g.begin());
  // The kernel's B is G = g (.) B (dora.h): the update term needs no gain of its own.
  std::vector<float> folded(out * rank);
  for (std::size_t n = 0; n < out; ++n)
    for (std::size_t j = 0; j < rank; ++j) folded[n * rank + j] = g[n] * lora_b[n * rank + j];
  lora_b = folded.data();
  if (i8) {
    span(ad.a8, 0, a_n);
    span(ad.bt8, a_bytes, bt_n);
    span(ad.z_scale, a_bytes + bt_bytes + g_bytes, rank);
    for (std::size_t j = 0; j < rank; ++j) {
      const float sa = int8_scale(lora_a + j * in, in, 1);
      const float sb = int8_scale(lora_b + j, out, rank);
      ad.z_scale[j] = sa * sb;
      for (std::size_t k = 0; k < in; ++k) ad.a8[j * in + k] = to_int8(lora_a[j * in + k], sa);
      for (std::size_t n = 0; n < out; ++n)
        ad.bt8[(((n / kDoraTile) * ad.rank2 / 2 + j / 2) * kDoraTile + n % kDoraTile) * 2 +
               j % 2] = to_int8(lora_b[n * rank + j], sb);
    }
  } else if (f16) {
    span(ad.a16, 0, a_n);
    span(ad.bt16, a_bytes, bt_n);
    ad.a_scale = pow2_scale(lora_a, rank * in);
    ad.b_scale = pow2_scale(lora_b, out * rank);
    for (std::size_t i = 0; i < rank * in; ++i) ad.a16[i] = float_to_half(lora_a[i] / ad.a_scale);
    for (std::size_t n = 0; n < out; ++n)
      for (std::size_t j = 0; j < rank; ++j)
        ad.bt16[((n / kDoraTile) * rank + j) * kDoraTile + n % kDoraTile] =
            float_to_half(lora_b[n * rank + j] / ad.b_scale);
  } else {
    span(ad.a32, 0, a_n);
    span(ad.bt32, a_bytes, bt_n);
    std::copy(lora_a, lora_a + a_n, ad.a32.begin());
    for (std::size_t n = 0; n < out; ++n)
      for (std::size_t j = 0; j < rank; ++j)
        ad.bt32[((n / kDoraTile) * rank + j) * kDoraTile + n % kDoraTile] = lora_b[n * rank + j];
  }
  ad.coef = scaling * ad.a_scale * ad.b_scale;
  return ad;
}

// ---- scalar kernels (the spec) ----------------------------------------------

float dora_dot_f32_scalar(const float* x, const float* a, std::size_t k) {
  float s = 0.0f;
  for (std::size_t i = 0; i < k; ++i) s += x[i] * a[i];
  return s;
}

float dora_dot_f16_scalar(const float* x, const uint16_t* a, std::size_t k) {
  float s = 0.0f;
  for (std::size_t i = 0; i < k; ++i) s += x[i] * half_to_float(a[i]);
  return s;
}

void dora_dot_i8x16_rows_scalar(const int8_t* a, std::size_t lda, std::size_t rows,
                                const int16_t* x16, std::size_t k, int64_t* out) {
  for (std::size_t r = 0; r < rows; ++r) {
    int64_t s = 0;
    for (std::size_t i = 0; i < k; ++i) s += int32_t{a[r * lda + i]} * x16[i];
    out[r] = s;
  }
}

void dora_quantize_x16_scalar(const float* x, std::size_t k, float inv, int16_t* x16) {
  for (std::size_t i = 0; i < k; ++i)
    x16[i] = static_cast<int16_t>(std::min(32767.0f, std::max(-32767.0f, std::nearbyint(x[i] * inv))));
}

float quantize_z16(const float* z, std::size_t rank, std::size_t rank2, int16_t* z16) {
  float mx = 0.0f;
  for (std::size_t j = 0; j < rank; ++j) mx = std::max(mx, std::fabs(z[j]));
  std::fill(z16, z16 + rank2, int16_t{0});
  if (mx < kX16Floor) return 0.0f;  // also keeps mx / q from underflowing to 0
  const float q = static_cast<float>(
      std::min<std::size_t>(32767, 2147483647u / (127u * std::max<std::size_t>(rank2, 1))));
  const float sz = mx / q;
  for (std::size_t j = 0; j < rank; ++j)
    z16[j] = static_cast<int16_t>(std::min(q, std::max(-q, std::nearbyint(z[j] / sz))));
  return sz;
}

void DoraMix::finish_a_pass() {
  entries.resize(act_e.size());
  for (std::size_t m = 0; m < M; ++m)
    for (uint32_t a = act_start[m]; a < act_start[m + 1]; ++a) {
      const DoraAdapter& ad = *adapters[act_e[a]];
      Entry& e = entries[a];
      e.storage = ad.storage;
      e.scale = act_w[a] * ad.coef;
      if (ad.storage == DoraStorage::I8) {
        z16_scale[a] = quantize_z16(z.data() + m * z_cols + z_off[act_e[a]], ad.rank, ad.rank2,
                                    z16.data() + z16_off[a]);
        e.scale *= z16_scale[a];
        e.rank = ad.rank2;
        e.z = z16.data() + z16_off[a];
        e.bt = reinterpret_cast<const uint8_t*>(ad.bt8.data());
        e.tile_bytes = ad.rank2 * kDoraTile;
      } else {
        e.rank = ad.rank;
        e.z = z.data() + m * z_cols + z_off[act_e[a]];
        const bool f16 = ad.storage == DoraStorage::F16;
        e.bt = f16 ? reinterpret_cast<const uint8_t*>(ad.bt16.data())
                   : reinterpret_cast<const uint8_t*>(ad.bt32.data());
        e.tile_bytes = ad.rank * kDoraTile * (f16 ? 2 : 4);
      }
      e.bt_end = e.bt + ad.out_padded / kDoraTile * e.tile_bytes;
    }
}

float DoraMix::factor(std::size_t m, std::size_t n) const {
  if (const float* row = factor_row(m)) return row[n];
  float c = base_w[m];
  for (uint32_t a = act_start[m]; a < act_start[m + 1]; ++a)
    c += act_w[a] * adapters[act_e[a]]->g[n];
  return c;
}

void dora_epilogue_rows_scalar(const DoraMix& p, std::size_t n0, std::size_t n1) {
  for (std::size_t m = 0; m < p.M; ++m) {
    float* y = p.out + m * p.N;
    const uint32_t a0 = p.act_start[m], a1 = p.act_start[m + 1];
    const float* zm = p.z.data() + m * p.z_cols;
    for (std::size_t n = n0; n < n1; ++n) {
      float acc = y[n];
      if (a0 != a1) {
        acc *= p.factor(m, n);
        const std::size_t t = n / kDoraTile, l = n % kDoraTile;
        for (uint32_t a = a0; a < a1; ++a) {
          const DoraAdapter& ad = *p.adapters[p.act_e[a]];
          const float* z = zm + p.z_off[p.act_e[a]];
          const std::size_t off = t * ad.rank * kDoraTile + l;
          float u = 0.0f;
          if (ad.storage == DoraStorage::F16) {
            for (std::size_t j = 0; j < ad.rank; ++j)
              u += z[j] * half_to_float(ad.bt16[off + j * kDoraTile]);
          } else if (ad.storage == DoraStorage::I8) {
            const int8_t* b = ad.bt8.data() + (t * ad.rank2 / 2 * kDoraTile + l) * 2;
            const int16_t* z16 = p.z16.data() + p.z16_off[a];
            int32_t s = 0;
            for (std::size_t j = 0; j < ad.rank2; ++j)
              s += int32_t{b[(j / 2) * kDoraTile * 2 + j % 2]} * z16[j];
            u = static_cast<float>(s) * p.z16_scale[a];
          } else {
            for (std::size_t j = 0; j < ad.rank; ++j) u += z[j] * ad.bt32[off + j * kDoraTile];
          }
          acc += (p.act_w[a] * ad.coef) * u;
        }
      }
      if (p.bias != nullptr) acc += p.bias[n];
      y[n] = acc;
    }
  }
}

std::vector<float> dora_base_factor(const std::vector<const DoraAdapter*>& adapters,
                                    const float* mix, const float* base_weight,
                                    std::size_t mix_rows) {
  const std::size_t E = adapters.size();
  if (E == 0) return {};
  const std::size_t n = adapters[0]->out;
  std::vector<float> c(mix_rows * n);
  for (std::size_t r = 0; r < mix_rows; ++r) {
    float* cr = c.data() + r * n;
    const float* w = mix + r * E;
    bool any = false;
    for (std::size_t e = 0; e < E; ++e) any |= w[e] != 0.0f;
    if (!any) {
      std::fill(cr, cr + n, 1.0f);
      continue;
    }
    // Summed in the epilogue's order (base weight, then the adapters in the mix): the
    // table equals the sum it replaces to float rounding (the SIMD epilogues fuse the
    // multiply-add).
    std::fill(cr, cr + n, base_weight != nullptr ? base_weight[r] : 0.0f);
    for (std::size_t e = 0; e < E; ++e)
      if (w[e] != 0.0f)
        for (std::size_t i = 0; i < n; ++i) cr[i] += w[e] * adapters[e]->g[i];
  }
  return c;
}

// ---- dispatcher ---------------------------------------------------------------

namespace {

using DotF32 = float (*)(const float*, const float*, std::size_t);
using DotF16 = float (*)(const float*, const uint16_t*, std::size_t);
using DotI8 = void (*)(const int8_t*, std::size_t, std::size_t, const int16_t*, std::size_t,
                      int64_t*);
using QuantX16 = void (*)(const float*, std::size_t, float, int16_t*);
using AbsMax = float (*)(const float*, std::size_t, bool*);
using EpilogueFn = void (*)(const DoraMix&, std::size_t, std::size_t);

struct Isa {
  DotF32 dot32;
  DotF16 dot16;
  DotI8 dot8;
  EpilogueFn epilogue;
  QuantX16 quant_x16;
  AbsMax absmax;
};

Isa isa_for(SimdLevel level) {
  if (level == SimdLevel::Avx512Vnni)
    return {isa_avx512::dora_dot_f32_avx512, isa_avx512::dora_dot_f16_avx512, isa_avx512vnni::dora_dot_i8x16_rows_avx512vnni,
            isa_avx512vnni::dora_epilogue_rows_avx512vnni, isa_avx512::dora_quantize_x16_avx512, isa_avx512::absmax_avx512};
  if (level == SimdLevel::Avx512)
    return {isa_avx512::dora_dot_f32_avx512, isa_avx512::dora_dot_f16_avx512, isa_avx512::dora_dot_i8x16_rows_avx512,
            isa_avx512::dora_epilogue_rows_avx512, isa_avx512::dora_quantize_x16_avx512, isa_avx512::absmax_avx512};
  if (level == SimdLevel::Avx2)
    return {isa_avx2::dora_dot_f32_avx2, isa_avx2::dora_dot_f16_avx2, isa_avx2::dora_dot_i8x16_rows_avx2,
            isa_avx2::dora_epilogue_rows_avx2, isa_avx2::dora_quantize_x16_avx2, isa_avx2::absmax_avx2};
  return {dora_dot_f32_scalar, dora_dot_f16_scalar, dora_dot_i8x16_rows_scalar,
          dora_epilogue_rows_scalar, dora_quantize_x16_scalar, absmax_scalar};
}

template <EpilogueFn F>
void epilogue_trampoline(void* ctx, std::size_t n0, std::size_t n1) {
  F(*static_cast<const DoraMix*>(ctx), n0, n1);
}

void (*hook_for(EpilogueFn f))(void*, std::size_t, std::size_t) {
  if (f == isa_avx512vnni::dora_epilogue_rows_avx512vnni)
    return epilogue_trampoline<isa_avx512vnni::dora_epilogue_rows_avx512vnni>;
  if (f == isa_avx512::dora_epilogue_rows_avx512) return epilogue_trampoline<isa_avx512::dora_epilogue_rows_avx512>;
  if (f == isa_avx2::dora_epilogue_rows_avx2) return epilogue_trampoline<isa_avx2::dora_epilogue_rows_avx2>;
  return epilogue_trampoline<dora_epilogue_rows_scalar>;
}

// Decodes one packed row into float ternary values t[0..K) (K rounded up to the
// group: padding decodes to 0).
void decode_row_float(const uint8_t* row, std::size_t kp, float* t) {
  for (std::size_t g = 0; g < kp / kGroupWeights; ++g)
    for (std::size_t h = 0; h < 2; ++h) {
      const uint8_t* b = row + g * kGroupBytes + 32 * h;
      float* dst = t + g * kGroupWeights + 128 * h;
      for (int p = 0; p < 4; ++p)
        for (std::size_t j = 0; j < 32; ++j)
          dst[32 * p + j] = static_cast<float>(static_cast<int>((b[j] >> (2 * p)) & 3) - 1);
    }
}

}  // namespace

// From this many tokens a call quantises its activations on every thread.
constexpr std::size_t kParallelQuantizeRows = 16;

bool DoraCall::prepare(const float* x, std::size_t M, std::size_t K, const uint8_t* packed,
                       std::size_t N, float w_scale, const float* bias,
                       const std::vector<const DoraAdapter*>& adapters, const float* mix,
                       const float* base_weight, std::size_t mix_rows, float* out,
                       SimdLevel level, const float* base_factor,
                       const DoraCall* same_input, bool rows_later) {
  const std::size_t E = adapters.size();
  const Isa isa = isa_for(level);
  args = GemmArgs{};
  input_ = nullptr;  // until this call's activations are made
  x16_scale_of_ = x16_inv_of_ = nullptr;
  x16_grid_ = nullptr;
  args.M = M;
  args.N = N;
  args.K = K;
  if (M == 0 || N == 0) return true;
  DoraMix& p = mix_;
  // Reset in place: a DoraCall reused from step to step (the decode layer's) keeps its
  // buffers' capacity, so the steady state allocates nothing.
  p.act_e.clear();
  p.act_w.clear();
  p.z_cols = 0;
  p.M = M;
  p.N = N;
  p.out = out;
  p.bias = bias;
  p.base_factor = base_factor;
  p.base_factor_rows = mix_rows;
  adapters_ = adapters;
  p.adapters = adapters_.data();
  p.act_start.resize(M + 1);
  p.base_w.assign(M, 0.0f);
  p.z_off.resize(E);
  for (std::size_t e = 0; e < E; ++e) {
    p.z_off[e] = p.z_cols;
    p.z_cols += adapters[e]->rank;
  }
  for (std::size_t m = 0; m < M; ++m) {
    p.act_start[m] = static_cast<uint32_t>(p.act_e.size());
    const float* w = mix + (mix_rows == 1 ? 0 : m) * E;
    if (base_weight != nullptr) p.base_w[m] = base_weight[mix_rows == 1 ? 0 : m];
    for (std::size_t e = 0; e < E; ++e)
      if (w[e] != 0.0f) {
        p.act_e.push_back(static_cast<uint32_t>(e));
        p.act_w.push_back(w[e]);
      }
  }
  p.act_start[M] = static_cast<uint32_t>(p.act_e.size());
  const bool any_adapter = !p.act_e.empty();

  // Activations for the base path (per-token absmax int8, padded rows): made by
  // quantize_rows, here or by the caller.
  const bool shared = same_input != nullptr && same_input->input_ == x &&
                      same_input->input_m_ == M && same_input->input_k_ == K;
  owns_q_ = !shared;
  if (shared) {
    q_of_ = same_input->q_of_;
    x_scale_of_ = same_input->x_scale_of_;
    qsum_of_ = same_input->qsum_of_;
  } else {
    q_.resize(M * padded_k(K));
    x_scale_.resize(M);
    qsum_.resize(M);
    q_of_ = q_.data();
    x_scale_of_ = x_scale_.data();
    qsum_of_ = qsum_.data();
  }
  level_ = level;
  absmax_ = isa.absmax;
  owns_x16_ = false;

  if (any_adapter) {
    // The A pass, z[m, off_e + j] = A_e[j] . x_m for the (token, adapter) pairs in use,
    // runs as the GEMM's prologue: in the same pool hand-off, ahead of the row chunks.
    // Only those pairs' z are written and read (through the mix entries), so z is not
    // cleared: clearing it pulled back from the other workers the lines their A-pass
    // tasks wrote the step before (0.7% of the samples of a profiled decode step of 8 rows
    // with 8 experts on 2 threads).
    p.z.resize(M * p.z_cols);
    row_adapter_.resize(p.z_cols);
    for (std::size_t e = 0; e < E; ++e)
      for (std::size_t j = 0; j < adapters[e]->rank; ++j) row_adapter_[p.z_off[e] + j] = e;
    mix_ptr_ = mix;
    mix_rows_ = mix_rows;
    dot32_ = isa.dot32;
    dot16_ = isa.dot16;
    dot8_ = isa.dot8;
    // Task row m * z_cols + i: token m, adapter row i. Token-major, so one token's rows of
    // one adapter lie one after another and go to the int8 kernel together (it shares each
    // load of x16 among four rows); adapter-major order made one call a row for M > 1.
    a_rows_ = p.z_cols * M;
    // One A-pass task a worker: the first chunk each worker claims runs one (ternary.h).
    const std::size_t threads = static_cast<std::size_t>(get_num_threads());
    a_grain_ = (a_rows_ + threads - 1) / threads;
    a_tasks_ = (a_rows_ + a_grain_ - 1) / a_grain_;
    // int8 adapters' A pass runs on x's int16 grid (see dora.h). For one token each A-pass
    // task makes its own copy: the worker that reads it then writes it, and the 5 KB of a
    // 2560-wide x do not cross between cores (measured at 2560x6912, 3 int8 experts:
    // 0.5 points of the fused layer's cost). Several tokens share one grid, made here.
    bool any_int8 = false;
    for (const DoraAdapter* ad : adapters) any_int8 |= ad->storage == DoraStorage::I8;
    if (any_int8) {
      quant_x16_ = isa.quant_x16;
      if (shared && same_input->x16_scale_of_ != nullptr) {
        x16_scale_of_ = same_input->x16_scale_of_;
        x16_inv_of_ = same_input->x16_inv_of_;
        x16_grid_ = same_input->x16_grid_;
      } else {
        owns_x16_ = true;
        x16_scale_.resize(M);
        x16_inv_.resize(M);
        if (M > 1) x16_.resize(M * K);
        x16_scale_of_ = x16_scale_.data();
        x16_inv_of_ = x16_inv_.data();
        x16_grid_ = M > 1 ? x16_.data() : nullptr;
      }
      if (M == 1) x16_.resize(a_tasks_ * K);
    }
    p.z16_off.resize(p.act_e.size());
    std::size_t z16_size = 0;
    for (std::size_t a = 0; a < p.act_e.size(); ++a) {
      p.z16_off[a] = z16_size;
      const DoraAdapter& ad = *adapters[p.act_e[a]];
      if (ad.storage == DoraStorage::I8) z16_size += ad.rank2;
    }
    p.z16.resize(z16_size);
    p.z16_scale.assign(p.act_e.size(), 0.0f);
  } else {
    a_rows_ = 0;
  }

  input_ = x;
  input_m_ = M;
  input_k_ = K;
  if (!rows_later) {
    // A prompt's tokens are quantised over the pool's threads, rows split evenly: on the
    // caller alone they kept the other workers waiting (2.7% of the samples of a packed
    // prefill of 324 tokens, 2B-4T shape, 2 threads).
    std::atomic<bool> finite{true};
    const auto rows = [&](std::size_t r0, std::size_t r1) {
      if (!quantize_rows(r0, r1)) finite = false;
    };
    if (M < kParallelQuantizeRows)
      rows(0, M);
    else
      parallel_per_thread(M, rows);
    if (!finite) {
      input_ = nullptr;
      return false;
    }
  }
  args = GemmArgs{packed, q_of_, qsum_of_, M, N, K,
                  nullptr, out, x_scale_of_, w_scale, any_adapter ? nullptr : bias};
  if (any_adapter) {
    args.epilogue = hook_for(isa.epilogue);
    args.epilogue_ctx = &mix_;
    args.prologue = &DoraCall::a_pass_task;
    args.prologue_ctx = this;
    args.prologue_tasks = a_tasks_;
    args.prologue_finish = &DoraCall::a_pass_finish;
  }
  return true;
}

bool DoraCall::quantize_rows(std::size_t r0, std::size_t r1) {
  const std::size_t M = input_m_, K = input_k_, kp = padded_k(K);
  bool finite = true;
  if (owns_q_ && r1 > r0)
    finite = quantize_activations(input_ + r0 * K, r1 - r0, K, q_.data() + r0 * kp, kp,
                                  x_scale_.data() + r0, qsum_.data() + r0, level_);
  for (std::size_t m = r0; owns_x16_ && m < r1; ++m) {
    bool row_finite = true;
    float mx = absmax_(input_ + m * K, K, &row_finite);
    // Below kX16Floor, 32767 / max|x| would overflow: such a token's adapter path is 0.
    if (mx < kX16Floor) mx = 0.0f;
    x16_inv_[m] = mx > 0.0f ? 32767.0f / mx : 0.0f;
    x16_scale_[m] = mx / 32767.0f;
    if (M > 1) quant_x16_(input_ + m * K, K, x16_inv_[m], x16_.data() + m * K);
  }
  return finite;
}

void DoraCall::a_pass_finish(void* ctx) { static_cast<DoraCall*>(ctx)->mix_.finish_a_pass(); }

void DoraCall::a_pass_task(void* ctx, std::size_t task) {
  DoraCall& c = *static_cast<DoraCall*>(ctx);
  DoraMix& p = c.mix_;
  const std::size_t M = p.M, E = c.adapters_.size(), K = c.adapters_[0]->in;
  const std::size_t r1 = std::min(c.a_rows_, (task + 1) * c.a_grain_);
  const int16_t* x16 = nullptr;  // this task's int16 grid of the tokens' x (int8 adapters)
  for (std::size_t t = task * c.a_grain_; t < r1;) {
    const std::size_t m = t / p.z_cols, i = t % p.z_cols, e = c.row_adapter_[i];
    const DoraAdapter& ad = *c.adapters_[e];
    const std::size_t j = i - p.z_off[e];
    const std::size_t adapter_end = m * p.z_cols + p.z_off[e] + ad.rank;  // past its rows
    if (c.mix_ptr_[(c.mix_rows_ == 1 ? 0 : m) * E + e] == 0.0f) {
      t = adapter_end;  // the token does not use this adapter
      continue;
    }
    if (ad.storage != DoraStorage::I8) {
      const float* xm = c.input_ + m * K;
      p.z[m * p.z_cols + i] = ad.storage == DoraStorage::F16
                                  ? c.dot16_(xm, ad.a16.data() + j * K, K)
                                  : c.dot32_(xm, ad.a32.data() + j * K, K);
      ++t;
      continue;
    }
    if (x16 == nullptr) {
      if (M == 1) c.quant_x16_(c.input_, K, c.x16_inv_of_[0], c.x16_.data() + task * K);
      x16 = M == 1 ? c.x16_.data() + task * K : c.x16_grid_;
    }
    // This token's rows of this adapter in the task, in one call.
    const std::size_t rows = std::min(r1, adapter_end) - t;
    int64_t dots[16];
    for (std::size_t r0 = 0; r0 < rows; r0 += 16) {
      const std::size_t n = std::min<std::size_t>(16, rows - r0);
      c.dot8_(ad.a8.data() + (j + r0) * K, K, n, x16 + m * K, K, dots);
      for (std::size_t r = 0; r < n; ++r)
        p.z[m * p.z_cols + i + r0 + r] =
            static_cast<float>(dots[r]) * (ad.z_scale[j + r0 + r] * c.x16_scale_of_[m]);
    }
    t += rows;
  }
}

bool dora_linear(const float* x, std::size_t M, std::size_t K, const uint8_t* packed,
                 std::size_t N, float w_scale, const float* bias,
                 const std::vector<const DoraAdapter*>& adapters, const float* mix,
                 const float* base_weight, std::size_t mix_rows, float* out, SimdLevel level,
                 const float* base_factor) {
  // One per thread, reused: prepare() keeps its buffers' capacity from call to call.
  thread_local DoraCall call;
  if (!call.prepare(x, M, K, packed, N, w_scale, bias, adapters, mix, base_weight, mix_rows, out,
                    level, base_factor))
    return false;
  ternary_gemm(call.args, level);
  return true;
}

// ---- ternary x float and factored row norms -----------------------------------

void ternary_float_matmul(const uint8_t* packed, std::size_t N, std::size_t K, const float* a,
                          std::size_t R, float* out, SimdLevel level) {
  const DotF32 dot = isa_for(level).dot32;
  const std::size_t kp = padded_k(K), row_bytes = packed_row_bytes(K);
  parallel_for(N, 64, [&](std::size_t n0, std::size_t n1) {
    std::vector<float> t(kp);
    for (std::size_t n = n0; n < n1; ++n) {
      decode_row_float(packed + n * row_bytes, kp, t.data());
      for (std::size_t r = 0; r < R; ++r) out[n * R + r] = dot(t.data(), a + r * K, K);
    }
  });
}

void dora_row_norms(const uint8_t* packed, std::size_t N, std::size_t K, float w_scale,
                    const float* lora_a, std::size_t rank, const float* lora_b, float scaling,
                    double* norms, SimdLevel level) {
  const DotF32 dot = isa_for(level).dot32;
  // Gram matrix A A^T in float64 (rank x rank, symmetric).
  std::vector<double> gram(rank * rank);
  parallel_for(rank, 1, [&](std::size_t i0, std::size_t i1) {
    for (std::size_t i = i0; i < i1; ++i)
      for (std::size_t j = 0; j <= i; ++j) {
        double s = 0.0;
        const float* ai = lora_a + i * K;
        const float* aj = lora_a + j * K;
        for (std::size_t k = 0; k < K; ++k) s += static_cast<double>(ai[k]) * aj[k];
        gram[i * rank + j] = s;
        gram[j * rank + i] = s;
      }
  });
  const std::size_t kp = padded_k(K), row_bytes = packed_row_bytes(K);
  const double inv_sw = 1.0 / static_cast<double>(w_scale), s = scaling;
  parallel_for(N, 64, [&](std::size_t n0, std::size_t n1) {
    std::vector<float> t(kp);
    for (std::size_t n = n0; n < n1; ++n) {
      decode_row_float(packed + n * row_bytes, kp, t.data());
      std::size_t count = 0;  // integer count: vectorises, no float add chain
      for (std::size_t k = 0; k < K; ++k) count += t[k] != 0.0f;
      const double nnz = static_cast<double>(count);
      const float* b = lora_b + n * rank;
      double cross = 0.0, quad = 0.0;
      for (std::size_t j = 0; j < rank; ++j) {
        // (W0 A^T)_{n,j} = (T_n . A_j) / s_w; the float dot of ternary values is
        // a signed sum of A entries, accurate to float rounding.
        cross += static_cast<double>(b[j]) * dot(t.data(), lora_a + j * K, K) * inv_sw;
        double acc = 0.0;
        for (std::size_t i = 0; i < rank; ++i) acc += gram[j * rank + i] * b[i];
        quad += static_cast<double>(b[j]) * acc;
      }
      const double sq = nnz * inv_sw * inv_sw + 2.0 * s * cross + s * s * quad;
      norms[n] = std::sqrt(std::max(sq, 0.0));
    }
  });
}

}  // namespace r3mes
