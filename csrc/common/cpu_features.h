#pragma once
// Run-time CPU feature detection and the SIMD level every kernel dispatches on.
// The level can be forced (R3MES_SIMD=scalar|avx2|avx512|avx512vnni, or
// set_simd_level()) so tests exercise every compiled variant on one machine.
#include <string>
#include <vector>

namespace r3mes {

enum class SimdLevel : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512vnni = false, avxvnni = false, amx_int8 = false;
};

const CpuFeatures& cpu_features();
const char* simd_level_name(SimdLevel level);
SimdLevel parse_simd_level(const std::string& name);  // throws std::invalid_argument
SimdLevel best_supported_level();                     // what this CPU can run
std::vector<SimdLevel> supported_levels();            // scalar .. best
SimdLevel active_simd_level();                        // the level kernels use now
void set_simd_level(SimdLevel level);                 // throws if the CPU cannot run it

}  // namespace r3mes
