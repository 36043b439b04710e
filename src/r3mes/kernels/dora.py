"""DoRA (issue 3): factored row norms and the fused multi-expert kernel.

The math is DESIGN.md's DoRA contract; the storage layout is documented in
``csrc/dora/dora.h``. Every op's torch reference (``"reference"`` in its table) lives in
:mod:`r3mes.kernels.reference` and defines it: :func:`dora_linear_reference` is the unfused
definition of :func:`dora_linear`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from r3mes.kernels import reference
from r3mes.kernels._checks import (
    as_float32_matrix,
    check_adapter_tensors,
    check_base_weight,
    check_bias,
    check_finite_activations,
    check_mix,
    fast_input,
    is_cuda,
)
from r3mes.kernels.dispatch import _native, implementation, register, register_cuda
from r3mes.kernels.reference import dora_linear_reference
from r3mes.kernels.ternary import TernaryWeight

__all__ = [
    "ADAPTER_STORAGES",
    "DoRAKernelAdapter",
    "DoRAMix",
    "dora_gain",
    "dora_linear",
    "dora_linear_reference",
    "dora_mix_linear",
    "dora_row_norms",
    "prepare_dora_adapter",
    "prepare_dora_mix",
    "ternary_float_matmul",
]

ADAPTER_STORAGES = ("fp16", "fp32", "int8")


@dataclass(frozen=True)
class DoRAKernelAdapter:
    """One DoRA adapter prepared for :func:`dora_linear` (the load-time "merge" step).

    ``lora_A`` [r, in], ``lora_B`` [out, r] are the float32 tensors it was made from
    (shared, not copied); :meth:`effective` gives the values the kernel applies (fp16-rounded
    for ``storage="fp16"``, int8-quantised for ``"int8"``). ``g`` [out] = m / ||W0 + s B A||_row;
    ``scaling`` s.
    ``native`` is the kernel's own copy (None without the native module, or when prepared
    in reference mode).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    g: torch.Tensor
    scaling: float
    storage: str
    native: Any = None

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def folded_B(self) -> torch.Tensor:
        """G = g (.) B [out, r]: the kernel stores B with the gain folded in, so the update
        term ``s G (A x)`` needs no gain of its own (csrc/dora/dora.h)."""
        return self.g.unsqueeze(1) * self.lora_B

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, G) as the kernel applies them (G = :attr:`folded_B`): exact for fp32,
        fp16-rounded for fp16, absmax int8 (A per row, G per column) for int8."""
        g_b = self.folded_B
        if self.storage == "fp16":
            return (reference.fp16_storage_values(self.lora_A),
                    reference.fp16_storage_values(g_b))
        if self.storage == "int8":
            return (reference.int8_storage_values(self.lora_A, dim=1),
                    reference.int8_storage_values(g_b, dim=0))
        return self.lora_A, g_b

    @property
    def nbytes(self) -> int:
        """Bytes the fused kernel reads for this adapter (A, B and g)."""
        if self.native is not None:
            return int(self.native.nbytes)
        per = {"fp16": 2, "int8": 1}.get(self.storage, 4)
        extra = 4 * self.rank if self.storage == "int8" else 0
        return per * (self.lora_A.numel() + self.lora_B.numel()) + 4 * self.g.numel() + extra


# ---- load time: row norms, gains, the kernel's copy of an adapter ----------------------------


def dora_row_norms(
    weight: TernaryWeight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||W0 + s B A||_row as float64 [out], without forming the out x in matrix.

    ``||W0_o||^2 + 2 s B_o (W0 A^T)_o + s^2 B_o (A A^T) B_o^T`` where ``||W0_o||^2`` is the
    row's nonzero count / s_w^2 and ``W0 A^T`` is a ternary x float product. A
    :class:`~r3mes.kernels.cuda.CudaTernaryWeight` runs the CUDA kernel.
    """
    if not isinstance(weight, TernaryWeight):
        return implementation("dora_row_norms", "cuda")(weight, lora_A, lora_B, scaling)
    a, b = check_adapter_tensors(lora_A, lora_B, weight.out_features, weight.in_features)
    return implementation("dora_row_norms")(weight, a, b, scaling)


@register("dora_row_norms", "native")
def _dora_row_norms_native(weight: TernaryWeight, a: torch.Tensor, b: torch.Tensor,
                           scaling: float) -> torch.Tensor:
    return torch.from_numpy(_native.dora_row_norms(
        weight.packed.numpy(), weight.in_features, weight.scale, a.numpy(), b.numpy(),
        float(scaling),
    ))


@register("dora_row_norms", "reference")
def _dora_row_norms_reference(weight: TernaryWeight, a: torch.Tensor, b: torch.Tensor,
                              scaling: float) -> torch.Tensor:
    return reference.dora_row_norms(weight.dequantize(), a, b, scaling)


register_cuda("dora_row_norms")


def ternary_float_matmul(weight: TernaryWeight, a: torch.Tensor) -> torch.Tensor:
    """W0 . a^T for float a [R, in] -> float32 [out, R] (ternary x float, no activation quant)."""
    a = a.detach().to(torch.float32).contiguous()
    if a.dim() != 2 or a.shape[1] != weight.in_features:
        raise ValueError(f"a: expected [R, {weight.in_features}], got {tuple(a.shape)}")
    return implementation("ternary_float_matmul")(weight, a)


@register("ternary_float_matmul", "native")
def _ternary_float_matmul_native(weight: TernaryWeight, a: torch.Tensor) -> torch.Tensor:
    out = _native.ternary_float_matmul(weight.packed.numpy(), weight.in_features, a.numpy())
    return torch.from_numpy(out) / weight.scale


@register("ternary_float_matmul", "reference")
def _ternary_float_matmul_reference(weight: TernaryWeight, a: torch.Tensor) -> torch.Tensor:
    return reference.ternary_float_matmul(weight.dequantize(), a)


def dora_gain(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """g = m / norm as float32; rows whose norm is 0 (an all-zero row of W0 + sBA, whose
    output is 0 whatever the gain) get g = 0 instead of inf/nan."""
    m = magnitude.detach().double()
    n = norms.detach().double()
    return torch.where(n > 0, m / n.clamp(min=torch.finfo(torch.float64).tiny), 0.0).float()


def prepare_dora_adapter(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    storage: str = "fp16",
) -> DoRAKernelAdapter:
    """Convert one adapter to the fused kernel's storage (``"fp16"`` compact, ``"int8"``
    smallest, ``"fp32"`` exact). ``g`` is the per-row gain m / ||W0 + s B A||_row (see
    :func:`dora_row_norms`)."""
    if storage not in ADAPTER_STORAGES:
        raise ValueError(f"storage: expected one of {ADAPTER_STORAGES}, got {storage!r}")
    a, b = check_adapter_tensors(lora_A, lora_B, None, None)
    gf = g.detach().to(torch.float32).contiguous()
    if gf.shape != (b.shape[0],):
        raise ValueError(f"g: expected shape ({b.shape[0]},), got {tuple(gf.shape)}")
    for label, t in (("lora_A", a), ("lora_B", b), ("g", gf)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{label}: contains NaN or Inf")
    if not math.isfinite(float(scaling)):
        raise ValueError("scaling: must be finite")
    native = implementation("dora_adapter")(a, b, gf, float(scaling), storage)
    return DoRAKernelAdapter(a, b, gf, float(scaling), storage, native)


@register("dora_adapter", "native")
def _dora_adapter_native(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, scaling: float,
                         storage: str) -> Any:
    return _native.dora_adapter(a.numpy(), b.numpy(), g.numpy(), scaling, storage)


@register("dora_adapter", "reference")
def _dora_adapter_reference(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, scaling: float,
                            storage: str) -> None:
    """No kernel copy: the reference reads the storage's values from the adapter itself
    (:meth:`DoRAKernelAdapter.effective`)."""
    return None


# ---- the fused mix ----------------------------------------------------------------------------


def dora_linear(
    x: torch.Tensor,
    weight: TernaryWeight,
    adapters: list[DoRAKernelAdapter],
    mix: torch.Tensor,
    bias: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused DoRA mix for x [..., in] -> float32 [..., out].

    ``mix`` [1 or M, E] holds each token's weight on each adapter (M = tokens, E =
    len(adapters); rows normalised by the caller). Per token:
    ``y = sum_e w_e g_e * (base + s_e B_e (A_e x)) + bias`` with base the quantised ternary
    product, one ternary GEMM for all adapters; a token whose weights are all 0 gets
    ``base + bias``. ``base_weight`` [1 or M] (optional) adds ``b * base`` per token: the
    share of the mix that goes to "no adapter" (an expert that does not cover this layer).
    The adapter path sees the float x (not the int8-quantised x). Adapters prepared
    without the native module run the reference.
    """
    if is_cuda(x) or not isinstance(weight, TernaryWeight):
        return implementation("dora_linear", "cuda")(x, weight, adapters, mix, bias, base_weight)
    run = implementation("dora_linear",
                         native_ready=all(ad.native is not None for ad in adapters))
    return run(x, weight, adapters, mix, bias, base_weight)


def _dora_inputs(x: torch.Tensor, weight: TernaryWeight, adapters: list[DoRAKernelAdapter],
                 mix: torch.Tensor, bias: torch.Tensor | None,
                 base_weight: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dora_linear's arguments checked: (x [M, in] float32, mix, base_weight, bias)."""
    x2 = as_float32_matrix(x, "x", weight.in_features)
    mixm = check_mix(mix, x2.shape[0], len(adapters))
    bw = check_base_weight(base_weight, mixm.shape[0])
    for i, ad in enumerate(adapters):
        if ad.lora_A.shape[1] != weight.in_features or ad.lora_B.shape[0] != weight.out_features:
            raise ValueError(
                f"adapters[{i}]: shape ({ad.lora_B.shape[0]}, {ad.lora_A.shape[1]}) does not "
                f"match the weight ({weight.out_features}, {weight.in_features})"
            )
    return x2, mixm, bw, check_bias(bias, weight.out_features)


@register("dora_linear", "native")
def _dora_linear_native(x: torch.Tensor, weight: TernaryWeight,
                        adapters: list[DoRAKernelAdapter], mix: torch.Tensor,
                        bias: torch.Tensor | None, base_weight: torch.Tensor | None
                        ) -> torch.Tensor:
    if (
        bias is None
        and base_weight is None
        and fast_input(x, weight.in_features)
        and type(mix) is torch.Tensor
        and mix.dtype is torch.float32
        and mix.is_contiguous()
    ):
        # Decode's hot path: the native call validates shapes, dims and finiteness itself;
        # Python-side checks would cost more than the rank-r work of a decode step.
        y = _native.dora_linear(x.numpy().reshape(-1, weight.in_features), weight._packed_np,
                                weight.in_features, weight.scale, None,
                                [ad.native for ad in adapters], mix.numpy(), None)
        return torch.from_numpy(y).view(*x.shape[:-1], weight.out_features)
    x2, mixm, bw, b = _dora_inputs(x, weight, adapters, mix, bias, base_weight)
    y = _native.dora_linear(
        x2.numpy(), weight._packed_np, weight.in_features, weight.scale,
        None if b is None else b.numpy(), [ad.native for ad in adapters],
        mixm.numpy(), None if bw is None else bw.numpy(),
    )
    return torch.from_numpy(y).reshape(*x.shape[:-1], weight.out_features)


@register("dora_linear", "reference")
def _dora_linear_reference(x: torch.Tensor, weight: TernaryWeight,
                           adapters: list[DoRAKernelAdapter], mix: torch.Tensor,
                           bias: torch.Tensor | None, base_weight: torch.Tensor | None
                           ) -> torch.Tensor:
    x2, mixm, bw, b = _dora_inputs(x, weight, adapters, mix, bias, base_weight)
    check_finite_activations(x2)
    y = dora_linear_reference(x2, weight, adapters, mixm, b, bw)
    return y.reshape(*x.shape[:-1], weight.out_features)


register_cuda("dora_linear")


@dataclass(frozen=True)
class DoRAMix:
    """A DoRA mix prepared once for many :func:`dora_mix_linear` calls (a query's routed
    experts, fixed for its whole decode): the adapters, the mix weights [rows, E], the
    optional base weight [rows], and ``base_factor`` [rows, out], the factor on the base
    output ``base_weight + sum_e w_e g_e`` (1 for a row with no adapter), so each call reads
    one float a row for the base instead of every adapter's gain. ``native`` is the
    kernel's plan (None without the native module, or when prepared in reference mode)."""

    adapters: tuple[DoRAKernelAdapter, ...]
    weights: torch.Tensor
    base_weight: torch.Tensor | None
    base_factor: torch.Tensor
    native: Any = None


def prepare_dora_mix(adapters: list[DoRAKernelAdapter], mix: torch.Tensor,
                     base_weight: torch.Tensor | None = None) -> DoRAMix:
    """Fix a mix for :func:`dora_mix_linear`: ``mix`` [rows, E] (1 row for every token, or
    one per token of the calls to come), ``base_weight`` [rows] as in :func:`dora_linear`."""
    if not adapters:
        raise ValueError("adapters: a prepared mix needs at least one adapter")
    shape = (adapters[0].lora_B.shape[0], adapters[0].lora_A.shape[1])
    for i, ad in enumerate(adapters):
        if (ad.lora_B.shape[0], ad.lora_A.shape[1]) != shape:
            raise ValueError(f"adapters[{i}]: shape ({ad.lora_B.shape[0]}, "
                             f"{ad.lora_A.shape[1]}) differs from adapters[0] {shape}")
    mixm = torch.as_tensor(mix).detach().to(torch.float32)
    if mixm.dim() != 2 or mixm.shape[0] == 0:
        raise ValueError(f"mix: expected shape [rows, {len(adapters)}], got "
                         f"{tuple(mixm.shape)}")
    mixm = check_mix(mixm, mixm.shape[0], len(adapters))
    bw = check_base_weight(base_weight, mixm.shape[0])
    if bw is not None:
        bw = bw.expand(mixm.shape[0]).contiguous()
    plan = implementation("dora_mix_plan",
                          native_ready=all(ad.native is not None for ad in adapters))
    native, factor = plan(adapters, mixm, bw)
    return DoRAMix(tuple(adapters), mixm, bw, factor, native)


@register("dora_mix_plan", "native")
def _dora_mix_plan_native(adapters: list[DoRAKernelAdapter], mix: torch.Tensor,
                          base_weight: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
    plan = _native.DoraMixPlan([ad.native for ad in adapters], mix.numpy(),
                               None if base_weight is None else base_weight.numpy())
    return plan, torch.from_numpy(plan.base_factor)


@register("dora_mix_plan", "reference")
def _dora_mix_plan_reference(adapters: list[DoRAKernelAdapter], mix: torch.Tensor,
                             base_weight: torch.Tensor | None) -> tuple[None, torch.Tensor]:
    gains = torch.stack([ad.g for ad in adapters])  # [E, out]
    return None, reference.dora_mix_factor(gains, mix, base_weight)


def dora_mix_linear(x: torch.Tensor, weight: TernaryWeight, mix: DoRAMix,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dora_linear` with a mix from :func:`prepare_dora_mix`: the same result
    (to float rounding), with the gains already summed into ``mix.base_factor``. A mix
    prepared without the native module (or a CUDA x) runs as :func:`dora_linear`."""
    if not isinstance(mix, DoRAMix):
        raise TypeError("mix: expected a DoRAMix from prepare_dora_mix")
    device = "cuda" if is_cuda(x) or not isinstance(weight, TernaryWeight) else "cpu"
    run = implementation("dora_mix_linear", device, native_ready=mix.native is not None)
    return run(x, weight, mix, bias)


@register("dora_mix_linear", "native")
def _dora_mix_linear_native(x: torch.Tensor, weight: TernaryWeight, mix: DoRAMix,
                            bias: torch.Tensor | None) -> torch.Tensor:
    if fast_input(x, weight.in_features):
        # Decode's hot path, as ternary_linear's: the native call makes every remaining
        # check itself.
        x_np = x.numpy().reshape(-1, weight.in_features)
    else:
        x_np = as_float32_matrix(x, "x", weight.in_features).numpy()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous().numpy()
    y = _native.dora_mix_linear(x_np, weight._packed_np, weight.in_features, weight.scale, b,
                                mix.native)
    return torch.from_numpy(y).view(*x.shape[:-1], weight.out_features)


def _dora_mix_unfused(x: torch.Tensor, weight: TernaryWeight, mix: DoRAMix,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """The mix without a native plan: :func:`dora_linear` on its adapters and weights
    (which takes the reference, or the CUDA kernel for a CUDA x)."""
    tokens = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    if mix.weights.shape[0] not in (1, tokens):
        raise ValueError(f"mix: prepared for {mix.weights.shape[0]} rows, x has {tokens} "
                         "tokens")
    return dora_linear(x, weight, list(mix.adapters), mix.weights, bias, mix.base_weight)


register("dora_mix_linear", "reference")(_dora_mix_unfused)
register("dora_mix_linear", "cuda")(_dora_mix_unfused)
