#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace r3mes {

static CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
#if defined(__GNUC__) && __GNUC__ >= 11
  f.avxvnni = __builtin_cpu_supports("avxvnni");
  f.amx_int8 = __builtin_cpu_supports("amx-int8");
#endif
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::Avx2: return "avx2";
    case SimdLevel::Avx512: return "avx512";
    case SimdLevel::Avx512Vnni: return "avx512vnni";
  }
  return "unknown";
}

SimdLevel parse_simd_level(const std::string& name) {
  for (SimdLevel l : {SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512, SimdLevel::Avx512Vnni})
    if (name == simd_level_name(l)) return l;
  throw std::invalid_argument("unknown SIMD level '" + name +
                              "' (expected scalar, avx2, avx512 or avx512vnni)");
}

SimdLevel best_supported_level() {
#if defined(__x86_64__) || defined(_M_X64)
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni) return SimdLevel::Avx512Vnni;
  if (f.avx512f && f.avx512bw && f.avx512vl) return SimdLevel::Avx512;
  if (f.avx2 && f.fma) return SimdLevel::Avx2;
#endif
  return SimdLevel::Scalar;
}

std::vector<SimdLevel> supported_levels() {
  std::vector<SimdLevel> out;
  for (int i = 0; i <= static_cast<int>(best_supported_level()); ++i)
    out.push_back(static_cast<SimdLevel>(i));
  return out;
}

static SimdLevel initial_level() {
  const char* env = std::getenv("R3MES_SIMD");
  if (env == nullptr || *env == '\0') return best_supported_level();
  SimdLevel wanted = parse_simd_level(env);
  // A forced level above what the CPU runs would crash; fall back instead.
  return static_cast<int>(wanted) <= static_cast<int>(best_supported_level()) ? wanted
                                                                               : best_supported_level();
}

static std::atomic<int>& level_storage() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

SimdLevel active_simd_level() { return static_cast<SimdLevel>(level_storage().load()); }

void set_simd_level(SimdLevel level) {
  if (static_cast<int>(level) > static_cast<int>(best_supported_level()))
    throw std::invalid_argument(std::string("this CPU cannot run SIMD level '") +
                                simd_level_name(level) + "' (best: " +
                                simd_level_name(best_supported_level()) + ")");
  level_storage().store(static_cast<int>(level));
}

}  // namespace r3mes
