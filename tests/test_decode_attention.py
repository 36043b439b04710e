"""Native single-token attention == the torch reference (float rounding), GQA and padding."""

from __future__ import annotations

import pytest
import torch

from r3mes import kernels
from r3mes.kernels import reference


@pytest.mark.parametrize(("bsz", "heads", "kv", "dim", "max_len", "length"),
                         [(1, 4, 2, 16, 10, 1), (2, 20, 5, 128, 64, 37), (3, 6, 6, 8, 9, 9)])
def test_decode_attention_matches_reference(bsz, heads, kv, dim, max_len, length) -> None:
    g = torch.Generator().manual_seed(bsz * 100 + length)
    q = torch.randn(bsz, heads, dim, generator=g)
    k = torch.randn(bsz, kv, max_len, dim, generator=g)
    v = torch.randn(bsz, kv, max_len, dim, generator=g)
    pad = torch.tensor([min(i * 2, length - 1) for i in range(bsz)], dtype=torch.long)
    got = kernels.decode_attention(q, k, v, pad, length, dim**-0.5)
    want = reference.decode_attention(q, k, v, pad, length, dim**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# Contexts past one chunk of positions (128): the chunks' softmax sums are merged.
@pytest.mark.parametrize(("heads", "kv", "dim", "length"),
                         [(20, 5, 128, 300), (6, 2, 20, 257), (4, 4, 16, 129), (10, 5, 64, 1100)])
def test_long_contexts_match_reference(heads, kv, dim, length) -> None:
    g = torch.Generator().manual_seed(length)
    bsz = 3
    q = torch.randn(bsz, heads, dim, generator=g) * 3  # peaked weights: chunks far below the max
    k = torch.randn(bsz, kv, length + 5, dim, generator=g)
    v = torch.randn(bsz, kv, length + 5, dim, generator=g)
    pad = torch.tensor([0, 7, 140], dtype=torch.long)
    got = kernels.decode_attention(q, k, v, pad, length, dim**-0.5)
    want = reference.decode_attention(q, k, v, pad, length, dim**-0.5)
    # float32 sums over hundreds of unit-size values: 2-4e-6 from float64, as the kernel
    # was before chunking (the reference's own float32 path sums in float64).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_row_is_the_same_alone_and_in_a_batch() -> None:
    # Chunks start at each row's first position, and tasks go to whichever thread is free:
    # a row's result must not depend on its neighbours or on the thread count.
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 20, 128, generator=g)
    k = torch.randn(4, 5, 600, 128, generator=g)
    v = torch.randn(4, 5, 600, 128, generator=g)
    pad = torch.tensor([0, 3, 130, 300], dtype=torch.long)
    threads = kernels.get_num_threads()
    try:
        batch = kernels.decode_attention(q, k, v, pad, 600, 0.088)
        kernels.set_num_threads(1)
        for b in range(4):
            alone = kernels.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pad[b:b + 1],
                                             600, 0.088)
            assert torch.equal(alone[0], batch[b])
    finally:
        kernels.set_num_threads(threads)


def test_decode_attention_ignores_cache_rows_beyond_length_and_before_pad() -> None:
    q = torch.randn(1, 2, 4)
    k = torch.randn(1, 1, 8, 4)
    v = torch.randn(1, 1, 8, 4)
    pad = torch.tensor([2])
    base = kernels.decode_attention(q, k, v, pad, 5, 0.5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :2] = 1e3   # masked by the padding
    v2[:, :, 5:] = 1e3   # beyond the written length
    assert torch.equal(kernels.decode_attention(q, k2, v2, pad, 5, 0.5), base)


def test_weights_below_the_normal_float_range_are_exactly_zero() -> None:
    # One key scores 100 below the other: exp(-100) = 3.7e-44 is a subnormal float, and
    # every multiply-add touching a subnormal takes a microcode assist on x86 (a peaked
    # softmax over a long context made decode 20% slower). The kernel drops such weights;
    # the reference keeps them. A huge value behind the dropped weight shows the difference.
    q = torch.zeros(1, 1, 4)
    q[0, 0, 0] = 1.0
    k = torch.zeros(1, 1, 3, 4)
    k[0, 0, 0, 0] = 100.0  # the winner
    k[0, 0, 1, 0] = 0.0    # 100 below: weight 3.7e-44
    k[0, 0, 2, 0] = 60.0   # 40 below: weight 4.2e-18, a normal float, kept
    v = torch.zeros(1, 1, 3, 4)
    v[0, 0, 1] = 1e30
    v[0, 0, 2] = 1.0
    got = kernels.decode_attention(q, k, v, torch.tensor([0]), 3, 1.0)
    want = reference.decode_attention(q, k, v, torch.tensor([0]), 3, 1.0)
    assert want[0, 0, 0] > 1e-14  # the reference carries the subnormal weight's 3.7e-14
    torch.testing.assert_close(got, torch.full((1, 1, 4), float(torch.exp(torch.tensor(-40.0)))),
                               rtol=1e-6, atol=0)


def test_fully_padded_row_gives_zeros() -> None:
    out = kernels.decode_attention(torch.randn(1, 2, 4), torch.randn(1, 1, 3, 4),
                                   torch.randn(1, 1, 3, 4), torch.tensor([3]), 3, 1.0)
    assert torch.equal(out, torch.zeros(1, 2, 4))


def test_bad_shapes_are_refused() -> None:
    from r3mes import _native

    q = torch.randn(1, 3, 4).numpy()
    kv = torch.randn(1, 2, 5, 4).numpy()
    pad = torch.zeros(1, dtype=torch.long).numpy()
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        _native.decode_attention(q, kv, kv, pad, 3, 1.0)
    with pytest.raises(ValueError, match="length"):
        _native.decode_attention(torch.randn(1, 2, 4).numpy(), kv, kv, pad, 9, 1.0)


@pytest.mark.parametrize(("heads", "kv", "dim", "length"), [(20, 5, 128, 300), (6, 2, 20, 37)])
def test_a_half_cache_is_read_exactly(heads, kv, dim, length) -> None:
    """A float16 cache gives the bits of a float32 cache holding the same halves: the kernel
    widens each half exactly (subnormals and signed zeros included; dim 20 takes the tail
    path too) and does the same float32 arithmetic."""
    g = torch.Generator().manual_seed(dim)
    q = torch.randn(2, heads, dim, generator=g)
    k = torch.randn(2, kv, length, dim, generator=g)
    v = torch.randn(2, kv, length, dim, generator=g)
    k[0, 0, :, :4] = torch.tensor([1e-6, -3e-7, 0.0, -0.0])  # half subnormals, zeros
    v[1, -1, :, -3:] = torch.tensor([6e-8, -5e-5, -0.0])
    k16, v16 = k.half(), v.half()
    assert (k16.float()[0, 0, :, :2].abs() < 6.1e-5).all()  # subnormal as halves
    pad = torch.tensor([0, 5], dtype=torch.long)
    half = kernels.decode_attention(q, k16, v16, pad, length, dim**-0.5)
    widened = kernels.decode_attention(q, k16.float(), v16.float(), pad, length, dim**-0.5)
    assert torch.equal(half, widened)
    torch.testing.assert_close(half, reference.decode_attention(q, k16, v16, pad, length,
                                                                dim**-0.5),
                               rtol=1e-5, atol=1e-5)


def test_cache_dtypes_are_checked() -> None:
    q = torch.randn(1, 4, 16)
    k = torch.randn(1, 2, 8, 16)
    pad = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="same dtype"):
        kernels.decode_attention(q, k.half(), k, pad, 8, 0.25)
    with pytest.raises(ValueError, match="float32 or float16"):
        kernels.decode_attention(q, k.double(), k.double(), pad, 8, 0.25)
