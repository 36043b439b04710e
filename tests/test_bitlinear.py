"""BitLinear: trainable with straight-through estimators, frozen onto the native kernel."""

from __future__ import annotations

import pytest
import torch

from r3mes import kernels
from r3mes.core.bitlinear import BitLinear
from r3mes.kernels import reference


def test_training_form_passes_gradients_through_both_quantisers() -> None:
    torch.manual_seed(0)
    layer = BitLinear(48, 24)
    x = torch.randn(5, 48, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_training_form_is_the_quantised_forward_with_straight_through_gradients() -> None:
    torch.manual_seed(3)
    layer = BitLinear(48, 40)
    w = layer.weight.detach().clone()
    x = torch.randn(3, 7, 48, requires_grad=True)
    y = layer(x)
    s_w = reference.weight_scale(w)
    w_q = reference.quantize_weight(w, s_w).float() / s_w
    s_x = x.detach().abs().amax(-1, keepdim=True).clamp(min=reference.ACT_EPS) / 127.0
    x_q = (x.detach() / s_x).round().clamp(-128, 127) * s_x
    torch.testing.assert_close(y, x_q @ w_q.t(), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    # The quantisers count as the identity: dL/dx = g W_q, dL/dW = g^T x_q.
    torch.testing.assert_close(x.grad, grad_out @ w_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, grad_out.reshape(-1, 40).t()
                               @ x_q.reshape(-1, 48), rtol=1e-4, atol=1e-4)


def test_frozen_layer_runs_the_contract_exactly() -> None:
    torch.manual_seed(1)
    layer = BitLinear(300, 70)
    w = layer.weight.detach().clone()
    x = torch.randn(3, 300)
    layer.freeze()
    assert layer.frozen and layer.weight is None
    want = reference.ternary_linear(x, reference.quantize_weight(w), reference.weight_scale(w))
    assert torch.equal(layer(x), want)


def test_frozen_output_agrees_with_the_training_forward() -> None:
    torch.manual_seed(2)
    layer = BitLinear(128, 32, bias=True)
    x = torch.randn(4, 128)
    with torch.no_grad():
        trained = layer(x)
    layer.freeze()
    torch.testing.assert_close(layer(x), trained, rtol=1e-4, atol=1e-4)


def test_from_ternary_builds_a_frozen_layer() -> None:
    t = torch.randint(-1, 2, (16, 40), dtype=torch.int8)
    layer = BitLinear.from_ternary(t, scale=2.0)
    assert torch.equal(layer.ternary.unpack(), t)
    torch.testing.assert_close(layer.dequantized_weight(), t.float() / 2.0)
    x = torch.randn(2, 40)
    assert torch.equal(layer(x), reference.ternary_linear(x, t, 2.0))


def test_output_keeps_the_input_dtype() -> None:
    layer = BitLinear(64, 8).freeze()
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        BitLinear(0, 4)


def test_dequantized_weight_matches_packed_form() -> None:
    layer = BitLinear(77, 13)
    before = layer.dequantized_weight()
    layer.freeze()
    torch.testing.assert_close(layer.dequantized_weight(), before, rtol=0, atol=0)
    assert isinstance(layer.ternary, kernels.TernaryWeight)
