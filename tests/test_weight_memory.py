"""Weight memory: large weight buffers on 2 MiB pages (csrc/common/huge_pages.h)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from r3mes import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native module not built")
HUGE = 2 << 20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux mappings")


@linux_only
def test_large_weight_buffers_are_zeroed_2mib_aligned_mappings() -> None:
    buf = kernels._native.weight_buffer(1500, 1408)  # 2.1 MB: spans two huge pages
    assert buf.shape == (1500, 1408) and buf.dtype == np.uint8
    assert buf.ctypes.data % HUGE == 0
    assert not buf.any()
    assert type(buf.base).__name__ == "PyCapsule"  # our mapping, unmapped with the array
    buf[-1, -1] = 7  # the whole span is writable
    assert buf[-1, -1] == 7


def test_small_buffers_and_the_off_switch_use_ordinary_memory(monkeypatch) -> None:
    small = kernels._native.weight_buffer(4, 100)
    assert small.base is None and not small.any()
    monkeypatch.setenv("R3MES_HUGE_PAGES", "0")
    big = kernels._native.weight_buffer(1500, 1408)
    assert big.base is None and not big.any()


@linux_only
def test_packed_and_int8_weights_land_in_weight_memory() -> None:
    w = torch.randn(3000, 4096)  # packed 3 MB, int8 12 MB
    tw = kernels.quantize_weight(w)
    assert tw.packed.data_ptr() % HUGE == 0
    assert torch.equal(tw.unpack(), kernels.TernaryWeight.from_ternary(tw.unpack(), 1.0).unpack())
    head = kernels.quantize_int8_weight(w)
    assert head.data.dtype == torch.int8 and head.data.data_ptr() % HUGE == 0


def test_weight_copy_keeps_dtype_and_values_and_rejects_other_tensors() -> None:
    src = torch.randint(-128, 128, (1100, 2048), dtype=torch.int8)
    copy = kernels.weight_copy(src)
    assert copy.dtype == torch.int8 and torch.equal(copy, src)
    assert copy.data_ptr() != src.data_ptr()
    with pytest.raises(ValueError, match="2-D 8-bit"):
        kernels.weight_copy(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="2-D 8-bit"):
        kernels.weight_copy(torch.zeros(16, dtype=torch.uint8))
