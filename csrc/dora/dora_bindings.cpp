// DoRA kernels are added by the DoRA issue; this registers their bindings.
#include "dora/dora.h"

namespace r3mes {
void register_dora_bindings(pybind11::module_&) {}
}  // namespace r3mes
