"""Ternary (1.58-bit) weights: absmean quantisation, the packed :class:`TernaryWeight`,
:func:`ternary_linear` (the numerical contract of DESIGN.md), the exact integer product,
and weight memory (2 MiB pages for the weights decode streams).

The packed layout (``r3mes-2bit-g256``) is documented in ``csrc/ternary/ternary.h``; the
native module takes numpy views of CPU tensors, so they cross without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from r3mes.kernels import reference
from r3mes.kernels._checks import (
    as_float32_matrix,
    check_bias,
    check_finite_activations,
    check_float_weight,
    fast_input,
    is_cuda,
)
from r3mes.kernels.dispatch import _native, implementation, register, register_cuda

__all__ = [
    "TernaryWeight",
    "quantize_weight",
    "ternary_linear",
    "ternary_matmul_int",
    "weight_copy",
    "weight_empty",
]


@dataclass(frozen=True)
class TernaryWeight:
    """A packed ternary weight: 2-bit codes in the kernels' layout plus its scale.

    ``packed`` is uint8 [out_features, packed_row_bytes(in_features)]; the layout
    (``r3mes-2bit-g256``) is documented in ``csrc/ternary/ternary.h``. ``scale`` is
    s_w, so the dequantised weight is ``unpack() / scale``.
    """

    packed: torch.Tensor
    scale: float
    out_features: int
    in_features: int
    # The numpy view the native kernel takes, made once: decode calls each layer per token.
    _packed_np: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_packed_np", self.packed.numpy())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def unpack(self) -> torch.Tensor:
        """The ternary values as int8 [out_features, in_features]."""
        return implementation("unpack_ternary")(self.packed, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """W0 = T / s_w as float32."""
        return self.unpack().float() / self.scale

    @classmethod
    def from_ternary(cls, ternary: torch.Tensor, scale: float) -> TernaryWeight:
        """Pack int8 values in {-1, 0, 1} [out, in] with a given scale s_w."""
        if ternary.dim() != 2:
            raise ValueError(f"ternary: expected a 2-D tensor, got shape {tuple(ternary.shape)}")
        t = ternary.detach().to(torch.int8).contiguous()
        return cls(implementation("pack_ternary")(t), float(scale), t.shape[0], t.shape[1])


@register("unpack_ternary", "native", layout=True)
def _unpack_native(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return torch.from_numpy(_native.unpack_ternary(packed.numpy(), in_features))


register("unpack_ternary", "reference", layout=True)(reference.unpack_ternary)


@register("pack_ternary", "native", layout=True)
def _pack_native(ternary: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_native.pack_ternary(ternary.numpy()))


# ---- weight memory --------------------------------------------------------------------------


def weight_empty(rows: int, cols: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A zeroed 8-bit weight tensor [rows, cols] in weight memory: on 2 MiB pages when it is
    at least 2 MiB (decode streams every weight once per token; see
    csrc/common/huge_pages.h). Ordinary memory without the native module."""
    if dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"weight memory holds 8-bit weights, got {dtype}")
    return implementation("weight_buffer")(rows, cols).view(dtype)


@register("weight_buffer", "native", layout=True)
def _weight_buffer_native(rows: int, cols: int) -> torch.Tensor:
    return torch.from_numpy(_native.weight_buffer(rows, cols))


@register("weight_buffer", "reference", layout=True)
def _weight_buffer_reference(rows: int, cols: int) -> torch.Tensor:
    return torch.zeros(rows, cols, dtype=torch.uint8)


def weight_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a 2-D 8-bit weight tensor (packed ternary or int8) in weight memory
    (:func:`weight_empty`)."""
    if t.dim() != 2 or t.element_size() != 1:
        raise ValueError(f"weight_copy: expected a 2-D 8-bit tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")
    buf = weight_empty(t.shape[0], t.shape[1], t.dtype)
    buf.copy_(t)
    return buf


# ---- quantisation ---------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor) -> TernaryWeight:
    """Absmean-quantise float weights [out, in] to ternary and pack them.

    The scale is computed in float32 by torch exactly as the reference does, so the
    ternary values match the reference bit for bit.
    """
    wf = check_float_weight(w)
    if not torch.isfinite(wf).all():
        raise ValueError("weight: contains NaN or Inf")
    scale = float(reference.weight_scale(wf))
    return TernaryWeight(implementation("quantize_pack_ternary")(wf, scale), scale,
                         wf.shape[0], wf.shape[1])


@register("quantize_pack_ternary", "native", layout=True)
def _quantize_pack_native(wf: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.from_numpy(_native.quantize_pack_ternary(wf.numpy(), np.float32(scale)))


# ---- the ternary product --------------------------------------------------------------------


def ternary_linear(
    x: torch.Tensor, weight: TernaryWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = (quant(x) . T^T) / (s_x * s_w) (+ bias) for x [..., in_features] -> [..., out].

    Float in (fp32/fp16/bf16), float32 out. The integer part is exact; the result
    equals :func:`r3mes.kernels.reference.ternary_linear` bit for bit. A CUDA x (with a
    :class:`~r3mes.kernels.cuda.CudaTernaryWeight`) runs the CUDA kernel.
    """
    device = "cuda" if is_cuda(x) or not isinstance(weight, TernaryWeight) else "cpu"
    return implementation("ternary_linear", device)(x, weight, bias)


@register("ternary_linear", "native")
def _ternary_linear_native(x: torch.Tensor, weight: TernaryWeight,
                           bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None and fast_input(x, weight.in_features):
        # Decode's hot path: the checks above are all the slow path would do for this input.
        y = _native.ternary_linear(x.numpy().reshape(-1, weight.in_features), weight._packed_np,
                                   weight.in_features, weight.scale)
        return torch.from_numpy(y).view(*x.shape[:-1], weight.out_features)
    x2 = as_float32_matrix(x, "x", weight.in_features)
    b = check_bias(bias, weight.out_features)
    y = _native.ternary_linear(x2.numpy(), weight._packed_np, weight.in_features, weight.scale,
                               None if b is None else b.numpy())
    return torch.from_numpy(y).reshape(*x.shape[:-1], weight.out_features)


@register("ternary_linear", "reference")
def _ternary_linear_reference(x: torch.Tensor, weight: TernaryWeight,
                              bias: torch.Tensor | None) -> torch.Tensor:
    x2 = as_float32_matrix(x, "x", weight.in_features)
    b = check_bias(bias, weight.out_features)
    check_finite_activations(x2)
    y = reference.ternary_linear(x2, weight.unpack(), weight.scale, b)
    return y.reshape(*x.shape[:-1], weight.out_features)


register_cuda("ternary_linear")


def ternary_matmul_int(q: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
    """Exact int32 q [M, K] (int8) x T^T -> [M, N]: the integer core, exposed for tests."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError("q: expected a 2-D int8 tensor")
    if q.shape[1] != weight.in_features:
        raise ValueError(f"q: has {q.shape[1]} features, weight expects "
                         f"in_features={weight.in_features}")
    return implementation("ternary_matmul_int")(q.contiguous(), weight)


@register("ternary_matmul_int", "native")
def _ternary_matmul_int_native(q: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
    return torch.from_numpy(_native.ternary_gemm_int(q.numpy(), weight.packed.numpy(),
                                                     weight.in_features))


@register("ternary_matmul_int", "reference")
def _ternary_matmul_int_reference(q: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
    return reference.ternary_matmul_int(q, weight.unpack())
