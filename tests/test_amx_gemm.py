"""The AMX GEMMs (csrc/ternary/amx.h: decode batches and prefill) against the reference
and the VNNI kernel."""

from __future__ import annotations

import pytest
import torch

from r3mes import _native, kernels
from r3mes.kernels import reference

pytestmark = pytest.mark.skipif(
    not (kernels.available() and _native.info()["amx"]),
    reason="needs a CPU with AMX-INT8 and an OS that grants the tile state",
)

# (tokens M, out N, in K): tails in every direction (N not a multiple of the 16- or 32-row
# block, M not a multiple of the token block, K not a multiple of the 256-group). Up to 64
# tokens: the decode-batch kernel (4, 8 or 16 tokens a B tile, 16 a pass); past it, the
# 32-token blocks against 32 decoded rows.
SHAPES = [(3, 1, 1), (4, 17, 300), (5, 40, 2560), (8, 33, 257), (8, 130, 777), (12, 16, 513),
          (16, 1, 1), (16, 48, 6912), (17, 33, 257), (40, 130, 300), (33, 64, 2560),
          (64, 40, 700), (65, 17, 513), (100, 260, 777), (128, 48, 6912)]


@pytest.fixture(params=["amx", "vnni"])
def amx(request):
    before = kernels.simd_level()
    kernels.set_simd_level("avx512vnni")
    _native.set_amx_enabled(request.param == "amx")
    yield request.param
    _native.set_amx_enabled(True)
    kernels.set_simd_level(before)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = kernels.get_num_threads()
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(before)


def _with_and_without_amx(run):
    """run() at the VNNI level with the AMX kernels on, then off."""
    before = kernels.simd_level()
    kernels.set_simd_level("avx512vnni")
    try:
        out = []
        for flag in (True, False):
            _native.set_amx_enabled(flag)
            out.append(run())
    finally:
        _native.set_amx_enabled(True)
        kernels.set_simd_level(before)
    return out


def _case(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = kernels.quantize_weight(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    return w, x


@pytest.mark.parametrize("shape", SHAPES)
def test_integer_products_are_exact(amx, threads, shape) -> None:
    m, n, k = shape
    w, x = _case(m, n, k, seed=n + k)
    q, _ = kernels.quantize_activations(x)
    got = kernels.ternary_matmul_int(q, w)
    want = q.to(torch.int64) @ w.unpack().to(torch.int64).t()
    assert torch.equal(got.to(torch.int64), want)


@pytest.mark.parametrize("shape", SHAPES)
def test_float_outputs_match_the_reference_bit_for_bit(amx, threads, shape) -> None:
    m, n, k = shape
    w, x = _case(m, n, k, seed=3 * n + k)
    bias = torch.randn(n)
    want = reference.ternary_linear(x, w.unpack(), w.scale, bias)
    assert torch.equal(kernels.ternary_linear(x, w, bias), want)
    plain = reference.ternary_linear(x, w.unpack(), w.scale)
    assert torch.equal(kernels.ternary_linear(x, w), plain)


def test_integer_extremes_do_not_overflow(amx) -> None:
    # Every product at its extreme over the largest BitNet K, for both AMX kernels.
    k = 13824
    for m in (8, 20):
        q = torch.full((m, k), -128, dtype=torch.int8)
        w = kernels.TernaryWeight.from_ternary(torch.full((19, k), -1, dtype=torch.int8), 1.0)
        assert torch.equal(kernels.ternary_matmul_int(q, w),
                           torch.full((m, 19), 128 * k, dtype=torch.int32))


@pytest.mark.parametrize("tokens", [8, 24])
def test_fused_dora_is_identical_with_and_without_amx(threads, tokens) -> None:
    # A decode batch (8 rows) and a prefill through the fused DoRA call, each row with its
    # own mix: the AMX rows feed the same epilogue, so the outputs must not change by a bit.
    w, x = _case(tokens, 203, 301, seed=5)
    adapters = []
    for e, rank in enumerate((16, 4)):
        g = torch.Generator().manual_seed(40 + e)
        a = torch.randn(rank, 301, generator=g) * 0.05
        b = torch.randn(203, rank, generator=g) * 0.05
        gain = kernels.dora_gain(torch.rand(203, generator=g) + 0.5,
                                 kernels.dora_row_norms(w, a, b, 2.0 / rank))
        adapters.append(kernels.prepare_dora_adapter(a, b, gain, 2.0 / rank, "int8"))
    mix = torch.rand(tokens, 2)
    mix[3] = 0
    mix = mix / mix.sum(dim=1, keepdim=True).clamp_min(1e-6)
    with_amx, without = _with_and_without_amx(lambda: kernels.dora_linear(x, w, adapters, mix))
    assert torch.equal(with_amx, without)


def test_info_reports_amx_and_it_can_be_switched_off() -> None:
    assert kernels.info()["amx"] is True
    _native.set_amx_enabled(False)
    try:
        assert kernels.info()["amx"] is False
    finally:
        _native.set_amx_enabled(True)


@pytest.mark.parametrize("shape", [(8, 130, 300), (9, 48, 2560), (16, 33, 777), (40, 47, 1000)])
def test_int8_head_is_identical_with_and_without_amx(threads, shape) -> None:
    # The LM head's int8 GEMM: weights straight into the A tiles, a last partial block of
    # rows (N not a multiple of 16) on VNNI.
    m, n, k = shape
    g = torch.Generator().manual_seed(m + n + k)
    w = kernels.quantize_int8_weight(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g) * 3
    with_amx, without = _with_and_without_amx(lambda: kernels.int8_linear(x, w))
    assert torch.equal(with_amx, without)
    assert torch.equal(with_amx, reference.int8_linear(x, w.data[:, :k], w.scale))
