#pragma once
// Fused multi-expert DoRA kernels (see DESIGN.md, "DoRA contract").
#include <pybind11/pybind11.h>

namespace r3mes {
void register_dora_bindings(pybind11::module_& mod);
}
