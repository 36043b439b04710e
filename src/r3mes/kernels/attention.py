"""Decode attention: one new token's grouped-query attention read straight from the KV
cache (:func:`decode_attention`)."""

from __future__ import annotations

import torch

from r3mes.kernels import reference
from r3mes.kernels.dispatch import _native, implementation, register

__all__ = ["decode_attention"]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pad: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    """Single-token (decode) grouped-query attention straight from a KV cache.

    q float32 [B, H, D]; k_cache, v_cache float32 or float16 (a half cache, read exactly)
    [B, KV, S_max, D]; pad int64 [B] (left
    padding of each row: keys before it are masked); keys [pad_b, length) are attended.
    Returns float32 [B, H, D]. Native: one fused pass per head, independent of the thread
    count; agrees with :func:`r3mes.kernels.reference.decode_attention` to float rounding.
    """
    return implementation("decode_attention")(q, k_cache, v_cache, pad, length, scaling)


@register("decode_attention", "native")
def _decode_attention_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             pad: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    out = _native.decode_attention(q.detach().contiguous().numpy(), k_cache.detach().numpy(),
                                   v_cache.detach().numpy(), pad.contiguous().numpy(),
                                   int(length), float(scaling))
    return torch.from_numpy(out)


register("decode_attention", "reference")(reference.decode_attention)
