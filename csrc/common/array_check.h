#pragma once
// Validation of the numpy buffers handed to the native module: every failure is
// a ValueError naming the argument and what is wrong, never a crash.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace r3mes {
namespace py = pybind11;

template <class T>
inline const char* dtype_name();
template <> inline const char* dtype_name<float>() { return "float32"; }
template <> inline const char* dtype_name<int8_t>() { return "int8"; }
template <> inline const char* dtype_name<uint8_t>() { return "uint8"; }
template <> inline const char* dtype_name<int32_t>() { return "int32"; }
template <> inline const char* dtype_name<int64_t>() { return "int64"; }

template <class T>
inline void check_array(const py::array& a, const char* name, int ndim) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw std::invalid_argument(std::string(name) + ": expected dtype " + dtype_name<T>() +
                                ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) +
                                "-D array, got " + std::to_string(a.ndim()) + "-D");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": must be C-contiguous");
}

// A packed weight [out, row_bytes] for in_features k: uint8, 2-D, C-contiguous, and rows of
// exactly `row_bytes` (the layout's padded length for k).
inline void check_packed_rows(const py::array& packed, std::size_t k, std::size_t row_bytes) {
  check_array<uint8_t>(packed, "packed", 2);
  if (k == 0) throw std::invalid_argument("in_features must be > 0");
  if (static_cast<std::size_t>(packed.shape(1)) != row_bytes)
    throw std::invalid_argument("packed: rows of " + std::to_string(packed.shape(1)) +
                                " bytes do not match in_features=" + std::to_string(k) +
                                " (expected " + std::to_string(row_bytes) + ")");
}

template <class T>
inline const T* data_of(const py::array& a) {
  return static_cast<const T*>(a.data());
}

// A ternary weight's scale s_w (y = acc / (s_x * s_w)).
inline void check_w_scale(float w_scale) {
  if (!(w_scale > 0.0f) || !(w_scale <= 3.4028235e38f))
    throw std::invalid_argument("w_scale must be a positive finite number");
}

// An optional float32 bias [n]: nullptr for None. `keep` holds the converted array alive.
inline const float* optional_bias(const py::object& bias, std::size_t n, py::array& keep) {
  if (bias.is_none()) return nullptr;
  keep = py::array::ensure(bias);
  check_array<float>(keep, "bias", 1);
  if (static_cast<std::size_t>(keep.shape(0)) != n)
    throw std::invalid_argument("bias: length " + std::to_string(keep.shape(0)) +
                                " does not match out_features=" + std::to_string(n));
  return data_of<float>(keep);
}

}  // namespace r3mes
