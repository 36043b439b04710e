#include "common/huge_pages.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
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
Mapping map_huge(std::size_t bytes, bool huge = true) {
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
  if (huge) madvise(base, length, MADV_HUGEPAGE);  // advisory: ignored where THP is off
  return {base, length};
}
#endif

bool huge_pages_wanted() {
  const char* env = std::getenv("R3MES_HUGE_PAGES");
  return env == nullptr || std::string(env) != "0";
}

// One mapping shared by many arena buffers; each holds a reference to it.
struct Slab {
  void* base = nullptr;
  std::size_t length = 0;
  std::size_t used = 0;
  explicit Slab(std::size_t bytes) {
#if defined(__linux__)
    const Mapping m = map_huge(bytes, huge_pages_wanted());
    base = m.base;
    length = m.length;
#else
    base = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (base == nullptr) throw std::bad_alloc();
    length = bytes;
#endif
  }
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;
  ~Slab() {
#if defined(__linux__)
    munmap(base, length);
#else
    std::free(base);
#endif
  }
};

}  // namespace

std::shared_ptr<uint8_t> arena_buffer(std::size_t bytes) {
  constexpr std::size_t kAlign = 64;
  bytes = std::max<std::size_t>(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  std::shared_ptr<Slab> slab;
  std::size_t offset = 0;
  if (bytes > kArenaSlabBytes / 2) {
    slab = std::make_shared<Slab>(bytes);
  } else {
    static std::mutex mutex;
    static std::weak_ptr<Slab> current;  // weak: the open slab goes when its buffers do
    std::lock_guard<std::mutex> lock(mutex);
    slab = current.lock();
    if (slab == nullptr || slab->length - slab->used < bytes) {
      slab = std::make_shared<Slab>(kArenaSlabBytes);
      current = slab;
    }
    offset = slab->used;
    slab->used += bytes;
  }
  uint8_t* data = static_cast<uint8_t*>(slab->base) + offset;
  std::memset(data, 0, bytes);  // fresh mappings are zero already; aligned_alloc is not
  // Aliasing constructor: the buffer keeps its slab alive.
  return std::shared_ptr<uint8_t>(std::move(slab), data);
}

pybind11::array_t<uint8_t> weight_buffer(std::size_t rows, std::size_t row_bytes) {
  namespace py = pybind11;
  const std::size_t bytes = rows * row_bytes;
#if defined(__linux__)
  if (huge_pages_wanted() && bytes >= kHugePageBytes) {
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
