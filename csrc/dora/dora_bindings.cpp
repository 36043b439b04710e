// Python bindings of the DoRA kernels (numpy buffers in and out, no libtorch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
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

// A validated mix: adapters all of [n, k], mix [rows, E] finite, base_weight [rows].
struct CheckedMix {
  py::array mix, base_weight;  // keep the buffers the pointers point into
  const float* mix_ptr = nullptr;
  const float* base_weight_ptr = nullptr;
  std::size_t rows = 0;
};

// tokens: the call's token count (mix has 1 row or one per token), 0 for any row count.
CheckedMix check_mix(const std::vector<const DoraAdapter*>& adapters, std::size_t n,
                     std::size_t k, const py::array& mix, const py::object& base_weight,
                     std::size_t tokens) {
  const std::size_t e = adapters.size();
  for (std::size_t i = 0; i < e; ++i) {
    if (adapters[i] == nullptr) throw std::invalid_argument("adapters: None in the list");
    check_dim(adapters[i]->in, k, "adapter " + std::to_string(i) + " in_features");
    check_dim(adapters[i]->out, n, "adapter " + std::to_string(i) + " out_features");
  }
  CheckedMix c;
  c.mix = mix;
  check_array<float>(mix, "mix", 2);
  c.rows = mix.shape(0);
  check_dim(mix.shape(1), e, "mix columns (number of adapters)");
  if (tokens != 0 && c.rows != 1 && c.rows != tokens)
    throw std::invalid_argument("mix: expected 1 row or one per token (" +
                                std::to_string(tokens) + "), got " + std::to_string(c.rows));
  if (c.rows == 0) throw std::invalid_argument("mix: has no rows");
  c.mix_ptr = data_of<float>(mix);
  for (std::size_t i = 0; i < c.rows * e; ++i)
    if (!std::isfinite(c.mix_ptr[i])) throw std::invalid_argument("mix: contains NaN or Inf");
  if (!base_weight.is_none()) {
    c.base_weight = py::array::ensure(base_weight);
    check_array<float>(c.base_weight, "base_weight", 1);
    check_dim(c.base_weight.shape(0), c.rows, "base_weight length (rows of mix)");
    c.base_weight_ptr = data_of<float>(c.base_weight);
    for (std::size_t i = 0; i < c.rows; ++i)
      if (!std::isfinite(c.base_weight_ptr[i]))
        throw std::invalid_argument("base_weight: NaN or Inf");
  }
  return c;
}

// The call shared by both entry points, after their own checks of x (a 2-D float32 array),
// the packed weight and the mix.
py::array_t<float> run_dora_linear(const py::array& x, const py::array& packed, std::size_t k,
                                   float w_scale, const py::object& bias,
                                   const std::vector<const DoraAdapter*>& adapters,
                                   const float* mix, const float* base_weight,
                                   std::size_t mix_rows, const float* base_factor) {
  check_dim(x.shape(1), k, "x features (in_features)");
  check_w_scale(w_scale);
  const std::size_t m = x.shape(0), n = packed.shape(0);
  py::array bias_arr;
  const float* bias_ptr = optional_bias(bias, n, bias_arr);
  py::array_t<float> out({m, n});
  if (m == 0) return out;
  const float* xp = data_of<float>(x);
  const uint8_t* pp = data_of<uint8_t>(packed);
  float* op = out.mutable_data();
  bool ok;
  {
    py::gil_scoped_release release;
    ok = dora_linear(xp, m, k, pp, n, w_scale, bias_ptr, adapters, mix, base_weight, mix_rows,
                     op, active_simd_level(), base_factor);
  }
  if (!ok) throw std::invalid_argument("x: activations contain NaN or Inf");
  return out;
}

py::array_t<float> py_dora_linear(const py::array& x, const py::array& packed, std::size_t k,
                                  float w_scale, const py::object& bias,
                                  const std::vector<const DoraAdapter*>& adapters,
                                  const py::array& mix, const py::object& base_weight) {
  check_array<float>(x, "x", 2);
  check_packed_k(packed, k);
  const CheckedMix cm = check_mix(adapters, packed.shape(0), k, mix, base_weight, x.shape(0));
  return run_dora_linear(x, packed, k, w_scale, bias, adapters, cm.mix_ptr,
                         cm.base_weight_ptr, cm.rows, nullptr);
}

// A mix fixed for many calls (see dora_base_factor): validated and summed once.
struct PyDoraMixPlan {
  std::vector<const DoraAdapter*> adapters;
  py::list keep;  // the adapters' Python objects, so the pointers stay valid
  std::vector<float> mix, base_weight, base_factor;
  std::size_t rows = 0, in = 0, out = 0;
};

PyDoraMixPlan make_plan(const py::list& adapter_list, const py::array& mix,
                        const py::object& base_weight) {
  PyDoraMixPlan plan;
  for (const py::handle& h : adapter_list) plan.adapters.push_back(h.cast<const DoraAdapter*>());
  if (plan.adapters.empty() || plan.adapters[0] == nullptr)
    throw std::invalid_argument("adapters: a prepared mix needs at least one adapter");
  plan.keep = adapter_list;
  plan.in = plan.adapters[0]->in;
  plan.out = plan.adapters[0]->out;
  const CheckedMix cm = check_mix(plan.adapters, plan.out, plan.in, mix, base_weight, 0);
  plan.rows = cm.rows;
  plan.mix.assign(cm.mix_ptr, cm.mix_ptr + cm.rows * plan.adapters.size());
  if (cm.base_weight_ptr != nullptr)
    plan.base_weight.assign(cm.base_weight_ptr, cm.base_weight_ptr + cm.rows);
  plan.base_factor = dora_base_factor(plan.adapters, plan.mix.data(), cm.base_weight_ptr,
                                      plan.rows);
  return plan;
}

py::array_t<float> py_dora_mix_linear(const py::array& x, const py::array& packed,
                                      std::size_t k, float w_scale, const py::object& bias,
                                      const PyDoraMixPlan& plan) {
  check_array<float>(x, "x", 2);
  check_packed_k(packed, k);
  check_dim(plan.in, k, "prepared mix in_features");
  check_dim(plan.out, packed.shape(0), "prepared mix out_features");
  const std::size_t m = x.shape(0);
  if (plan.rows != 1 && plan.rows != m)
    throw std::invalid_argument("mix: prepared for " + std::to_string(plan.rows) +
                                " rows, x has " + std::to_string(m) + " tokens");
  return run_dora_linear(x, packed, k, w_scale, bias, plan.adapters, plan.mix.data(),
                         plan.base_weight.empty() ? nullptr : plan.base_weight.data(), plan.rows,
                         plan.base_factor.data());
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
  check_w_scale(w_scale);
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
  py::class_<PyDoraMixPlan>(mod, "DoraMixPlan",
                            "A DoRA mix fixed for many calls: adapters, mix [rows, E], "
                            "base_weight [rows] or None, validated and the base factor summed "
                            "once (see csrc/dora/dora.h).")
      .def(py::init(&make_plan), py::arg("adapters"), py::arg("mix"),
           py::arg("base_weight") = py::none())
      .def_readonly("rows", &PyDoraMixPlan::rows)
      .def_readonly("in_features", &PyDoraMixPlan::in)
      .def_readonly("out_features", &PyDoraMixPlan::out)
      .def_property_readonly("base_factor", [](const PyDoraMixPlan& p) {
        py::array_t<float> out({p.rows, p.out});
        std::copy(p.base_factor.begin(), p.base_factor.end(), out.mutable_data());
        return out;
      }, "base_weight + sum_e w_e g_e per row (1 for a row with no adapter): [rows, out].");
  mod.def("dora_mix_linear", &py_dora_mix_linear, py::arg("x"), py::arg("packed"),
          py::arg("k"), py::arg("w_scale"), py::arg("bias"), py::arg("plan"),
          "Fused DoRA mix with a prepared DoraMixPlan: x [M, K] -> y [M, N].");
  mod.def("ternary_float_matmul", &py_ternary_float_matmul, py::arg("packed"), py::arg("k"),
          py::arg("a"), "T . a^T for float32 a [R, K] -> [N, R] (ternary values, no s_w).");
  mod.def("dora_row_norms", &py_dora_row_norms, py::arg("packed"), py::arg("k"),
          py::arg("w_scale"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
          "Factored ||W0 + s B A||_row as float64 [N].");
  mod.def("fp16_round", &py_fp16_round, py::arg("x"),
          "float32 -> fp16 -> float32 with the kernels' conversion (for tests).");
}

}  // namespace r3mes
