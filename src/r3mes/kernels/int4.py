"""The 4-bit LM head: group-wise int4 weights with integer group scales
(:class:`Int4Weight`, :func:`quantize_int4_weight`) and :func:`int4_linear`, whose int8 x
int4 sums are exact integers, so results are the same at every SIMD level. The layout is
documented in ``csrc/head/int4_gemm.h``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r3mes.kernels import reference
from r3mes.kernels._checks import check_finite_activations, check_float_weight
from r3mes.kernels.dispatch import _native, implementation, register, run_on_rows

__all__ = ["INT4_GROUPS", "Int4Weight", "int4_linear", "quantize_int4_weight"]

INT4_GROUPS = (64, 128)


@dataclass(frozen=True)
class Int4Weight:
    """A group-wise int4 weight for the 4-bit LM head (``csrc/head/int4_gemm.h``).

    ``packed`` uint8 [out, Kp / 2] (Kp: in_features padded to 128; two values a byte, each
    stored + 8), ``group_scales`` uint8 [out, Kp / group] (integer scale of each group of
    ``group`` values), ``scale`` float32 [out] and ``offsets`` int32 [out] (the kernels'
    unsigned-activation correction). Row n is ``w4 * group_scale / scale[n]``; dot products
    with int8 activations are exact integers, so results are the same at every SIMD level.
    """

    packed: torch.Tensor
    group_scales: torch.Tensor
    scale: torch.Tensor
    offsets: torch.Tensor
    out_features: int
    in_features: int
    group: int

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight [out, in] (or just ``rows``) this int4 weight represents."""
        packed = self.packed if rows is None else self.packed[rows]
        subs = self.group_scales if rows is None else self.group_scales[rows]
        scale = self.scale if rows is None else self.scale[rows]
        w4 = reference.unpack_int4(packed.reshape(-1, packed.shape[-1]), packed.shape[-1] * 2)
        w = w4.float() * subs.reshape(-1, subs.shape[-1]).float().repeat_interleave(self.group, 1)
        w = w[:, : self.in_features] / scale.reshape(-1, 1)
        return w.reshape(*packed.shape[:-1], self.in_features)

    def nbytes(self) -> int:
        return (self.packed.numel() + self.group_scales.numel() + self.scale.numel() * 4
                + self.offsets.numel() * 4)


def quantize_int4_weight(w: torch.Tensor, group: int = 64,
                         importance: torch.Tensor | None = None) -> Int4Weight:
    """Group-wise int4 quantisation of float weights [out, in] (in <= 8192): per group of
    ``group`` values (64 or 128) the step with the least squared error among a few
    candidates, held as an integer multiple (1..255) of one float unit per row.

    ``importance`` [in] (optional): weights of each input feature's squared error, e.g.
    the mean square of the activations this weight multiplies on calibration text."""
    wf = check_float_weight(w)
    if group not in INT4_GROUPS:
        raise ValueError(f"group: expected one of {INT4_GROUPS}, got {group!r}")
    imp = None if importance is None else importance.detach().float().contiguous()
    return implementation("quantize_int4_weight")(wf, group, imp)


@register("quantize_int4_weight", "native", layout=True)
def _quantize_int4_weight_native(wf: torch.Tensor, group: int,
                                 importance: torch.Tensor | None) -> Int4Weight:
    packed, subs, scale, offsets = _native.quantize_int4_weight(
        wf.numpy(), group, None if importance is None else importance.numpy())
    return Int4Weight(torch.from_numpy(packed), torch.from_numpy(subs), torch.from_numpy(scale),
                      torch.from_numpy(offsets), wf.shape[0], wf.shape[1], group)


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """y = (quant(x) . W4^T) / (s_x * s_w[n]) for x [..., in] -> float32 [..., out]."""
    return run_on_rows("int4_linear", x, weight)


@register("int4_linear", "native")
def _int4_linear_native(x2: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    return torch.from_numpy(_native.int4_linear(
        x2.numpy(), weight.packed.numpy(), weight.group_scales.numpy(),
        weight.scale.numpy(), weight.offsets.numpy(), weight.in_features, weight.group))


@register("int4_linear", "reference")
def _int4_linear_reference(x2: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    check_finite_activations(x2)
    return reference.int4_linear(x2, weight.packed, weight.group_scales, weight.scale,
                                 weight.in_features, weight.group)
