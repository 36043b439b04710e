// Whether the AMX kernel may run: compiled in, the CPU has AMX-INT8, and Linux has granted
// this process the tile data state (a one-time arch_prctl request; without it the first
// tile instruction faults).
#include <atomic>
#include <cstdlib>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/cpu_features.h"
#include "ternary/amx.h"

namespace r3mes {
namespace {

bool os_grants_tiles() {
#if defined(R3MES_HAVE_AMX) && defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> enabled{[] {
    const char* env = std::getenv("R3MES_AMX");
    return env == nullptr || std::string(env) != "0";
  }()};
  return enabled;
}

}  // namespace

bool amx_usable() {
  static const bool capable = cpu_features().amx_int8 && os_grants_tiles();
  return capable && enabled_flag().load(std::memory_order_relaxed);
}

void set_amx_enabled(bool enabled) { enabled_flag().store(enabled, std::memory_order_relaxed); }

}  // namespace r3mes
