// Python bindings of the 4-bit LM head (numpy buffers in and out, no libtorch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common/array_check.h"
#include "common/cpu_features.h"
#include "common/huge_pages.h"
#include "head/int4_gemm.h"
#include "ternary/quantized_acts.h"

namespace py = pybind11;

namespace r3mes {
namespace {

void check_group(std::size_t group) {
  if (!int4_group_supported(group))
    throw std::invalid_argument("group: expected 64 or 128, got " + std::to_string(group));
}

void check_k(std::size_t k) {
  if (k == 0 || k > kInt4MaxK)
    throw std::invalid_argument("in_features: a 4-bit head takes 1.." + std::to_string(kInt4MaxK) +
                                " features (exact int32 sums), got " + std::to_string(k));
}

py::tuple py_quantize_int4_weight(const py::array& w, std::size_t group,
                                  const py::object& importance) {
  check_array<float>(w, "weight", 2);
  check_group(group);
  const std::size_t n = w.shape(0), k = w.shape(1);
  if (n == 0) throw std::invalid_argument("weight: must not be empty");
  check_k(k);
  py::array imp;
  const float* imp_ptr = nullptr;
  if (!importance.is_none()) {
    imp = py::array::ensure(importance);
    check_array<float>(imp, "importance", 1);
    if (static_cast<std::size_t>(imp.shape(0)) != k)
      throw std::invalid_argument("importance: length " + std::to_string(imp.shape(0)) +
                                  " does not match in_features=" + std::to_string(k));
    imp_ptr = data_of<float>(imp);
    for (std::size_t i = 0; i < k; ++i)
      if (!(imp_ptr[i] >= 0.0f && imp_ptr[i] <= 3.4028235e38f))
        throw std::invalid_argument("importance: values must be finite and >= 0");
  }
  const std::size_t kp = int4_padded_k(k);
  py::array_t<uint8_t> packed = weight_buffer(n, kp / 2);  // read on every token: huge pages
  py::array_t<uint8_t> sub({n, kp / group});
  py::array_t<float> scale(n);
  py::array_t<int32_t> offset(n);
  bool ok;
  {
    py::gil_scoped_release release;
    ok = quantize_int4_weight(data_of<float>(w), n, k, group, imp_ptr, packed.mutable_data(),
                              sub.mutable_data(), scale.mutable_data(), offset.mutable_data());
  }
  if (!ok) throw std::invalid_argument("weight: contains NaN or Inf");
  return py::make_tuple(packed, sub, scale, offset);
}

py::array_t<float> py_int4_linear(const py::array& x, const py::array& packed, const py::array& sub,
                                  const py::array& scale, const py::array& offset, std::size_t k,
                                  std::size_t group) {
  check_array<float>(x, "x", 2);
  check_array<uint8_t>(packed, "packed", 2);
  check_array<uint8_t>(sub, "group_scales", 2);
  check_array<float>(scale, "weight_scale", 1);
  check_array<int32_t>(offset, "offsets", 1);
  check_group(group);
  check_k(k);
  const std::size_t m = x.shape(0), n = packed.shape(0), kp = int4_padded_k(k);
  if (static_cast<std::size_t>(x.shape(1)) != k)
    throw std::invalid_argument("x: has " + std::to_string(x.shape(1)) +
                                " features, weight has in_features=" + std::to_string(k));
  if (static_cast<std::size_t>(packed.shape(1)) != kp / 2)
    throw std::invalid_argument("packed: rows of " + std::to_string(packed.shape(1)) +
                                " bytes, expected " + std::to_string(kp / 2) + " for in_features=" +
                                std::to_string(k));
  if (static_cast<std::size_t>(sub.shape(0)) != n ||
      static_cast<std::size_t>(sub.shape(1)) != kp / group)
    throw std::invalid_argument("group_scales: expected shape [" + std::to_string(n) + ", " +
                                std::to_string(kp / group) + "]");
  if (static_cast<std::size_t>(scale.shape(0)) != n || static_cast<std::size_t>(offset.shape(0)) != n)
    throw std::invalid_argument("weight_scale/offsets: length does not match out_features");
  py::array_t<float> out({m, n});
  if (m == 0) return out;
  Int4GemmArgs args{data_of<uint8_t>(packed), data_of<uint8_t>(sub), data_of<int32_t>(offset),
                    data_of<float>(scale), nullptr, nullptr, m, n, k, group, out.mutable_data()};
  const float* xp = data_of<float>(x);
  py::gil_scoped_release release;
  const QuantizedActs acts = quantize_rows(xp, m, k, kp);
  args.q = acts.q.data();
  args.x_scale = acts.scale.data();
  int4_gemm(args, active_simd_level());
  return out;
}

}  // namespace

void register_head_bindings(py::module_& mod) {
  mod.def("quantize_int4_weight", &py_quantize_int4_weight, py::arg("weight"), py::arg("group"),
          py::arg("importance") = py::none(),
          "Group-wise int4 quantisation of float32 [out, in]: (packed uint8 [out, Kp/2], "
          "group scales uint8 [out, Kp/group], weight_scale float32 [out], offsets int32 [out]).");
  mod.def("int4_linear", &py_int4_linear, py::arg("x"), py::arg("packed"),
          py::arg("group_scales"), py::arg("weight_scale"), py::arg("offsets"),
          py::arg("in_features"), py::arg("group"),
          "y = quant(x) . W4^T / (s_x * s_w) with exact int32 group sums -> float32 [M, out].");
}

}  // namespace r3mes
