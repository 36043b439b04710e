"""BitLinear: the BitNet b1.58 linear layer, trainable in torch and frozen onto the kernels.

Training form: float master weights (the "shadow" of the ternary ones); the forward pass
quantises weights (absmean -> {-1, 0, 1}) and activations (per-token absmax -> int8) and
the backward passes gradients straight through both quantisers, as BitNet b1.58 trains
(:meth:`r3mes.core.model.BitNetForCausalLM.for_training` builds a model of them).
Inference form (after :meth:`BitLinear.freeze`): 2-bit packed
weights and the native ternary kernel via :mod:`r3mes.kernels`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from r3mes import kernels
from r3mes.kernels import reference


class _QuantizeActivationsSTE(torch.autograd.Function):
    """Per-token absmax int8 fake-quantisation, gradient passed straight through.

    One autograd node, not ``x + (q - x).detach()``: on a small CPU the elementwise passes
    of that form cost more than the matmuls of a training step. The forward is the
    quantised value itself.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=reference.ACT_EPS)
        scale = scale.reciprocal_().mul_(127.0)
        return (x * scale).round_().clamp_(-128, 127).div_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _QuantizeWeightSTE(torch.autograd.Function):
    """Per-tensor absmean ternary fake-quantisation, gradient passed straight through."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scale = reference.weight_scale(w)
        return (w * scale).round_().clamp_(-1, 1).div_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _ste_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """``T / s_w`` of a float weight, differentiable as the identity (STE)."""
    return _QuantizeWeightSTE.apply(w)


def _ste_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``q / s_x`` of float activations, differentiable as the identity (STE)."""
    return _QuantizeActivationsSTE.apply(x)


class BitLinear(nn.Module):
    """A ternary linear layer ``y = x W^T (+ b)`` with BitNet b1.58 quantisation.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: add a learnable bias (BitNet models use none).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError("in_features and out_features must be positive")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.ternary: kernels.TernaryWeight | None = None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def frozen(self) -> bool:
        return self.ternary is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ternary is not None:
            y = kernels.ternary_linear(x.contiguous(), self.ternary, self.bias)
            return y.to(x.dtype)
        w = _ste_quantize_weight(self.weight)
        return F.linear(_ste_quantize_activations(x), w.to(x.dtype), self.bias)

    @torch.no_grad()
    def freeze(self) -> BitLinear:
        """Quantise and pack the weights for inference; the float weights are dropped."""
        self.ternary = kernels.quantize_weight(self.weight)
        self.weight = None  # type: ignore[assignment]
        return self

    @classmethod
    def from_ternary(
        cls, ternary: torch.Tensor, scale: float, bias: torch.Tensor | None = None
    ) -> BitLinear:
        """A frozen layer from int8 ternary values [out, in] and the absmean scale s_w."""
        out_features, in_features = ternary.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.weight = None  # type: ignore[assignment]
        layer.bias = nn.Parameter(bias.float(), requires_grad=False) if bias is not None else None
        layer.ternary = kernels.TernaryWeight.from_ternary(ternary, scale)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """W0 = T / s_w as float32 [out, in] (the weight the ternary layer applies)."""
        if self.ternary is not None:
            return self.ternary.dequantize()
        scale = reference.weight_scale(self.weight)
        return reference.quantize_weight(self.weight, scale).float() / scale

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, frozen={self.frozen}"
        )
