#pragma once
// Weight buffers on 2 MiB pages. Decode reads every weight once per token, ~850 MB for a
// 2B model: on 4 KiB pages that is a TLB miss every 4 KiB (a two-level walk under a
// hypervisor), which the streaming kernels cannot hide. A 2 MiB-aligned anonymous mapping
// with MADV_HUGEPAGE gets huge pages wherever transparent huge pages are "always" or
// "madvise" (the usual defaults); elsewhere it is plain memory. R3MES_HUGE_PAGES=0 turns
// it off (read at each allocation).
#include <pybind11/numpy.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace r3mes {

// Buffers at least this large go on huge pages (smaller ones would waste most of a page).
constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;

// A zero-initialised uint8 array of the given shape (product = bytes), on 2 MiB pages
// when it is at least kHugePageBytes (and R3MES_HUGE_PAGES is not "0"), otherwise an
// ordinary numpy allocation. Throws
// std::bad_alloc when the memory is not there.
pybind11::array_t<uint8_t> weight_buffer(std::size_t rows, std::size_t row_bytes);

// Zero-initialised memory for buffers too small for huge pages of their own but read with
// the weights on every token (DoRA adapters: ~180 KB each, 630 of them for three experts
// on a 2B model). They are carved one after another out of shared slabs of kArenaSlabBytes
// on 2 MiB pages; a slab is unmapped when the last buffer in it is freed (buffers loaded
// together, one expert's, share slabs and go together). 64-byte aligned. Thread-safe.
// Buffers larger than half a slab get a mapping of their own. Throws std::bad_alloc.
constexpr std::size_t kArenaSlabBytes = std::size_t{32} << 20;
std::shared_ptr<uint8_t> arena_buffer(std::size_t bytes);

}  // namespace r3mes
