// r3mes._native: the CPU kernels. Takes and returns numpy buffers (torch CPU
// tensors pass through .numpy() without a copy); never links libtorch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <vector>

#include "attention/decode_attention.h"
#include "common/array_check.h"
#include "common/cpu_features.h"
#include "common/huge_pages.h"
#include "common/thread_pool.h"
#include "ternary/amx.h"
#include "dora/dora.h"
#include "head/int4_gemm.h"
#include "model/decode_layer.h"
#include "text/e5_encoder.h"
#include "ternary/int8_gemm.h"
#include "ternary/quantized_acts.h"
#include "ternary/ternary.h"

namespace py = pybind11;
using namespace r3mes;

#ifndef R3MES_VERSION
#define R3MES_VERSION "dev"
#endif

namespace {

py::dict info() {
  const CpuFeatures& f = cpu_features();
  py::dict features;
  features["avx2"] = f.avx2;
  features["fma"] = f.fma;
  features["avx512f"] = f.avx512f;
  features["avx512bw"] = f.avx512bw;
  features["avx512vl"] = f.avx512vl;
  features["avx512vnni"] = f.avx512vnni;
  features["avxvnni"] = f.avxvnni;
  features["amx_int8"] = f.amx_int8;
  std::vector<std::string> compiled, supported;
#if defined(__x86_64__)
  for (int i = 0; i <= static_cast<int>(SimdLevel::Avx512Vnni); ++i)
    compiled.emplace_back(simd_level_name(static_cast<SimdLevel>(i)));
#else
  compiled.emplace_back("scalar");
#endif
  for (SimdLevel l : supported_levels()) supported.emplace_back(simd_level_name(l));
  py::dict d;
  d["version"] = R3MES_VERSION;
  d["compiled_simd_levels"] = compiled;
  d["supported_simd_levels"] = supported;
  d["simd_level"] = simd_level_name(active_simd_level());
  d["cpu_features"] = features;
  d["num_threads"] = get_num_threads();
  d["weight_layout"] = "r3mes-2bit-g256";
  d["amx"] = amx_usable();
  return d;
}

void check_packed(const py::array& packed, std::size_t k) {
  check_packed_rows(packed, k, packed_row_bytes(k));
}

// Quantised activations in the ternary kernels' padded layout.
QuantizedActs quantize_padded(const float* x, std::size_t m, std::size_t k) {
  return quantize_rows(x, m, k, padded_k(k));
}

py::tuple py_quantize_activations(const py::array& x) {
  check_array<float>(x, "x", 2);
  const std::size_t m = x.shape(0), k = x.shape(1);
  if (k == 0) throw std::invalid_argument("x: last dimension must be > 0");
  py::array_t<int8_t> q({m, k});
  py::array_t<float> scale(m);
  {
    py::gil_scoped_release release;
    std::vector<int32_t> qsum(m);
    if (!quantize_activations(data_of<float>(x), m, k, q.mutable_data(), k, scale.mutable_data(),
                              qsum.data(), active_simd_level()))
      throw std::invalid_argument("x: activations contain NaN or Inf");
  }
  return py::make_tuple(q, scale);
}

py::array_t<uint8_t> py_pack_ternary(const py::array& t) {
  check_array<int8_t>(t, "ternary", 2);
  const std::size_t n = t.shape(0), k = t.shape(1);
  if (n == 0 || k == 0) throw std::invalid_argument("ternary: weight must not be empty");
  py::array_t<uint8_t> packed = weight_buffer(n, packed_row_bytes(k));
  bool ok;
  {
    py::gil_scoped_release release;
    ok = pack_ternary(data_of<int8_t>(t), n, k, packed.mutable_data());
  }
  if (!ok) throw std::invalid_argument("ternary: values must be in {-1, 0, 1}");
  return packed;
}

py::array_t<uint8_t> py_quantize_pack_ternary(const py::array& w, float scale) {
  check_array<float>(w, "weight", 2);
  const std::size_t n = w.shape(0), k = w.shape(1);
  if (n == 0 || k == 0) throw std::invalid_argument("weight: must not be empty");
  if (!(scale > 0.0f) || !std::isfinite(scale))
    throw std::invalid_argument("scale must be a positive finite number");
  py::array_t<uint8_t> packed = weight_buffer(n, packed_row_bytes(k));
  bool ok;
  {
    py::gil_scoped_release release;
    ok = quantize_pack_ternary(data_of<float>(w), n, k, scale, packed.mutable_data());
  }
  if (!ok) throw std::invalid_argument("weight: contains NaN or Inf");
  return packed;
}

py::array_t<int8_t> py_unpack_ternary(const py::array& packed, std::size_t k) {
  check_packed(packed, k);
  const std::size_t n = packed.shape(0);
  py::array_t<int8_t> t({n, k});
  py::gil_scoped_release release;
  unpack_ternary(data_of<uint8_t>(packed), n, k, t.mutable_data());
  return t;
}

py::array_t<int32_t> py_ternary_gemm_int(const py::array& q, const py::array& packed,
                                         std::size_t k) {
  check_array<int8_t>(q, "q", 2);
  check_packed(packed, k);
  if (static_cast<std::size_t>(q.shape(1)) != k)
    throw std::invalid_argument("q: has " + std::to_string(q.shape(1)) +
                                " columns, weight has in_features=" + std::to_string(k));
  const std::size_t m = q.shape(0), n = packed.shape(0), kp = padded_k(k);
  py::array_t<int32_t> out({m, n});
  py::gil_scoped_release release;
  std::vector<int8_t> qp(m * kp, 0);
  std::vector<int32_t> qsum(m, 0);
  const int8_t* src = data_of<int8_t>(q);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < k; ++j) {
      qp[i * kp + j] = src[i * k + j];
      qsum[i] += src[i * k + j];
    }
  GemmArgs args{data_of<uint8_t>(packed), qp.data(), qsum.data(), m, n, k,
                out.mutable_data(), nullptr, nullptr, 0.0f, nullptr};
  ternary_gemm(args, active_simd_level());
  return out;
}

py::array_t<float> py_ternary_linear(const py::array& x, const py::array& packed, std::size_t k,
                                     float w_scale, const py::object& bias) {
  check_array<float>(x, "x", 2);
  check_packed(packed, k);
  if (static_cast<std::size_t>(x.shape(1)) != k)
    throw std::invalid_argument("x: has " + std::to_string(x.shape(1)) +
                                " features, weight has in_features=" + std::to_string(k));
  check_w_scale(w_scale);
  const std::size_t m = x.shape(0), n = packed.shape(0);
  py::array bias_arr;
  const float* bias_ptr = optional_bias(bias, n, bias_arr);
  py::array_t<float> out({m, n});
  if (m == 0) return out;
  const float* xp = data_of<float>(x);
  float* op = out.mutable_data();
  const uint8_t* pp = data_of<uint8_t>(packed);
  {
    py::gil_scoped_release release;
    // Throwing here is safe: the release guard re-takes the GIL while unwinding.
    QuantizedActs acts = quantize_padded(xp, m, k);
    GemmArgs args{pp, acts.q.data(), acts.qsum.data(), m, n, k,
                  nullptr, op, acts.scale.data(), w_scale, bias_ptr};
    ternary_gemm(args, active_simd_level());
  }
  return out;
}

py::tuple py_quantize_int8_weight(const py::array& w) {
  check_array<float>(w, "weight", 2);
  const std::size_t n = w.shape(0), k = w.shape(1);
  if (n == 0 || k == 0) throw std::invalid_argument("weight: must not be empty");
  const std::size_t kp = int8_padded_k(k);
  // The int8 weights on huge pages too (int8 and uint8 share the buffer type).
  py::array_t<int8_t> data = weight_buffer(n, kp).view("int8");
  py::array_t<float> scale(n);
  py::array_t<int32_t> rowsum(n);
  bool ok;
  {
    py::gil_scoped_release release;
    ok = quantize_int8_weight(data_of<float>(w), n, k, data.mutable_data(), scale.mutable_data(),
                              rowsum.mutable_data());
  }
  if (!ok) throw std::invalid_argument("weight: contains NaN or Inf");
  return py::make_tuple(data, scale, rowsum);
}

py::array_t<float> py_int8_linear(const py::array& x, const py::array& w, const py::array& scale,
                                  const py::array& rowsum, std::size_t k) {
  check_array<float>(x, "x", 2);
  check_array<int8_t>(w, "weight", 2);
  check_array<float>(scale, "weight_scale", 1);
  check_array<int32_t>(rowsum, "row_sums", 1);
  const std::size_t m = x.shape(0), n = w.shape(0), kp = int8_padded_k(k);
  if (k == 0 || static_cast<std::size_t>(x.shape(1)) != k)
    throw std::invalid_argument("x: has " + std::to_string(x.shape(1)) +
                                " features, weight has in_features=" + std::to_string(k));
  if (static_cast<std::size_t>(w.shape(1)) != kp)
    throw std::invalid_argument("weight: rows must be in_features padded to a multiple of 64");
  if (static_cast<std::size_t>(scale.shape(0)) != n || static_cast<std::size_t>(rowsum.shape(0)) != n)
    throw std::invalid_argument("weight_scale/row_sums: length does not match out_features");
  py::array_t<float> out({m, n});
  if (m == 0) return out;
  const float* xp = data_of<float>(x);
  float* op = out.mutable_data();
  Int8GemmArgs args{data_of<int8_t>(w), data_of<int32_t>(rowsum), data_of<float>(scale),
                    nullptr, nullptr, m, n, k, op};
  py::gil_scoped_release release;
  const QuantizedActs acts = quantize_rows(xp, m, k, kp);
  args.q = acts.q.data();
  args.x_scale = acts.scale.data();
  int8_gemm(args, active_simd_level());
  return out;
}

py::array_t<float> py_decode_attention(const py::array& q, const py::array& k, const py::array& v,
                                       const py::array& pad, std::size_t length, float scaling) {
  check_array<float>(q, "q", 3);
  for (const auto& [c, name] : {std::pair{&k, "k_cache"}, std::pair{&v, "v_cache"}}) {
    if (c->dtype().kind() != 'f' || (c->itemsize() != 4 && c->itemsize() != 2))
      throw std::invalid_argument(std::string(name) + ": expected dtype float32 or float16, got " +
                                  std::string(py::str(c->dtype())));
    if (c->ndim() != 4)
      throw std::invalid_argument(std::string(name) + ": expected 4-D array, got " +
                                  std::to_string(c->ndim()) + "-D");
    if (!(c->flags() & py::array::c_style))
      throw std::invalid_argument(std::string(name) + ": must be C-contiguous");
  }
  if (k.itemsize() != v.itemsize())
    throw std::invalid_argument("k_cache and v_cache must have the same dtype");
  if (!pad.dtype().is(py::dtype::of<int64_t>()) || pad.ndim() != 1 ||
      !(pad.flags() & py::array::c_style))
    throw std::invalid_argument("pad: expected a contiguous 1-D int64 array");
  const std::size_t batch = q.shape(0), heads = q.shape(1), dim = q.shape(2);
  const std::size_t kv_heads = k.shape(1), max_len = k.shape(2);
  for (int i = 0; i < 4; ++i)
    if (k.shape(i) != v.shape(i))
      throw std::invalid_argument("k_cache and v_cache must have the same shape");
  if (static_cast<std::size_t>(k.shape(0)) != batch || static_cast<std::size_t>(k.shape(3)) != dim)
    throw std::invalid_argument("k_cache: expected [batch, kv_heads, max_len, head_dim] "
                                "matching q [batch, heads, head_dim]");
  if (kv_heads == 0 || heads % kv_heads != 0)
    throw std::invalid_argument("heads must be a multiple of kv_heads");
  if (static_cast<std::size_t>(pad.shape(0)) != batch)
    throw std::invalid_argument("pad: one entry per batch row expected");
  if (length == 0 || length > max_len)
    throw std::invalid_argument("length must be in [1, max_len]");
  py::array_t<float> out({batch, heads, dim});
  // The contiguous cache is a pool of one block a row, max_len positions long.
  std::vector<int32_t> table(batch);
  std::vector<int64_t> lengths(batch, static_cast<int64_t>(length));
  for (std::size_t b = 0; b < batch; ++b) table[b] = static_cast<int32_t>(b);
  KvBlocks kv;
  kv.k = const_cast<void*>(k.data());
  kv.v = const_cast<void*>(v.data());
  kv.type = k.itemsize() == 2 ? KvType::F16 : KvType::F32;
  kv.block_size = max_len;
  kv.max_blocks = 1;
  kv.table = table.data();
  py::gil_scoped_release release;
  decode_attention(data_of<float>(q), kv, static_cast<const int64_t*>(pad.data()),
                   lengths.data(), batch, heads, kv_heads, dim, scaling, out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, mod) {
  mod.doc() = "r3mes native CPU kernels (ternary GEMV/GEMM, activation quantisation, DoRA mix)";
  mod.def("info", &info, "Version, compiled and supported SIMD levels, CPU features, threads.");
  mod.def("get_simd_level", [] { return std::string(simd_level_name(active_simd_level())); });
  mod.def("set_simd_level", [](const std::string& name) { set_simd_level(parse_simd_level(name)); },
          py::arg("level"), "Force a SIMD level (scalar, avx2, avx512, avx512vnni).");
  mod.def("get_num_threads", &get_num_threads);
  mod.def("set_num_threads", &set_num_threads, py::arg("n"),
          "Threads used by the kernels; n <= 0 restores the default (number of cores).");
  mod.def("packed_row_bytes", [](std::size_t k) { return packed_row_bytes(k); }, py::arg("k"));
  mod.def("quantize_activations", &py_quantize_activations, py::arg("x"),
          "Per-token absmax int8 quantisation of float32 [M, K]: returns (q int8 [M, K], scale [M]).");
  mod.def("set_amx_enabled", &set_amx_enabled, py::arg("enabled"),
          "Let prefill GEMMs (16+ tokens) use AMX where the CPU and OS allow it (default on; "
          "R3MES_AMX=0 starts with it off). For tests and A/B measurements.");
  mod.def("weight_buffer", &weight_buffer, py::arg("rows"), py::arg("row_bytes"),
          "A zeroed uint8 [rows, row_bytes] buffer for weights, on 2 MiB pages when it is "
          "at least 2 MiB (decode streams weights; see csrc/common/huge_pages.h).");
  mod.def("pack_ternary", &py_pack_ternary, py::arg("ternary"),
          "Pack int8 ternary values [N, K] into the 2-bit g256 layout [N, packed_row_bytes(K)].");
  mod.def("quantize_pack_ternary", &py_quantize_pack_ternary, py::arg("weight"), py::arg("scale"),
          "Quantise float32 weights with an absmean scale and pack them.");
  mod.def("unpack_ternary", &py_unpack_ternary, py::arg("packed"), py::arg("k"));
  mod.def("ternary_gemm_int", &py_ternary_gemm_int, py::arg("q"), py::arg("packed"), py::arg("k"),
          "Exact int32 q [M, K] x ternary^T -> [M, N].");
  mod.def("ternary_linear", &py_ternary_linear, py::arg("x"), py::arg("packed"), py::arg("k"),
          py::arg("w_scale"), py::arg("bias") = py::none(),
          "float32 x [M, K] -> quantise -> ternary GEMM -> y [M, N] = acc / (s_x * s_w) (+ bias).");
  mod.def("quantize_int8_weight", &py_quantize_int8_weight, py::arg("weight"),
          "Per-row absmax int8 weights for the 8-bit layers (LM head): returns "
          "(int8 [N, K padded to 64], scale [N], row_sums int32 [N]).");
  mod.def("int8_linear", &py_int8_linear, py::arg("x"), py::arg("weight"), py::arg("weight_scale"),
          py::arg("row_sums"), py::arg("k"),
          "float32 x [M, K] -> int8 activations x int8 weights -> y = acc / (s_x * s_w[n]).");
  mod.def("decode_attention", &py_decode_attention, py::arg("q"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("pad"), py::arg("length"), py::arg("scaling"),
          "Single-token GQA attention over a float32 KV cache [B, KV, S_max, D].");
  register_dora_bindings(mod);
  register_decode_layer_bindings(mod);
  register_head_bindings(mod);
  register_text_bindings(mod);
}
