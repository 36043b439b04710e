#include "common/huge_pages.h"

#include <algorithm>
#include <cstdlib>
#include <new>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace r3mes {
namespace {

#if defined(__linux__)
struct Mapping {
  void* base;
  std::size_t length;
};

// Maps `bytes` (rounded up to 4 KiB) at a 2 MiB-aligned address (over-map by one huge page,
// unmap the slack on both sides) and asks for huge pages. The mapping ends where the data
// does: its last partial 2 MiB is not a whole huge page of the mapping, so the kernel backs
// it with 4 KiB pages instead of a mostly empty huge page (which cost 160 MB over a 2B
// model's 210 weight buffers).
Mapping map_huge(std::size_t bytes) {
  constexpr std::size_t kPage = 4096;
  const std::size_t length = (bytes + kPage - 1) / kPage * kPage;
  const std::size_t span = length + kHugePageBytes;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const auto start = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t aligned = (start + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  if (aligned > start) munmap(raw, aligned - start);
  const std::uintptr_t end = start + span, used_end = aligned + length;
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  void* base = reinterpret_cast<void*>(aligned);
  madvise(base, length, MADV_HUGEPAGE);  // advisory: ignored where THP is off
  return {base, length};
}
#endif

}  // namespace

pybind11::array_t<uint8_t> weight_buffer(std::size_t rows, std::size_t row_bytes) {
  namespace py = pybind11;
  const std::size_t bytes = rows * row_bytes;
#if defined(__linux__)
  const char* env = std::getenv("R3MES_HUGE_PAGES");
  const bool wanted = env == nullptr || std::string(env) != "0";
  if (wanted && bytes >= kHugePageBytes) {
    Mapping* m = new Mapping(map_huge(bytes));
    py::capsule owner(m, [](void* p) {
      auto* mapping = static_cast<Mapping*>(p);
      munmap(mapping->base, mapping->length);
      delete mapping;
    });
    return py::array_t<uint8_t>({rows, row_bytes}, {row_bytes, std::size_t{1}},
                                static_cast<uint8_t*>(m->base), owner);
  }
#endif
  py::array_t<uint8_t> out({rows, row_bytes});
  std::fill(out.mutable_data(), out.mutable_data() + bytes, uint8_t{0});
  return out;
}

}  // namespace r3mes
