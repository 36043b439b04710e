"""Native ternary kernels == the torch reference, exactly, at every SIMD level and thread count."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r3mes import _native, kernels
from r3mes.kernels import reference

LEVELS = _native.info()["supported_simd_levels"]

# (tokens M, out N, in K): odd sizes on purpose - K not a multiple of 16/32/64/128/256,
# N not a multiple of the 4-row tile, M not a multiple of the 4-token tile.
SHAPES = [
    (1, 1, 1),
    (1, 7, 13),
    (1, 64, 256),
    (1, 33, 257),
    (2, 5, 511),
    (3, 130, 300),
    (4, 17, 1000),
    (5, 64, 513),
    (7, 9, 2560),
    (9, 260, 777),
    (16, 48, 384),
    # Prefill sizes (M above the decode-batch tiles: row tiles decoded once, reused), with
    # K at the decoded tile's limit and past it.
    (17, 9, 300),
    (33, 70, 2560),
    (130, 13, 8192),
    (21, 6, 8193),
]


@pytest.fixture(params=[1, 2])
def threads(request: pytest.FixtureRequest):
    before = kernels.get_num_threads()
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(before)


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g)


def _acts(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    # Heavy-tailed activations exercise the clamp and the rounding ties.
    return torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10


@pytest.mark.parametrize("shape", SHAPES)
def test_activation_quantisation_matches_reference(simd_level, shape) -> None:
    m, _, k = shape
    x = _acts(m, k, seed=k)
    q, s = kernels.quantize_activations(x)
    q_ref, s_ref = reference.quantize_activations(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


def test_activation_quantisation_rounds_ties_to_even(simd_level) -> None:
    # absmax 127 makes the scale exactly 1, so x*scale hits .5 ties directly.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 40])
    q, _ = kernels.quantize_activations(x)
    assert q[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 4]


def test_all_zero_activations_use_the_epsilon_scale(simd_level) -> None:
    q, s = kernels.quantize_activations(torch.zeros(2, 50))
    assert torch.equal(q, torch.zeros(2, 50, dtype=torch.int8))
    assert torch.equal(s, reference.quantize_activations(torch.zeros(2, 50))[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_roundtrip_matches_reference_quantisation(shape) -> None:
    _, n, k = shape
    w = _weights(n, k, seed=n * 31 + k)
    tw = kernels.quantize_weight(w)
    assert tw.scale == pytest.approx(float(reference.weight_scale(w)), rel=0, abs=0)
    assert torch.equal(tw.unpack(), reference.quantize_weight(w))
    assert tw.packed.shape == (n, _native.packed_row_bytes(k))
    repacked = kernels.TernaryWeight.from_ternary(tw.unpack(), tw.scale)
    assert torch.equal(repacked.packed, tw.packed)


def test_packed_rows_use_two_bits_per_weight() -> None:
    assert _native.packed_row_bytes(2560) == 2560 // 4
    assert _native.packed_row_bytes(6912) == 6912 // 4
    assert _native.packed_row_bytes(1) == 64  # one padded 256-weight group


@pytest.mark.parametrize("shape", SHAPES)
def test_integer_gemm_is_exact(simd_level, threads, shape) -> None:
    m, n, k = shape
    tw = kernels.quantize_weight(_weights(n, k, seed=k + n))
    q, _ = reference.quantize_activations(_acts(m, k, seed=m + k))
    got = kernels.ternary_matmul_int(q, tw)
    want = reference.ternary_matmul_int(q, reference.quantize_weight(_weights(n, k, seed=k + n)))
    assert torch.equal(got, want)


def test_integer_gemm_extremes_do_not_overflow(simd_level) -> None:
    # Every product at its extreme: -128 * -1 summed over the largest BitNet K.
    k = 13824
    q = torch.full((2, k), -128, dtype=torch.int8)
    t = torch.full((3, k), -1, dtype=torch.int8)
    tw = kernels.TernaryWeight.from_ternary(t, 1.0)
    assert torch.equal(kernels.ternary_matmul_int(q, tw), torch.full((2, 3), 128 * k,
                                                                     dtype=torch.int32))
    # The same through the prefill path (row tiles decoded once), at its largest K.
    k = 8192
    q = torch.full((20, k), -128, dtype=torch.int8)
    tw = kernels.TernaryWeight.from_ternary(torch.full((5, k), -1, dtype=torch.int8), 1.0)
    assert torch.equal(kernels.ternary_matmul_int(q, tw), torch.full((20, 5), 128 * k,
                                                                      dtype=torch.int32))


@pytest.mark.parametrize("shape", SHAPES)
def test_ternary_linear_is_bit_identical_to_reference(simd_level, threads, shape) -> None:
    m, n, k = shape
    w = _weights(n, k, seed=3 * k + n)
    x = _acts(m, k, seed=n)
    tw = kernels.quantize_weight(w)
    y = kernels.ternary_linear(x, tw)
    y_ref = reference.ternary_linear(x, reference.quantize_weight(w), tw.scale)
    assert y.dtype == torch.float32
    assert torch.equal(y, y_ref)


def test_ternary_linear_with_bias_and_leading_dims(simd_level) -> None:
    w, b = _weights(20, 70, seed=1), torch.randn(20)
    x = _acts(6, 70, seed=2).reshape(2, 3, 70)
    tw = kernels.quantize_weight(w)
    y = kernels.ternary_linear(x, tw, b)
    assert y.shape == (2, 3, 20)
    assert torch.equal(y, reference.ternary_linear(x, tw.unpack(), tw.scale, b))


def test_results_do_not_depend_on_thread_count() -> None:
    tw = kernels.quantize_weight(_weights(1000, 1111, seed=5))
    x = _acts(6, 1111, seed=6)
    outs = []
    for n in (1, 2, 3):
        kernels.set_num_threads(n)
        outs.append(kernels.ternary_linear(x, tw))
    kernels.set_num_threads(0)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 40),
    k=st.integers(1, 700),
    seed=st.integers(0, 2**16),
    level=st.sampled_from(LEVELS),
)
def test_random_shapes_match_reference(m: int, n: int, k: int, seed: int, level: str) -> None:
    kernels.set_simd_level(level)
    try:
        w, x = _weights(n, k, seed), _acts(m, k, seed)
        tw = kernels.quantize_weight(w)
        assert torch.equal(kernels.ternary_linear(x, tw),
                           reference.ternary_linear(x, reference.quantize_weight(w), tw.scale))
    finally:
        kernels.set_simd_level(LEVELS[-1])


def test_torch_backend_switch_gives_the_same_result() -> None:
    tw = kernels.quantize_weight(_weights(30, 90, seed=9))
    x = _acts(4, 90, seed=9)
    native = kernels.ternary_linear(x, tw)
    with kernels.use_reference():
        assert not kernels.use_native()
        assert torch.equal(kernels.ternary_linear(x, tw), native)


def test_half_precision_inputs_are_accepted() -> None:
    tw = kernels.quantize_weight(_weights(8, 64, seed=2).bfloat16())
    x = _acts(2, 64, seed=3).bfloat16()
    assert torch.equal(kernels.ternary_linear(x, tw),
                       reference.ternary_linear(x.float(), tw.unpack(), tw.scale))


# ---- bad input -------------------------------------------------------------------------


def test_nan_or_inf_activations_are_refused(simd_level) -> None:
    tw = kernels.quantize_weight(_weights(4, 40, seed=1))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.ones(3, 40)
        x[1, 37] = bad  # in the SIMD tail on purpose
        with pytest.raises(ValueError, match="NaN or Inf"):
            kernels.ternary_linear(x, tw)
        with pytest.raises(ValueError, match="NaN or Inf"):
            kernels.quantize_activations(x)


def test_non_finite_weights_are_refused() -> None:
    w = torch.ones(3, 5)
    w[2, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernels.quantize_weight(w)


def test_wrong_dtype_is_refused() -> None:
    tw = kernels.quantize_weight(_weights(4, 16, seed=1))
    with pytest.raises(TypeError, match="floating-point"):
        kernels.ternary_linear(torch.ones(2, 16, dtype=torch.int32), tw)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.quantize_weight(torch.ones(4, 16, dtype=torch.int64))


def test_non_contiguous_input_is_refused() -> None:
    tw = kernels.quantize_weight(_weights(4, 16, seed=1))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.ternary_linear(torch.ones(16, 2).t(), tw)


def test_mismatched_shapes_are_refused() -> None:
    tw = kernels.quantize_weight(_weights(4, 16, seed=1))
    with pytest.raises(ValueError, match="in_features=16"):
        kernels.ternary_linear(torch.ones(2, 17), tw)
    with pytest.raises(ValueError, match="bias"):
        kernels.ternary_linear(torch.ones(2, 16), tw, torch.ones(5))


def test_empty_inputs() -> None:
    tw = kernels.quantize_weight(_weights(4, 16, seed=1))
    assert kernels.ternary_linear(torch.ones(0, 16), tw).shape == (0, 4)
    with pytest.raises(ValueError, match="features"):
        kernels.ternary_linear(torch.ones(2, 0), tw)
    with pytest.raises(ValueError, match="non-empty"):
        kernels.quantize_weight(torch.ones(0, 16))


def test_native_module_validates_buffers() -> None:
    packed = kernels.quantize_weight(_weights(4, 16, seed=1)).packed.numpy()
    x = np.ones((2, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="x: expected dtype float32, got float64"):
        _native.ternary_linear(x.astype(np.float64), packed, 16, 1.0)
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        _native.ternary_linear(np.ones((16, 2), dtype=np.float32).T, packed, 16, 1.0)
    with pytest.raises(ValueError, match="packed: rows of 64 bytes do not match in_features=300"):
        _native.ternary_linear(np.ones((2, 300), dtype=np.float32), packed, 300, 1.0)
    with pytest.raises(ValueError, match="x: expected 2-D"):
        _native.ternary_linear(np.ones(16, dtype=np.float32), packed, 16, 1.0)
    with pytest.raises(ValueError, match="w_scale"):
        _native.ternary_linear(x, packed, 16, float("nan"))
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        _native.pack_ternary(np.full((2, 3), 2, dtype=np.int8))


def test_unknown_or_unsupported_simd_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown SIMD level"):
        kernels.set_simd_level("sse9")


def test_simd_level_can_be_forced_by_environment() -> None:
    code = "from r3mes import kernels; print(kernels.simd_level())"
    env = dict(os.environ, R3MES_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "scalar"


def test_thread_count_is_settable() -> None:
    kernels.set_num_threads(3)
    assert kernels.get_num_threads() == 3
    kernels.set_num_threads(0)
    assert kernels.get_num_threads() == (os.cpu_count() or 1)


# ---- int8 x int8 (LM head) ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_head_quantisation_and_linear_match_reference(simd_level, threads, shape) -> None:
    m, n, k = shape
    w, x = _weights(n, k, seed=7 * k), _acts(m, k, seed=11 * n)
    iw = kernels.quantize_int8_weight(w)
    w8, s = reference.quantize_int8_weight(w)
    assert torch.equal(iw.data[:, :k], w8)
    assert torch.equal(iw.scale, s)
    assert torch.equal(kernels.int8_linear(x, iw), reference.int8_linear(x, w8, s))


def test_int8_rows_are_an_embedding_lookup() -> None:
    w = _weights(50, 33, seed=4)
    iw = kernels.quantize_int8_weight(w)
    idx = torch.tensor([[3, 0], [49, 3]])
    torch.testing.assert_close(iw.rows(idx), iw.dequantize()[idx], rtol=0, atol=0)
    torch.testing.assert_close(iw.dequantize(), w, rtol=0, atol=float(w.abs().max()) / 127)


def test_torch_reference_unpack_reads_the_native_layout() -> None:
    for n, k in [(3, 13), (33, 257), (5, 700)]:
        tw = kernels.quantize_weight(_weights(n, k, seed=n + k))
        assert torch.equal(reference.unpack_ternary(tw.packed, k), tw.unpack())


def test_concurrent_python_threads_get_exact_results() -> None:
    # The kernels share one worker pool; calls from several threads must queue, not mix.
    from concurrent.futures import ThreadPoolExecutor

    weights = [kernels.quantize_weight(_weights(300 + 7 * i, 513, seed=i)) for i in range(4)]
    xs = [_acts(3, 513, seed=10 + i) for i in range(4)]
    want = [reference.ternary_linear(x, w.unpack(), w.scale)
            for x, w in zip(xs, weights, strict=True)]

    def run(i: int) -> bool:
        return all(torch.equal(kernels.ternary_linear(xs[i], weights[i]), want[i])
                   for _ in range(25))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(run, range(4)))


def test_thread_count_can_change_between_calls_without_losing_work() -> None:
    tw = kernels.quantize_weight(_weights(777, 600, seed=3))
    x = _acts(2, 600, seed=4)
    want = kernels.ternary_linear(x, tw)
    for n in (2, 1, 3, 2, 0):
        kernels.set_num_threads(n)
        assert torch.equal(kernels.ternary_linear(x, tw), want)


# ---- int4 x int8 (the 4-bit LM head) -------------------------------------------------------


@pytest.mark.parametrize("group", kernels.INT4_GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_head_linear_matches_reference(simd_level, threads, shape, group) -> None:
    m, n, k = shape
    if k > 8192:
        pytest.skip("past the 4-bit head's exactness bound (a test of its own below)")
    iw = kernels.quantize_int4_weight(_weights(n, k, seed=5 * k), group)
    x = _acts(m, k, seed=13 * n)
    expected = reference.int4_linear(x, iw.packed, iw.group_scales, iw.scale, k, group)
    assert torch.equal(kernels.int4_linear(x, iw), expected)


def test_int4_head_sums_at_the_exactness_bound_do_not_wrap(simd_level) -> None:
    # Every product at its extreme: x quantises to 127, each weight is -8 with group scale
    # 255, K at the largest size the int32 sums hold (8192 * 127 * 8 * 255 < 2^31).
    k, n = 8192, 5
    packed = torch.zeros(n, k // 2, dtype=torch.uint8)  # nibble 0 = value -8
    subs = torch.full((n, k // 64), 255, dtype=torch.uint8)
    offsets = torch.full((n,), 128 * 255 * -8 * k, dtype=torch.int32)
    iw = kernels.Int4Weight(packed, subs, torch.ones(n), offsets, n, k, 64)
    x = torch.ones(2, k)
    y = kernels.int4_linear(x, iw)
    assert torch.equal(y, reference.int4_linear(x, packed, subs, iw.scale, k, 64))
    assert torch.equal(y, torch.full((2, n), -8.0 * 255 * 127 * k / 127))


@pytest.mark.parametrize("group", kernels.INT4_GROUPS)
def test_int4_quantisation_stores_what_it_claims(group) -> None:
    n, k = 40, 700
    w = _weights(n, k, seed=3)
    w[7] = 0.0  # an all-zero row
    w[9, :64] *= 40.0  # one loud group: the others keep fine steps of their own
    iw = kernels.quantize_int4_weight(w, group)
    kp = (k + 127) // 128 * 128
    assert iw.packed.shape == (n, kp // 2) and iw.group_scales.shape == (n, kp // group)
    values = reference.unpack_int4(iw.packed, kp).to(torch.int64)
    assert int(values[:, k:].abs().max()) == 0  # padding is zero
    assert int(iw.group_scales.min()) >= 1
    # The unsigned-activation offsets: 128 * sum_g scale_g * sum of the group's values.
    per_group = values.reshape(n, -1, group).sum(-1) * iw.group_scales.to(torch.int64)
    wrapped = (128 * per_group.sum(-1) + 2**31) % 2**32 - 2**31
    assert torch.equal(iw.offsets.to(torch.int64), wrapped)
    deq = iw.dequantize()
    assert torch.equal(deq[7], torch.zeros(k))
    rel = float((deq - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert rel < 0.12  # 4-bit rounding of Gaussian weights: ~0.09-0.10
    # The loud group did not coarsen the row's other groups to its step.
    quiet = w[9, 128:] - deq[9, 128:]
    assert float(quiet.pow(2).mean().sqrt()) < 0.15
    torch.testing.assert_close(iw.dequantize(torch.tensor([9, 2])), deq[[9, 2]], rtol=0, atol=0)


def test_int4_importance_lowers_the_weighted_error() -> None:
    w = _weights(64, 512, seed=21)
    importance = torch.ones(512)
    importance[::8] = 50.0  # a few features that matter a lot
    plain = kernels.quantize_int4_weight(w, 64).dequantize()
    weighted = kernels.quantize_int4_weight(w, 64, importance).dequantize()

    def err(d: torch.Tensor) -> float:
        return float(((d - w).pow(2) * importance).sum())

    assert err(weighted) < err(plain)


def test_int4_bad_input_is_named() -> None:
    w = _weights(4, 100, seed=1)
    with pytest.raises(ValueError, match="group"):
        kernels.quantize_int4_weight(w, 32)
    with pytest.raises(ValueError, match="NaN"):
        kernels.quantize_int4_weight(torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError, match="8192"):
        kernels.quantize_int4_weight(torch.ones(2, 8193))
    with pytest.raises(ValueError, match="importance"):
        kernels.quantize_int4_weight(w, 64, torch.ones(99))
    with pytest.raises(ValueError, match="importance"):
        kernels.quantize_int4_weight(w, 64, -torch.ones(100))
    iw = kernels.quantize_int4_weight(w, 64)
    with pytest.raises(ValueError, match="features"):
        kernels.int4_linear(torch.ones(1, 99), iw)
    with pytest.raises(ValueError, match="NaN"):
        kernels.int4_linear(torch.full((1, 100), float("inf")), iw)
    with pytest.raises(ValueError, match="group_scales"):
        _native.int4_linear(np.ones((1, 100), np.float32), iw.packed.numpy(),
                            iw.group_scales[:, :1].contiguous().numpy(), iw.scale.numpy(),
                            iw.offsets.numpy(), 100, 64)
