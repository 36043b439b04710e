"""8-bit: per-token absmax int8 activation quantisation (the first step of every ternary,
int8 and int4 product) and the per-row int8 weights of the layers that stay 8-bit (the LM
head): :class:`Int8Weight`, :func:`quantize_int8_weight`, :func:`int8_linear`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r3mes.kernels import reference
from r3mes.kernels._checks import (
    as_float32_matrix,
    check_finite_activations,
    check_float_weight,
    is_cuda,
)
from r3mes.kernels.dispatch import _native, implementation, register, register_cuda, run_on_rows

__all__ = ["Int8Weight", "int8_linear", "quantize_activations", "quantize_int8_weight"]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantisation of x [..., K].

    Returns ``(q, scale)``: q int8 [..., K], scale float32 [...] with
    ``q = clamp(round(x * scale), -128, 127)`` and ``scale = 127 / max(max|x|, 1e-5)``.
    Raises ValueError on NaN/Inf (on a CUDA x, see :func:`r3mes.kernels.cuda.quantize_activations`).
    """
    if is_cuda(x):
        return implementation("quantize_activations", "cuda")(x)
    x2 = as_float32_matrix(x, "x")
    q, s = implementation("quantize_activations")(x2)
    lead = x.shape[:-1]
    return q.reshape(*lead, x.shape[-1]), s.reshape(lead)


@register("quantize_activations", "native")
def _quantize_activations_native(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qn, sn = _native.quantize_activations(x2.numpy())
    return torch.from_numpy(qn), torch.from_numpy(sn)


@register("quantize_activations", "reference")
def _quantize_activations_reference(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_finite_activations(x2)
    return reference.quantize_activations(x2)


register_cuda("quantize_activations")


@dataclass(frozen=True)
class Int8Weight:
    """A per-row absmax int8 weight for the layers that stay 8-bit (the LM head).

    ``data`` is int8 [out_features, in_features padded to 64], ``scale`` float32 [out]
    (s_w per row, dequantised row = data / scale), ``row_sums`` int32 [out] (used by the
    VNNI kernel to offset its unsigned activations).
    """

    data: torch.Tensor
    scale: torch.Tensor
    row_sums: torch.Tensor
    out_features: int
    in_features: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] this int8 weight represents."""
        return self.data[:, : self.in_features].float() / self.scale.unsqueeze(-1)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantised rows (an embedding lookup on a tied head): [..., in_features]."""
        return self.data[index, : self.in_features].float() / self.scale[index].unsqueeze(-1)


def quantize_int8_weight(w: torch.Tensor) -> Int8Weight:
    """Per-row absmax int8 quantisation of float weights [out, in]."""
    wf = check_float_weight(w)
    return implementation("quantize_int8_weight")(wf)


@register("quantize_int8_weight", "native", layout=True)
def _quantize_int8_weight_native(wf: torch.Tensor) -> Int8Weight:
    data, scale, row_sums = _native.quantize_int8_weight(wf.numpy())
    return Int8Weight(torch.from_numpy(data), torch.from_numpy(scale), torch.from_numpy(row_sums),
                      wf.shape[0], wf.shape[1])


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """y = (quant(x) . W8^T) / (s_x * s_w[n]) for x [..., in] -> float32 [..., out]."""
    return run_on_rows("int8_linear", x, weight)


@register("int8_linear", "native")
def _int8_linear_native(x2: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    return torch.from_numpy(_native.int8_linear(
        x2.numpy(), weight.data.numpy(), weight.scale.numpy(), weight.row_sums.numpy(),
        weight.in_features,
    ))


@register("int8_linear", "reference")
def _int8_linear_reference(x2: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    check_finite_activations(x2)
    return reference.int8_linear(x2, weight.data[:, : weight.in_features], weight.scale)
