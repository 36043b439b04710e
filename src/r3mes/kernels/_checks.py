"""Input checks shared by the CPU (``r3mes.kernels``) and CUDA (``r3mes.kernels.cuda``)
entry points, so both reject bad activations with the same messages."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_features(x: torch.Tensor, name: str, in_features: int | None = None) -> None:
    """x must be a floating-point tensor [..., K] with K > 0 (and K == in_features if given)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: last dimension (features) must be > 0")
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(
            f"{name}: has {x.shape[-1]} features, weight expects in_features={in_features}"
        )
