from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from r3mes.core import fingerprint


def test_fingerprint_is_the_sha256_of_the_float32_bytes():
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert fingerprint(x) == hashlib.sha256(x.numpy().tobytes()).hexdigest()
    assert fingerprint(x.numpy()) == fingerprint(x)


def test_one_ulp_changes_the_fingerprint():
    x = torch.randn(4, 10)
    y = x.clone()
    y[2, 3] = torch.nextafter(y[2, 3], torch.tensor(float("inf")))
    assert fingerprint(x) != fingerprint(y)


def test_non_contiguous_and_bf16_inputs_are_normalised():
    x = torch.randn(5, 4)
    assert fingerprint(x.t()) == fingerprint(x.t().contiguous())
    assert fingerprint(x.bfloat16()) == fingerprint(x.bfloat16().float())


def test_integer_logits_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        fingerprint(np.arange(3))
