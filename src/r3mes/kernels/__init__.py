"""The one place that decides between the native kernels and the torch reference.

Callers use these functions and never test for a CPU feature themselves:

* :func:`quantize_activations` - per-token absmax int8 quantisation.
* :func:`quantize_weight` - absmean ternary quantisation, packed (:class:`TernaryWeight`).
* :func:`ternary_linear` - float in, float out, exactly the numerical contract.
* :func:`available` / :func:`cpu_features` / :func:`info` - what was compiled and what runs.

The native module takes numpy buffers; CPU tensors cross without a copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from r3mes.kernels import reference

try:
    from r3mes import _native
except ImportError as exc:  # pragma: no cover - only without a built extension
    _native = None
    _NATIVE_IMPORT_ERROR: Exception | None = exc
else:
    _NATIVE_IMPORT_ERROR = None

__all__ = [
    "TernaryWeight",
    "available",
    "cpu_features",
    "get_num_threads",
    "info",
    "quantize_activations",
    "quantize_weight",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "ternary_linear",
    "use_native",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    """Whether the CUDA module was built and how many devices it sees."""
    try:
        from r3mes import _native_cuda
    except ImportError:
        return {"compiled": False, "device_count": 0}
    return {"compiled": True, "device_count": int(_native_cuda.device_count())}


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


def _as_float32_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"{name}: the CPU kernels need a CPU tensor, got device {x.device}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got a scalar")
    if not x.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: last dimension (features) must be > 0")
    return x.detach().to(torch.float32).reshape(-1, x.shape[-1])


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantisation of x [..., K].

    Returns ``(q, scale)``: q int8 [..., K], scale float32 [...] with
    ``q = clamp(round(x * scale), -128, 127)`` and ``scale = 127 / max(max|x|, 1e-5)``.
    Raises ValueError on NaN/Inf.
    """
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

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def unpack(self) -> torch.Tensor:
        """The ternary values as int8 [out_features, in_features]."""
        t = _require_native().unpack_ternary(self.packed.numpy(), self.in_features)
        return torch.from_numpy(t)

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


def quantize_weight(w: torch.Tensor) -> TernaryWeight:
    """Absmean-quantise float weights [out, in] to ternary and pack them.

    The scale is computed in float32 by torch exactly as the reference does, so the
    ternary values match the reference bit for bit.
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
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
    x2 = _as_float32_matrix(x, "x")
    if x2.shape[1] != weight.in_features:
        raise ValueError(
            f"x: has {x2.shape[1]} features, weight expects in_features={weight.in_features}"
        )
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
                weight.packed.numpy(),
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
