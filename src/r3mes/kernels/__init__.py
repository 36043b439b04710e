"""The one place that decides between the native kernels and the torch reference.

Callers use these functions and never test for a CPU feature themselves:

* :func:`quantize_activations` - per-token absmax int8 quantisation.
* :func:`quantize_weight` - absmean ternary quantisation, packed (:class:`TernaryWeight`).
* :func:`ternary_linear` - float in, float out, exactly the numerical contract.
* :func:`available` / :func:`cpu_features` / :func:`info` - what was compiled and what runs.

The native module takes numpy buffers; CPU tensors cross without a copy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from r3mes.kernels import reference
from r3mes.kernels._checks import FLOAT_DTYPES, check_float_features

try:
    from r3mes import _native
except ImportError as exc:  # pragma: no cover - only without a built extension
    _native = None
    _NATIVE_IMPORT_ERROR: Exception | None = exc
else:
    _NATIVE_IMPORT_ERROR = None

__all__ = [
    "INT4_GROUPS",
    "Int4Weight",
    "Int8Weight",
    "TernaryWeight",
    "available",
    "cpu_features",
    "decode_attention",
    "get_num_threads",
    "info",
    "int4_linear",
    "int8_linear",
    "weight_copy",
    "weight_empty",
    "quantize_activations",
    "quantize_int4_weight",
    "quantize_int8_weight",
    "quantize_weight",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "ternary_linear",
    "use_native",
]



def available() -> bool:
    """True when the native CPU module is importable."""
    return _native is not None


def use_native() -> bool:
    """Whether kernels run natively now (``R3MES_BACKEND=torch`` forces the reference)."""
    return _native is not None and os.environ.get("R3MES_BACKEND", "").lower() != "torch"


def _require_native() -> Any:
    if _native is None:
        raise RuntimeError(f"r3mes native module is not available: {_NATIVE_IMPORT_ERROR}")
    return _native


def info() -> dict[str, Any]:
    """Version, compiled and supported SIMD levels, CPU features, thread count, CUDA."""
    from r3mes import __version__

    out: dict[str, Any] = {"version": __version__, "native": available()}
    if _native is not None:
        native = _native.info()
        native.pop("version", None)
        out.update(native)
    out["cuda"] = cuda_info()
    return out


def cuda_info() -> dict[str, Any]:
    """Whether the CUDA module was built, its architectures, and the devices it sees."""
    from r3mes.kernels import cuda as _cuda

    return _cuda.info()


def _is_cuda(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def cpu_features() -> dict[str, bool]:
    """CPU features the kernels dispatch on (empty without the native module)."""
    return dict(_native.info()["cpu_features"]) if _native is not None else {}


def simd_level() -> str:
    """The SIMD level the native kernels use now."""
    return _require_native().get_simd_level()


def set_simd_level(level: str) -> None:
    """Force a SIMD level (scalar, avx2, avx512, avx512vnni); ValueError if the CPU lacks it."""
    _require_native().set_simd_level(level)


def get_num_threads() -> int:
    return _require_native().get_num_threads()


def set_num_threads(n: int) -> None:
    """Threads for the native kernels; ``n <= 0`` restores the default (all cores)."""
    _require_native().set_num_threads(int(n))


def _as_float32_matrix(x: torch.Tensor, name: str, in_features: int | None = None
                       ) -> torch.Tensor:
    """x [..., K] -> float32 [M, K]; with ``in_features``, K must equal it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_float_features(x, name, in_features)
    if x.device.type != "cpu":
        raise ValueError(f"{name}: the CPU kernels need a CPU tensor, got device {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
    return x.detach().to(torch.float32).reshape(-1, x.shape[-1])


def _fast_input(x: Any, in_features: int) -> bool:
    """Whether x can go straight to the native kernel (decode's hot path): a plain float32
    contiguous CPU tensor without autograd, with in_features columns. These are all the
    checks the slow path would make for such an input."""
    return (
        type(x) is torch.Tensor
        and x.dtype is torch.float32
        and x.dim() >= 1
        and x.shape[-1] == in_features
        and x.is_contiguous()
        and not x.requires_grad
        and x.device.type == "cpu"
        and use_native()
    )


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantisation of x [..., K].

    Returns ``(q, scale)``: q int8 [..., K], scale float32 [...] with
    ``q = clamp(round(x * scale), -128, 127)`` and ``scale = 127 / max(max|x|, 1e-5)``.
    Raises ValueError on NaN/Inf.
    """
    if _is_cuda(x):
        from r3mes.kernels import cuda as _cuda  # lazy: cuda.py imports this package

        return _cuda.quantize_activations(x)
    x2 = _as_float32_matrix(x, "x")
    lead = x.shape[:-1]
    if not use_native():
        if not torch.isfinite(x2).all():
            raise ValueError("x: activations contain NaN or Inf")
        q, s = reference.quantize_activations(x2)
    else:
        qn, sn = _native.quantize_activations(x2.numpy())
        q, s = torch.from_numpy(qn), torch.from_numpy(sn)
    return q.reshape(*lead, x.shape[-1]), s.reshape(lead)


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
        if _native is None:
            return reference.unpack_ternary(self.packed, self.in_features)
        return torch.from_numpy(_native.unpack_ternary(self.packed.numpy(), self.in_features))

    def dequantize(self) -> torch.Tensor:
        """W0 = T / s_w as float32."""
        return self.unpack().float() / self.scale

    @classmethod
    def from_ternary(cls, ternary: torch.Tensor, scale: float) -> TernaryWeight:
        """Pack int8 values in {-1, 0, 1} [out, in] with a given scale s_w."""
        if ternary.dim() != 2:
            raise ValueError(f"ternary: expected a 2-D tensor, got shape {tuple(ternary.shape)}")
        t = ternary.detach().to(torch.int8).contiguous()
        packed = torch.from_numpy(_require_native().pack_ternary(t.numpy()))
        return cls(packed, float(scale), t.shape[0], t.shape[1])


def weight_empty(rows: int, cols: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A zeroed 8-bit weight tensor [rows, cols] in weight memory: on 2 MiB pages when it is
    at least 2 MiB (decode streams every weight once per token; see
    csrc/common/huge_pages.h). Ordinary memory without the native module."""
    if dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"weight memory holds 8-bit weights, got {dtype}")
    if not available():
        return torch.zeros(rows, cols, dtype=dtype)
    return torch.from_numpy(_native.weight_buffer(rows, cols)).view(dtype)


def weight_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a 2-D 8-bit weight tensor (packed ternary or int8) in weight memory
    (:func:`weight_empty`)."""
    if t.dim() != 2 or t.element_size() != 1:
        raise ValueError(f"weight_copy: expected a 2-D 8-bit tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")
    buf = weight_empty(t.shape[0], t.shape[1], t.dtype)
    buf.copy_(t)
    return buf


def quantize_weight(w: torch.Tensor) -> TernaryWeight:
    """Absmean-quantise float weights [out, in] to ternary and pack them.

    The scale is computed in float32 by torch exactly as the reference does, so the
    ternary values match the reference bit for bit.
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise TypeError("weight: expected a floating-point torch.Tensor")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight: expected a non-empty 2-D tensor, got shape {tuple(w.shape)}")
    wf = w.detach().to(torch.float32).contiguous()
    if not torch.isfinite(wf).all():
        raise ValueError("weight: contains NaN or Inf")
    scale = float(reference.weight_scale(wf))
    packed = _require_native().quantize_pack_ternary(wf.numpy(), np.float32(scale))
    return TernaryWeight(torch.from_numpy(packed), scale, wf.shape[0], wf.shape[1])


def ternary_linear(
    x: torch.Tensor, weight: TernaryWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = (quant(x) . T^T) / (s_x * s_w) (+ bias) for x [..., in_features] -> [..., out].

    Float in (fp32/fp16/bf16), float32 out. The integer part is exact; the result
    equals :func:`r3mes.kernels.reference.ternary_linear` bit for bit.
    """
    if bias is None and type(weight) is TernaryWeight and _fast_input(x, weight.in_features):
        # Decode's hot path: the checks above are all the slow path would do for this input.
        y = _native.ternary_linear(x.numpy().reshape(-1, weight.in_features), weight._packed_np,
                                   weight.in_features, weight.scale)
        return torch.from_numpy(y).view(*x.shape[:-1], weight.out_features)
    if _is_cuda(x) or not isinstance(weight, TernaryWeight):
        from r3mes.kernels import cuda as _cuda

        return _cuda.ternary_linear(x, weight, bias)
    x2 = _as_float32_matrix(x, "x", weight.in_features)
    lead = x.shape[:-1]
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
        if bias.shape != (weight.out_features,):
            raise ValueError(
                f"bias: expected shape ({weight.out_features},), got {tuple(bias.shape)}"
            )
    if not use_native():
        if not torch.isfinite(x2).all():
            raise ValueError("x: activations contain NaN or Inf")
        y = reference.ternary_linear(x2, weight.unpack(), weight.scale, bias)
    else:
        y = torch.from_numpy(
            _native.ternary_linear(
                x2.numpy(),
                weight._packed_np,
                weight.in_features,
                weight.scale,
                None if bias is None else bias.numpy(),
            )
        )
    return y.reshape(*lead, weight.out_features)


def ternary_matmul_int(q: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
    """Exact int32 q [M, K] (int8) x T^T -> [M, N]: the integer core, exposed for tests."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError("q: expected a 2-D int8 tensor")
    out = _require_native().ternary_gemm_int(q.contiguous().numpy(), weight.packed.numpy(),
                                             weight.in_features)
    return torch.from_numpy(out)


# ===========================================================================
# DoRA (issue 3): factored row norms and the fused multi-expert kernel.
# The math is DESIGN.md's DoRA contract; the storage layout is documented in
# csrc/dora/dora.h. Every function has a plain-torch fallback that defines it.
# ===========================================================================

ADAPTER_STORAGES = ("fp16", "fp32", "int8")


@dataclass(frozen=True)
class DoRAKernelAdapter:
    """One DoRA adapter prepared for :func:`dora_linear` (the load-time "merge" step).

    ``lora_A`` [r, in], ``lora_B`` [out, r] are the float32 tensors it was made from
    (shared, not copied); :meth:`effective` gives the values the kernel applies (fp16-rounded
    for ``storage="fp16"``, int8-quantised for ``"int8"``). ``g`` [out] = m / ||W0 + s B A||_row;
    ``scaling`` s.
    ``native`` is the kernel's own copy (None without the native module).
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
            return _fp16_effective(self.lora_A), _fp16_effective(g_b)
        if self.storage == "int8":
            return _int8_effective(self.lora_A, dim=1), _int8_effective(g_b, dim=0)
        return self.lora_A, g_b

    @property
    def nbytes(self) -> int:
        """Bytes the fused kernel reads for this adapter (A, B and g)."""
        if self.native is not None:
            return int(self.native.nbytes)
        per = {"fp16": 2, "int8": 1}.get(self.storage, 4)
        extra = 4 * self.rank if self.storage == "int8" else 0
        return per * (self.lora_A.numel() + self.lora_B.numel()) + 4 * self.g.numel() + extra


def _pow2_scale(t: torch.Tensor) -> float:
    """Smallest power of two above max|t| (1 for zeros): t / scale is exact, in (-1, 1)."""
    mx = float(t.abs().max()) if t.numel() else 0.0
    if mx == 0.0:
        return 1.0
    return float(2.0 ** int(torch.frexp(torch.tensor(mx, dtype=torch.float32)).exponent))


def _int8_scale(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The int8 storage's symmetric absmax scale along ``dim``: max|t| / 127, 1 for zeros."""
    amax = t.abs().amax(dim=dim, keepdim=True)
    return torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)


def _int8_effective(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Symmetric absmax int8 along ``dim``, round half to even, dequantised: the values the
    int8 kernel storage represents (csrc/dora/dora.h)."""
    scale = _int8_scale(t, dim)
    return torch.clamp(torch.round(t / scale), -127, 127) * scale


def _int16_grid(t: torch.Tensor, qmax: float, floor: float = 0.0) -> torch.Tensor:
    """Each row of t on a grid of max|row| / qmax (round half to even), dequantised; a row
    whose max|row| is below ``floor`` becomes 0."""
    amax = t.abs().amax(dim=1, keepdim=True)
    amax = torch.where(amax < floor, torch.zeros_like(amax), amax)
    inv = torch.where(amax == 0, torch.zeros_like(amax), qmax / amax)
    return torch.clamp(torch.round(t * inv), -qmax, qmax) * (amax / qmax)


def _int8_low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   lora_b: torch.Tensor) -> torch.Tensor:
    """B (A x) as the int8 kernels compute it (csrc/dora/dora.h): x on an int16 grid per
    token, then z = sb * (A x) (sb: B's per-column int8 scale) on an int16 grid per token
    and adapter, multiplied by B's int8 values."""
    rank = a.shape[0]
    rank2 = rank + rank % 2
    qmax = float(min(32767, (2**31 - 1) // (127 * rank2)))
    sb = _int8_scale(lora_b, dim=0)[0]
    z = (_int16_grid(x, 32767.0, floor=1e-30).double() @ a.t().double()) * sb.double()
    return ((_int16_grid(z, qmax, floor=1e-30) / sb.double()) @ b.t().double()).to(x.dtype)


def _fp16_effective(t: torch.Tensor) -> torch.Tensor:
    scale = _pow2_scale(t)
    return (t / scale).half().float() * scale


def _check_adapter_tensors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, out_features: int | None, in_features: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    a = lora_A.detach().to(torch.float32).contiguous()
    b = lora_B.detach().to(torch.float32).contiguous()
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"lora_A/lora_B: expected 2-D tensors, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"lora_B: has {b.shape[1]} columns but lora_A has rank {a.shape[0]} rows"
        )
    if in_features is not None and a.shape[1] != in_features:
        raise ValueError(f"lora_A: has {a.shape[1]} columns, expected in_features={in_features}")
    if out_features is not None and b.shape[0] != out_features:
        raise ValueError(f"lora_B: has {b.shape[0]} rows, expected out_features={out_features}")
    return a, b


def dora_row_norms(
    weight: TernaryWeight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||W0 + s B A||_row as float64 [out], without forming the out x in matrix.

    ``||W0_o||^2 + 2 s B_o (W0 A^T)_o + s^2 B_o (A A^T) B_o^T`` where ``||W0_o||^2`` is the
    row's nonzero count / s_w^2 and ``W0 A^T`` is a ternary x float product.
    """
    if not isinstance(weight, TernaryWeight):
        from r3mes.kernels import cuda as _cuda

        return _cuda.dora_row_norms(weight, lora_A, lora_B, scaling)
    a, b = _check_adapter_tensors(lora_A, lora_B, weight.out_features, weight.in_features)
    if not use_native():
        w0 = weight.dequantize().double()
        return torch.linalg.vector_norm(w0 + float(scaling) * (b.double() @ a.double()), dim=1)
    out = _native.dora_row_norms(
        weight.packed.numpy(), weight.in_features, weight.scale, a.numpy(), b.numpy(),
        float(scaling),
    )
    return torch.from_numpy(out)


def ternary_float_matmul(weight: TernaryWeight, a: torch.Tensor) -> torch.Tensor:
    """W0 . a^T for float a [R, in] -> float32 [out, R] (ternary x float, no activation quant)."""
    a = a.detach().to(torch.float32).contiguous()
    if a.dim() != 2 or a.shape[1] != weight.in_features:
        raise ValueError(f"a: expected [R, {weight.in_features}], got {tuple(a.shape)}")
    if not use_native():
        return (weight.dequantize() @ a.t()).contiguous()
    out = _native.ternary_float_matmul(weight.packed.numpy(), weight.in_features, a.numpy())
    return torch.from_numpy(out) / weight.scale


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
    a, b = _check_adapter_tensors(lora_A, lora_B, None, None)
    gf = g.detach().to(torch.float32).contiguous()
    if gf.shape != (b.shape[0],):
        raise ValueError(f"g: expected shape ({b.shape[0]},), got {tuple(gf.shape)}")
    for label, t in (("lora_A", a), ("lora_B", b), ("g", gf)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{label}: contains NaN or Inf")
    if not math.isfinite(float(scaling)):
        raise ValueError("scaling: must be finite")
    native = None
    if use_native():
        native = _native.dora_adapter(a.numpy(), b.numpy(), gf.numpy(), float(scaling), storage)
    return DoRAKernelAdapter(a, b, gf, float(scaling), storage, native)


def _check_mix(mix: torch.Tensor, rows: int, n_adapters: int) -> torch.Tensor:
    mix = torch.as_tensor(mix).detach().to(torch.float32).contiguous()
    if mix.dim() != 2 or mix.shape[1] != n_adapters or mix.shape[0] not in (1, rows):
        raise ValueError(
            f"mix: expected shape [1 or {rows}, {n_adapters}], got {tuple(mix.shape)}"
        )
    if not torch.isfinite(mix).all():
        raise ValueError("mix: contains NaN or Inf")
    return mix


def _check_base_weight(bw: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    if bw is None:
        return None
    bw = torch.as_tensor(bw).detach().to(torch.float32).reshape(-1).contiguous()
    if bw.shape[0] not in (1, rows) or not torch.isfinite(bw).all():
        raise ValueError(f"base_weight: expected {rows} finite values, got {tuple(bw.shape)}")
    return bw


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
    The adapter path sees the float x (not the int8-quantised x).
    """
    if _is_cuda(x) or not isinstance(weight, TernaryWeight):
        from r3mes.kernels import cuda as _cuda

        return _cuda.dora_linear(x, weight, adapters, mix, bias, base_weight)
    if (
        bias is None
        and base_weight is None
        and _fast_input(x, weight.in_features)
        and type(mix) is torch.Tensor
        and mix.dtype is torch.float32
        and mix.is_contiguous()
        and all(ad.native is not None for ad in adapters)
    ):
        # Decode's hot path: the native call validates shapes, dims and finiteness itself;
        # Python-side checks would cost more than the rank-r work of a decode step.
        y = _native.dora_linear(x.numpy().reshape(-1, weight.in_features), weight._packed_np,
                                weight.in_features, weight.scale, None,
                                [ad.native for ad in adapters], mix.numpy(), None)
        return torch.from_numpy(y).view(*x.shape[:-1], weight.out_features)
    x2 = _as_float32_matrix(x, "x", weight.in_features)
    lead = x.shape[:-1]
    mixm = _check_mix(mix, x2.shape[0], len(adapters))
    bw = _check_base_weight(base_weight, mixm.shape[0])
    for i, ad in enumerate(adapters):
        if ad.lora_A.shape[1] != weight.in_features or ad.lora_B.shape[0] != weight.out_features:
            raise ValueError(
                f"adapters[{i}]: shape ({ad.lora_B.shape[0]}, {ad.lora_A.shape[1]}) does not "
                f"match the weight ({weight.out_features}, {weight.in_features})"
            )
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
        if bias.shape != (weight.out_features,):
            raise ValueError(
                f"bias: expected shape ({weight.out_features},), got {tuple(bias.shape)}"
            )
    if not use_native() or any(ad.native is None for ad in adapters):
        if not torch.isfinite(x2).all():
            raise ValueError("x: activations contain NaN or Inf")
        y = dora_linear_reference(x2, weight, adapters, mixm, bias, bw)
    else:
        y = torch.from_numpy(
            _native.dora_linear(
                x2.numpy(), weight._packed_np, weight.in_features, weight.scale,
                None if bias is None else bias.numpy(), [ad.native for ad in adapters],
                mixm.numpy(), None if bw is None else bw.numpy(),
            )
        )
    return y.reshape(*lead, weight.out_features)


@dataclass(frozen=True)
class DoRAMix:
    """A DoRA mix prepared once for many :func:`dora_mix_linear` calls (a query's routed
    experts, fixed for its whole decode): the adapters, the mix weights [rows, E], the
    optional base weight [rows], and ``base_factor`` [rows, out], the factor on the base
    output ``base_weight + sum_e w_e g_e`` (1 for a row with no adapter), so each call reads
    one float a row for the base instead of every adapter's gain. ``native`` is the
    kernel's plan (None without the native module)."""

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
    mixm = _check_mix(mixm, mixm.shape[0], len(adapters))
    bw = _check_base_weight(base_weight, mixm.shape[0])
    if bw is not None:
        bw = bw.expand(mixm.shape[0]).contiguous()
    native = None
    if all(ad.native is not None for ad in adapters) and use_native():
        native = _native.DoraMixPlan([ad.native for ad in adapters], mixm.numpy(),
                                     None if bw is None else bw.numpy())
        factor = torch.from_numpy(native.base_factor)
    else:
        gains = torch.stack([ad.g for ad in adapters])  # [E, out]
        factor = mixm @ gains + (0.0 if bw is None else bw.unsqueeze(1))
        factor[(mixm == 0).all(dim=1)] = 1.0
    return DoRAMix(tuple(adapters), mixm, bw, factor, native)


def dora_mix_linear(x: torch.Tensor, weight: TernaryWeight, mix: DoRAMix,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dora_linear` with a mix from :func:`prepare_dora_mix`: the same result
    (to float rounding), with the gains already summed into ``mix.base_factor``."""
    if not isinstance(mix, DoRAMix):
        raise TypeError("mix: expected a DoRAMix from prepare_dora_mix")
    native = mix.native is not None and isinstance(weight, TernaryWeight)
    if native and _fast_input(x, weight.in_features):
        # Decode's hot path, as ternary_linear's: the native call makes every remaining
        # check itself.
        x_np = x.numpy().reshape(-1, weight.in_features)
    elif native and use_native() and not _is_cuda(x):
        x_np = _as_float32_matrix(x, "x", weight.in_features).numpy()
    else:
        tokens = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
        if mix.weights.shape[0] not in (1, tokens):
            raise ValueError(f"mix: prepared for {mix.weights.shape[0]} rows, x has {tokens} "
                             "tokens")
        return dora_linear(x, weight, list(mix.adapters), mix.weights, bias, mix.base_weight)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous().numpy()
    y = _native.dora_mix_linear(x_np, weight._packed_np, weight.in_features, weight.scale, b,
                                mix.native)
    return torch.from_numpy(y).view(*x.shape[:-1], weight.out_features)


def dora_linear_reference(
    x: torch.Tensor,
    weight: TernaryWeight,
    adapters: list[DoRAKernelAdapter],
    mix: torch.Tensor,
    bias: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused plain-torch definition of :func:`dora_linear` (x [M, in] -> [M, out]):
    each adapter's DoRA output ``g_e * (base + s_e B_e A_e x)`` separately, then the mix."""
    x2 = x.detach().to(torch.float32).reshape(-1, weight.in_features)
    base = reference.ternary_linear(x2, weight.unpack(), weight.scale)
    mixm = _check_mix(mix, x2.shape[0], len(adapters)).expand(x2.shape[0], len(adapters))
    y = torch.zeros_like(base)
    for e, ad in enumerate(adapters):
        a, g_b = ad.effective()
        if ad.storage == "int8":
            update = _int8_low_rank(x2, a, g_b, ad.folded_B)
        else:
            update = (x2 @ a.t()) @ g_b.t()
        # g (base + s B A x) with the gain folded into B, as the kernel stores it
        dora_e = ad.g * base + ad.scaling * update
        y = y + mixm[:, e : e + 1] * dora_e
    bw = _check_base_weight(base_weight, x2.shape[0])
    if bw is not None:
        y = y + bw.reshape(-1, 1) * base
    no_expert = (mixm != 0).sum(dim=1, keepdim=True) == 0
    y = torch.where(no_expert, base, y)
    if bias is not None:
        y = y + bias
    return y


__all__ += [
    "ADAPTER_STORAGES",
    "DoRAKernelAdapter",
    "DoRAMix",
    "dora_gain",
    "dora_linear",
    "dora_mix_linear",
    "dora_linear_reference",
    "dora_row_norms",
    "prepare_dora_adapter",
    "prepare_dora_mix",
    "ternary_float_matmul",
]


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
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise TypeError("weight: expected a floating-point torch.Tensor")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight: expected a non-empty 2-D tensor, got shape {tuple(w.shape)}")
    data, scale, row_sums = _require_native().quantize_int8_weight(
        w.detach().to(torch.float32).contiguous().numpy()
    )
    return Int8Weight(torch.from_numpy(data), torch.from_numpy(scale), torch.from_numpy(row_sums),
                      w.shape[0], w.shape[1])


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """y = (quant(x) . W8^T) / (s_x * s_w[n]) for x [..., in] -> float32 [..., out]."""
    x2 = _as_float32_matrix(x, "x", weight.in_features)
    lead = x.shape[:-1]
    if not use_native():
        if not torch.isfinite(x2).all():
            raise ValueError("x: activations contain NaN or Inf")
        y = reference.int8_linear(x2, weight.data[:, : weight.in_features], weight.scale)
    else:
        y = torch.from_numpy(_native.int8_linear(
            x2.numpy(), weight.data.numpy(), weight.scale.numpy(), weight.row_sums.numpy(),
            weight.in_features,
        ))
    return y.reshape(*lead, weight.out_features)


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
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise TypeError("weight: expected a floating-point torch.Tensor")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight: expected a non-empty 2-D tensor, got shape {tuple(w.shape)}")
    if group not in INT4_GROUPS:
        raise ValueError(f"group: expected one of {INT4_GROUPS}, got {group!r}")
    imp = None if importance is None else importance.detach().float().contiguous().numpy()
    packed, subs, scale, offsets = _require_native().quantize_int4_weight(
        w.detach().to(torch.float32).contiguous().numpy(), group, imp)
    return Int4Weight(torch.from_numpy(packed), torch.from_numpy(subs), torch.from_numpy(scale),
                      torch.from_numpy(offsets), w.shape[0], w.shape[1], group)


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """y = (quant(x) . W4^T) / (s_x * s_w[n]) for x [..., in] -> float32 [..., out]."""
    x2 = _as_float32_matrix(x, "x", weight.in_features)
    lead = x.shape[:-1]
    if not use_native():
        if not torch.isfinite(x2).all():
            raise ValueError("x: activations contain NaN or Inf")
        y = reference.int4_linear(x2, weight.packed, weight.group_scales, weight.scale,
                                  weight.in_features, weight.group)
    else:
        y = torch.from_numpy(_native.int4_linear(
            x2.numpy(), weight.packed.numpy(), weight.group_scales.numpy(),
            weight.scale.numpy(), weight.offsets.numpy(), weight.in_features, weight.group))
    return y.reshape(*lead, weight.out_features)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pad: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    """Single-token (decode) grouped-query attention straight from a KV cache.

    q float32 [B, H, D]; k_cache, v_cache float32 [B, KV, S_max, D]; pad int64 [B] (left
    padding of each row: keys before it are masked); keys [pad_b, length) are attended.
    Returns float32 [B, H, D]. Native: one fused pass per head, independent of the thread
    count; agrees with :func:`r3mes.kernels.reference.decode_attention` to float rounding.
    """
    if not use_native():
        return reference.decode_attention(q, k_cache, v_cache, pad, length, scaling)
    out = _native.decode_attention(q.detach().contiguous().numpy(), k_cache.detach().numpy(),
                                   v_cache.detach().numpy(), pad.contiguous().numpy(),
                                   int(length), float(scaling))
    return torch.from_numpy(out)
