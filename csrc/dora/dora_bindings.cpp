// Python bindings of the DoRA kernels (numpy buffers in and out, no libtorch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/array_check.h"
#include "common/cpu_features.h"
#include "dora/dora.h"
#include "ternary/ternary.h"

namespace py = pybind11;

namespace r3mes {
namespace {

void check_packed_k(const py::array& packed, std::size_t k) {
  check_packed_rows(packed, k, packed_row_bytes(k));
}

void check_dim(std::size_t got, std::size_t want, const std::string& what) {
  if (got != want)
    throw std::invalid_argument(what + ": got " + std::to_string(got) + ", expected " +
                                std::to_string(want));
}

DoraAdapter py_make_adapter(const py::array& a, const py::array& b, const py::array& g,
                            float scaling, const std::string& storage) {
  check_array<float>(a, "lora_A", 2);
  check_array<float>(b, "lora_B", 2);
  check_array<float>(g, "g", 1);
  const DoraStorage kind = parse_dora_storage(storage);
  const std::size_t rank = a.shape(0), in = a.shape(1), out = b.shape(0);
  check_dim(b.shape(1), rank, "lora_B columns (rank)");
  check_dim(g.shape(0), out, "g length (out_features)");
  py::gil_scoped_release release;
  return make_dora_adapter(data_of<float>(a), data_of<float>(b), data_of<float>(g), rank, in,
                           out, scaling, kind);
}

py::array_t<float> py_dora_linear(const py::array& x, const py::array& packed, std::size_t k,
                                  float w_scale, const py::object& bias,
                                  const std::vector<const DoraAdapter*>& adapters,
                                  const py::array& mix, const py::object& base_weight) {
  check_array<float>(x, "x", 2);
  check_packed_k(packed, k);
  check_dim(x.shape(1), k, "x features (in_features)");
  if (!(w_scale > 0.0f) || !std::isfinite(w_scale))
    throw std::invalid_argument("w_scale must be a positive finite number");
  const std::size_t m = x.shape(0), n = packed.shape(0), e = adapters.size();
  for (std::size_t i = 0; i < e; ++i) {
    if (adapters[i] == nullptr) throw std::invalid_argument("adapters: None in the list");
    check_dim(adapters[i]->in, k, "adapter " + std::to_string(i) + " in_features");
    check_dim(adapters[i]->out, n, "adapter " + std::to_string(i) + " out_features");
  }
  check_array<float>(mix, "mix", 2);
  const std::size_t mix_rows = mix.shape(0);
  check_dim(mix.shape(1), e, "mix columns (number of adapters)");
  if (mix_rows != 1 && mix_rows != m)
    throw std::invalid_argument("mix: expected 1 row or one per token (" + std::to_string(m) +
                                "), got " + std::to_string(mix_rows));
  const float* mp = data_of<float>(mix);
  for (std::size_t i = 0; i < mix_rows * e; ++i)
    if (!std::isfinite(mp[i])) throw std::invalid_argument("mix: contains NaN or Inf");
  const float* bias_ptr = nullptr;
  py::array bias_arr;
  if (!bias.is_none()) {
    bias_arr = py::array::ensure(bias);
    check_array<float>(bias_arr, "bias", 1);
    check_dim(bias_arr.shape(0), n, "bias length (out_features)");
    bias_ptr = data_of<float>(bias_arr);
  }
  const float* bw_ptr = nullptr;
  py::array bw_arr;
  if (!base_weight.is_none()) {
    bw_arr = py::array::ensure(base_weight);
    check_array<float>(bw_arr, "base_weight", 1);
    check_dim(bw_arr.shape(0), mix_rows, "base_weight length (rows of mix)");
    bw_ptr = data_of<float>(bw_arr);
    for (std::size_t i = 0; i < mix_rows; ++i)
      if (!std::isfinite(bw_ptr[i])) throw std::invalid_argument("base_weight: NaN or Inf");
  }
  py::array_t<float> out({m, n});
  if (m == 0) return out;
  const float* xp = data_of<float>(x);
  const uint8_t* pp = data_of<uint8_t>(packed);
  float* op = out.mutable_data();
  bool ok;
  {
    py::gil_scoped_release release;
    ok = dora_linear(xp, m, k, pp, n, w_scale, bias_ptr, adapters, mp, bw_ptr, mix_rows, op,
                     active_simd_level());
  }
  if (!ok) throw std::invalid_argument("x: activations contain NaN or Inf");
  return out;
}

py::array_t<float> py_ternary_float_matmul(const py::array& packed, std::size_t k,
                                           const py::array& a) {
  check_packed_k(packed, k);
  check_array<float>(a, "a", 2);
  check_dim(a.shape(1), k, "a columns (in_features)");
  const std::size_t n = packed.shape(0), r = a.shape(0);
  py::array_t<float> out({n, r});
  const uint8_t* pp = data_of<uint8_t>(packed);
  const float* ap = data_of<float>(a);
  float* op = out.mutable_data();
  py::gil_scoped_release release;
  ternary_float_matmul(pp, n, k, ap, r, op, active_simd_level());
  return out;
}

py::array_t<double> py_dora_row_norms(const py::array& packed, std::size_t k, float w_scale,
                                      const py::array& a, const py::array& b, float scaling) {
  check_packed_k(packed, k);
  check_array<float>(a, "lora_A", 2);
  check_array<float>(b, "lora_B", 2);
  const std::size_t n = packed.shape(0), r = a.shape(0);
  check_dim(a.shape(1), k, "lora_A columns (in_features)");
  check_dim(b.shape(0), n, "lora_B rows (out_features)");
  check_dim(b.shape(1), r, "lora_B columns (rank)");
  if (!(w_scale > 0.0f) || !std::isfinite(w_scale))
    throw std::invalid_argument("w_scale must be a positive finite number");
  py::array_t<double> out(n);
  const uint8_t* pp = data_of<uint8_t>(packed);
  const float* ap = data_of<float>(a);
  const float* bp = data_of<float>(b);
  double* op = out.mutable_data();
  py::gil_scoped_release release;
  dora_row_norms(pp, n, k, w_scale, ap, r, bp, scaling, op, active_simd_level());
  return out;
}

py::array_t<float> py_fp16_round(const py::array& x) {
  check_array<float>(x, "x", 1);
  const std::size_t n = x.shape(0);
  py::array_t<float> out(n);
  const float* xp = data_of<float>(x);
  float* op = out.mutable_data();
  for (std::size_t i = 0; i < n; ++i) op[i] = half_to_float(float_to_half(xp[i]));
  return out;
}

}  // namespace

void register_dora_bindings(py::module_& mod) {
  py::class_<DoraAdapter>(mod, "DoraAdapter",
                          "One DoRA adapter in the fused kernel's storage (see csrc/dora/dora.h).")
      .def_readonly("rank", &DoraAdapter::rank)
      .def_readonly("in_features", &DoraAdapter::in)
      .def_readonly("out_features", &DoraAdapter::out)
      .def_readonly("scaling", &DoraAdapter::scaling)
      .def_readonly("a_scale", &DoraAdapter::a_scale)
      .def_readonly("b_scale", &DoraAdapter::b_scale)
      .def_property_readonly("storage",
                             [](const DoraAdapter& a) { return dora_storage_name(a.storage); })
      .def_property_readonly("nbytes", &DoraAdapter::nbytes);
  mod.def("dora_adapter", &py_make_adapter, py::arg("lora_A"), py::arg("lora_B"), py::arg("g"),
          py::arg("scaling"), py::arg("storage") = "fp16",
          "Prepare an adapter for the fused kernel: lora_A [r, in], lora_B [out, r], g [out] "
          "(float32), scaling s; storage 'fp16' (compact), 'int8' (smallest) or 'fp32' (exact).");
  mod.def("dora_linear", &py_dora_linear, py::arg("x"), py::arg("packed"), py::arg("k"),
          py::arg("w_scale"), py::arg("bias"), py::arg("adapters"), py::arg("mix"),
          py::arg("base_weight") = py::none(),
          "Fused DoRA mix: x [M, K] -> y [M, N]; mix [1 or M, E] weights per token, "
          "base_weight [1 or M] the weight of the bare base output.");
  mod.def("ternary_float_matmul", &py_ternary_float_matmul, py::arg("packed"), py::arg("k"),
          py::arg("a"), "T . a^T for float32 a [R, K] -> [N, R] (ternary values, no s_w).");
  mod.def("dora_row_norms", &py_dora_row_norms, py::arg("packed"), py::arg("k"),
          py::arg("w_scale"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
          "Factored ||W0 + s B A||_row as float64 [N].");
  mod.def("fp16_round", &py_fp16_round, py::arg("x"),
          "float32 -> fp16 -> float32 with the kernels' conversion (for tests).");
}

}  // namespace r3mes
