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
