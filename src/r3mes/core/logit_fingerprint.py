"""``fingerprint(logits)``: a digest two nodes compare to check they ran the same computation."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["fingerprint"]


def fingerprint(logits: torch.Tensor | np.ndarray) -> str:
    """sha256 (hex) of the logits as contiguous little-endian float32 bytes.

    Exactly ``sha256(logits.float32 bytes)`` (C order), so any tool can recompute it; the
    shape is not part of the digest (compare shapes separately). Any other float dtype is
    converted to float32 first; integers are refused.
    """
    if isinstance(logits, torch.Tensor):
        arr = logits.detach().to("cpu")
        if not arr.is_floating_point():
            raise TypeError(f"logits: expected a floating-point tensor, got {arr.dtype}")
        arr = arr.to(torch.float32).contiguous().numpy()
    else:
        arr = np.asarray(logits)
        if arr.dtype.kind != "f":
            raise TypeError(f"logits: expected a floating-point array, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype="<f4")
    return hashlib.sha256(arr.astype("<f4", copy=False).tobytes()).hexdigest()
