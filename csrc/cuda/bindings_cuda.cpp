// r3mes._native_cuda: the CUDA kernels. The module never links libtorch: device
// buffers arrive as integer addresses (torch's tensor.data_ptr()) with their
// shapes, and work is queued on the stream handle the caller passes
// (torch.cuda.current_stream().cuda_stream). src/r3mes/kernels/cuda.py owns the
// tensors and checks dtypes and devices; this layer re-checks what would
// otherwise crash (null or misaligned pointers, sizes) and raises ValueError
// before any launch. CUDA failures raise RuntimeError with the CUDA error string.
//
// Host-only entry points (repack_ternary, unpack_ternary, emulate_*) work on
// machines without a GPU.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "common/array_check.h"
#include "cuda/device_info.h"
#include "cuda/emulate.h"
#include "cuda/kernels.h"
#include "cuda/layout.h"

namespace py = pybind11;

#ifndef R3MES_VERSION
#define R3MES_VERSION "dev"
#endif

namespace r3mes::cuda {
namespace {

using Ptr = std::uintptr_t;
// (a, b, g, rank, coef, half): one adapter in device storage (see epilogue.cuh).
using AdapterTuple = std::tuple<Ptr, Ptr, Ptr, int, float, bool>;

template <class T>
T* device_ptr(Ptr p, const char* name, bool required, std::size_t align = alignof(T)) {
  if (p == 0) {
    if (required) throw std::invalid_argument(std::string(name) + ": null device pointer");
    return nullptr;
  }
  if (p % align != 0)
    throw std::invalid_argument(std::string(name) + ": device pointer not aligned to " +
                                std::to_string(align) + " bytes");
  return reinterpret_cast<T*>(p);
}

void check_sizes(std::int64_t m, std::int64_t n, std::int64_t k) {
  if (m < 0) throw std::invalid_argument("M (tokens) must be >= 0, got " + std::to_string(m));
  if (m > kMaxTokens)
    throw std::invalid_argument("M (tokens) must be <= " + std::to_string(kMaxTokens) + ", got " +
                                std::to_string(m));
  if (n <= 0 || n > 0x7fffffffLL)
    throw std::invalid_argument("N (out_features) must be in [1, 2^31), got " + std::to_string(n));
  if (k <= 0 || k > kMaxInFeatures)
    throw std::invalid_argument("K (in_features) must be in [1, " +
                                std::to_string(kMaxInFeatures) + "], got " + std::to_string(k));
}

GemmKernel parse_kernel(const std::string& kernel) {
  if (kernel == "auto") return GemmKernel::Auto;
  if (kernel == "gemv") return GemmKernel::Gemv;
  if (kernel == "mma") return GemmKernel::Mma;
  throw std::invalid_argument("kernel: expected 'auto', 'gemv' or 'mma', got '" + kernel + "'");
}

const char* kernel_name(GemmKernel k) { return k == GemmKernel::Mma ? "mma" : "gemv"; }

void* stream_of(Ptr s) { return reinterpret_cast<void*>(s); }

// ---- host ------------------------------------------------------------------

py::array_t<uint8_t> py_repack(const py::array& t) {
  check_array<int8_t>(t, "ternary", 2);
  const std::size_t n = t.shape(0), k = t.shape(1);
  if (n == 0 || k == 0) throw std::invalid_argument("ternary: empty matrix");
  py::array_t<uint8_t> out({n, packed_row_bytes(k)});
  const std::ptrdiff_t bad = repack_ternary(data_of<int8_t>(t), n, k, out.mutable_data());
  if (bad >= 0)
    throw std::invalid_argument(
        "ternary: value " + std::to_string(static_cast<int>(data_of<int8_t>(t)[bad])) +
        " at [" + std::to_string(bad / static_cast<std::ptrdiff_t>(k)) + ", " +
        std::to_string(bad % static_cast<std::ptrdiff_t>(k)) + "] is not in {-1, 0, 1}");
  return out;
}

void check_packed(const py::array& packed, std::size_t k) {
  check_packed_rows(packed, k, packed_row_bytes(k));
}

py::array_t<int8_t> py_unpack(const py::array& packed, std::size_t k) {
  check_packed(packed, k);
  const std::size_t n = packed.shape(0);
  py::array_t<int8_t> out({n, k});
  unpack_ternary(data_of<uint8_t>(packed), n, k, out.mutable_data());
  return out;
}

py::array_t<int32_t> py_emulate(const py::array& q, const py::array& qsum, const py::array& packed,
                                std::size_t k, const std::string& kernel) {
  check_array<int8_t>(q, "q", 2);
  check_array<int32_t>(qsum, "qsum", 1);
  check_packed(packed, k);
  const std::size_t m = q.shape(0), n = packed.shape(0);
  if (static_cast<std::size_t>(q.shape(1)) != padded_k(k))
    throw std::invalid_argument("q: rows must be padded_k(in_features) = " +
                                std::to_string(padded_k(k)) + " bytes");
  if (static_cast<std::size_t>(qsum.shape(0)) != m)
    throw std::invalid_argument("qsum: expected one value per row of q");
  const GemmKernel kind = parse_kernel(kernel);
  py::array_t<int32_t> out({m, n});
  if (m == 0 || n == 0) return out;
  if (kind == GemmKernel::Mma) {
    emulate_mma(data_of<int8_t>(q), data_of<int32_t>(qsum), m, data_of<uint8_t>(packed), n, k,
                out.mutable_data());
  } else {
    emulate_gemv(data_of<int8_t>(q), data_of<int32_t>(qsum), m, data_of<uint8_t>(packed), n, k,
                 out.mutable_data());
  }
  return out;
}

// ---- device ------------------------------------------------------------------

DoraEpilogue make_dora(const std::vector<AdapterTuple>& adapters, Ptr mix, std::int64_t mix_rows,
                       Ptr base_weight, Ptr z, std::int64_t m) {
  DoraEpilogue d;
  if (adapters.empty()) return d;
  if (adapters.size() > static_cast<std::size_t>(kMaxAdapters))
    throw std::invalid_argument("adapters: at most " + std::to_string(kMaxAdapters) +
                                " per call, got " + std::to_string(adapters.size()));
  if (mix_rows != 1 && mix_rows != m)
    throw std::invalid_argument("mix: expected 1 row or one per token (" + std::to_string(m) +
                                "), got " + std::to_string(mix_rows));
  d.E = static_cast<int>(adapters.size());
  d.mix_rows = static_cast<int>(mix_rows);
  d.mix = device_ptr<const float>(mix, "mix", true);
  d.base_w = device_ptr<const float>(base_weight, "base_weight", false);
  d.z = device_ptr<float>(z, "z (workspace)", true);
  int off = 0;
  for (std::size_t e = 0; e < adapters.size(); ++e) {
    const auto& [a, b, g, rank, coef, half] = adapters[e];
    const std::string name = "adapters[" + std::to_string(e) + "]";
    if (rank <= 0) throw std::invalid_argument(name + ": rank must be > 0");
    const std::size_t elt = half ? 2 : 4;
    DoraAdapterDev& ad = d.ad[e];
    ad.a = device_ptr<const void>(a, (name + ".A").c_str(), true, elt);
    ad.b = device_ptr<const void>(b, (name + ".B").c_str(), true, elt);
    ad.g = device_ptr<const float>(g, (name + ".g").c_str(), true);
    ad.rank = rank;
    ad.half = half ? 1 : 0;
    ad.coef = coef;
    ad.z_off = off;
    off += rank;
  }
  d.z_cols = off;
  return d;
}

void py_quantize(Ptr x, std::int64_t m, std::int64_t k, Ptr q, Ptr x_scale, Ptr qsum, Ptr stream) {
  check_sizes(m, 1, k);
  DoraEpilogue none;
  const float* xp = device_ptr<const float>(x, "x", true);
  int8_t* qp = device_ptr<int8_t>(q, "q", true, 16);
  float* sp = device_ptr<float>(x_scale, "x_scale", true);
  int32_t* sum = device_ptr<int32_t>(qsum, "qsum", true);
  py::gil_scoped_release release;
  quantize_activations(xp, m, k, qp, sp, sum, none, stream_of(stream));
}

GemmArgs gemm_args(Ptr q, Ptr qsum, Ptr x_scale, Ptr packed, std::int64_t m, std::int64_t n,
                   std::int64_t k, float w_scale, Ptr bias, Ptr out_f32, Ptr out_i32) {
  check_sizes(m, n, k);
  GemmArgs a;
  a.packed = device_ptr<const uint8_t>(packed, "packed", true, 16);
  a.q = device_ptr<const int8_t>(q, "q", true, 16);
  a.qsum = device_ptr<const int32_t>(qsum, "qsum", true);
  a.M = m;
  a.N = n;
  a.K = k;
  a.w_scale = w_scale;
  a.bias = device_ptr<const float>(bias, "bias", false);
  a.out_f32 = device_ptr<float>(out_f32, "out", false);
  a.out_i32 = device_ptr<int32_t>(out_i32, "out_i32", false);
  if ((a.out_f32 == nullptr) == (a.out_i32 == nullptr))
    throw std::invalid_argument("exactly one of out (float32) and out_i32 (int32) must be given");
  if (a.out_f32 != nullptr) {
    a.x_scale = device_ptr<const float>(x_scale, "x_scale", true);
    if (!(w_scale > 0.0f) || !(w_scale < 3.0e38f))
      throw std::invalid_argument("w_scale must be a positive finite number");
  }
  return a;
}

std::string py_gemm(Ptr q, Ptr qsum, Ptr x_scale, Ptr packed, std::int64_t m, std::int64_t n,
                    std::int64_t k, float w_scale, Ptr bias, Ptr out_f32, Ptr out_i32, Ptr stream,
                    const std::string& kernel) {
  GemmArgs a = gemm_args(q, qsum, x_scale, packed, m, n, k, w_scale, bias, out_f32, out_i32);
  const GemmKernel kind = parse_kernel(kernel);
  GemmKernel used;
  {
    py::gil_scoped_release release;
    used = ternary_gemm(a, kind, stream_of(stream));
  }
  return kernel_name(used);
}

std::string py_dora_linear(Ptr x, Ptr q, Ptr x_scale, Ptr qsum, Ptr z, Ptr packed, std::int64_t m,
                           std::int64_t n, std::int64_t k, float w_scale, Ptr bias,
                           const std::vector<AdapterTuple>& adapters, Ptr mix,
                           std::int64_t mix_rows, Ptr base_weight, Ptr out, Ptr stream,
                           const std::string& kernel) {
  GemmArgs a = gemm_args(q, qsum, x_scale, packed, m, n, k, w_scale, bias, out, 0);
  a.dora = make_dora(adapters, mix, mix_rows, base_weight, z, m);
  const float* xp = device_ptr<const float>(x, "x", true);
  const GemmKernel kind = parse_kernel(kernel);
  GemmKernel used;
  {
    py::gil_scoped_release release;
    quantize_activations(xp, m, k, const_cast<int8_t*>(a.q), const_cast<float*>(a.x_scale),
                         const_cast<int32_t*>(a.qsum), a.dora, stream_of(stream));
    used = ternary_gemm(a, kind, stream_of(stream));
  }
  return kernel_name(used);
}

void py_row_norms(Ptr packed, std::int64_t n, std::int64_t k, float w_scale, Ptr a, Ptr b,
                  std::int64_t rank, float scaling, Ptr gram, Ptr norms, Ptr stream) {
  check_sizes(0, n, k);
  if (rank <= 0 || rank > 65535)
    throw std::invalid_argument("rank must be in [1, 65535], got " + std::to_string(rank));
  if (!(w_scale > 0.0f) || !(w_scale < 3.0e38f))
    throw std::invalid_argument("w_scale must be a positive finite number");
  const uint8_t* pp = device_ptr<const uint8_t>(packed, "packed", true, 16);
  const float* ap = device_ptr<const float>(a, "lora_A", true);
  const float* bp = device_ptr<const float>(b, "lora_B", true);
  double* gp = device_ptr<double>(gram, "gram (workspace)", true);
  double* np_ = device_ptr<double>(norms, "norms", true);
  py::gil_scoped_release release;
  dora_row_norms(pp, n, k, w_scale, ap, bp, rank, scaling, gp, np_, stream_of(stream));
}

std::vector<int> py_compiled_architectures() {
  int archs[32];
  const int n = compiled_architectures(archs, 32);
  return std::vector<int>(archs, archs + std::min(n, 32));
}

}  // namespace
}  // namespace r3mes::cuda

PYBIND11_MODULE(_native_cuda, mod) {
  using namespace r3mes::cuda;
  mod.doc() = "r3mes native CUDA kernels (device pointers in, no libtorch)";
  mod.def("device_count", &device_count,
          "Number of CUDA devices visible (0 when no driver or GPU).");
  mod.def("compiled_architectures", &py_compiled_architectures,
          "Compute capabilities the module carries code for, e.g. [80, 90].");
  mod.def("padded_k", [](std::size_t k) { return padded_k(k); }, py::arg("k"),
          "Activation / weight row length after padding (multiple of 64).");
  mod.def("packed_row_bytes", [](std::size_t k) { return packed_row_bytes(k); }, py::arg("k"),
          "Bytes of one packed weight row in the GPU layout (csrc/cuda/layout.h).");
  mod.attr("max_adapters") = kMaxAdapters;
  mod.attr("max_in_features") = kMaxInFeatures;
  mod.attr("max_tokens") = kMaxTokens;

  mod.def("repack_ternary", &py_repack, py::arg("ternary"),
          "int8 ternary [N, K] (values -1/0/1) -> uint8 [N, packed_row_bytes(K)] in the GPU "
          "layout (host).");
  mod.def("unpack_ternary", &py_unpack, py::arg("packed"), py::arg("k"),
          "Inverse of repack_ternary (host).");
  mod.def("emulate_gemm_int", &py_emulate, py::arg("q"), py::arg("qsum"), py::arg("packed"),
          py::arg("k"), py::arg("kernel"),
          "Host emulation of the 'gemv' or 'mma' kernel's per-lane program: int32 [M, N] from "
          "q int8 [M, padded_k(K)], qsum int32 [M] and GPU-packed weights (for tests).");

  mod.def("quantize_activations", &py_quantize, py::arg("x"), py::arg("m"), py::arg("k"),
          py::arg("q"), py::arg("x_scale"), py::arg("qsum"), py::arg("stream"),
          "x fp32 [M, K] -> q int8 [M, padded_k(K)], x_scale fp32 [M], qsum int32 [M] (device "
          "pointers). NaN/Inf tokens get x_scale = NaN and q = 0.");
  mod.def("ternary_gemm", &py_gemm, py::arg("q"), py::arg("qsum"), py::arg("x_scale"),
          py::arg("packed"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("w_scale"),
          py::arg("bias"), py::arg("out"), py::arg("out_i32"), py::arg("stream"),
          py::arg("kernel") = "auto",
          "out fp32 [M, N] = (q . T^T) / (x_scale * w_scale) (+ bias), or out_i32 = q . T^T. "
          "Pointers as integers (0 = none). Returns the kernel used ('gemv' or 'mma').");
  mod.def("dora_linear", &py_dora_linear, py::arg("x"), py::arg("q"), py::arg("x_scale"),
          py::arg("qsum"), py::arg("z"), py::arg("packed"), py::arg("m"), py::arg("n"),
          py::arg("k"), py::arg("w_scale"), py::arg("bias"), py::arg("adapters"), py::arg("mix"),
          py::arg("mix_rows"), py::arg("base_weight"), py::arg("out"), py::arg("stream"),
          py::arg("kernel") = "auto",
          "Fused DoRA mix (csrc/dora/dora.h): quantises x, runs the A pass into z [M, sum of "
          "ranks], then the ternary GEMM with the DoRA epilogue into out fp32 [M, N]. adapters: "
          "list of (A, B, g, rank, coef, is_fp16).");
  mod.def("dora_row_norms", &py_row_norms, py::arg("packed"), py::arg("n"), py::arg("k"),
          py::arg("w_scale"), py::arg("lora_A"), py::arg("lora_B"), py::arg("rank"),
          py::arg("scaling"), py::arg("gram"), py::arg("norms"), py::arg("stream"),
          "Factored ||W0 + s B A||_row into norms fp64 [N]; lora_A fp32 [rank, K], lora_B fp32 "
          "[N, rank], gram fp64 [rank, rank] workspace.");
  mod.attr("version") = R3MES_VERSION;
}
