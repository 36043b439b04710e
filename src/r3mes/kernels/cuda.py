"""The CUDA kernels (``r3mes._native_cuda``) behind a torch-tensor API.

Mirrors the CPU API of :mod:`r3mes.kernels` for tensors on an NVIDIA GPU:

* :class:`CudaTernaryWeight` - a device copy of a :class:`~r3mes.kernels.TernaryWeight`,
  repacked into the GPU layout (``csrc/cuda/layout.h``).
* :func:`quantize_activations`, :func:`ternary_linear`, :func:`ternary_matmul_int`.
* :func:`prepare_dora_adapter_cuda`, :func:`dora_linear` (the fused multi-expert DoRA mix),
  :func:`dora_row_norms` (factored norms).
* :func:`available` - the module is built and a device is present.

The native module never links libtorch: it receives ``tensor.data_ptr()`` integers, the
shapes, and the current stream handle, so its kernels are queued on torch's current
stream for the tensor's device and compose with torch ops and CUDA graphs. Arguments are
checked here (device, dtype, shape) and again natively (null or misaligned pointers,
sizes) before any launch; a bad argument raises ``ValueError``/``TypeError``, a CUDA
failure ``RuntimeError`` carrying the CUDA error string.

NaN/Inf activations: the GPU path does not synchronise to raise. A token with a
non-finite activation gets NaN outputs (its ``x_scale`` is NaN and its int8 row is 0).
Pass ``check_finite=True`` to raise ``ValueError`` instead, at the cost of a device sync.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from r3mes.kernels._checks import check_float_features
from r3mes.kernels.reference import pow2_scale

if TYPE_CHECKING:  # r3mes.kernels imports this module lazily; avoid a cycle at import time
    from r3mes.kernels import DoRAKernelAdapter, TernaryWeight

try:
    from r3mes import _native_cuda
except ImportError as exc:  # pragma: no cover - only without nvcc at build time
    _native_cuda = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

__all__ = [
    "CudaDoRAAdapter",
    "CudaTernaryWeight",
    "available",
    "compiled",
    "compiled_architectures",
    "dora_linear",
    "dora_row_norms",
    "info",
    "prepare_dora_adapter_cuda",
    "quantize_activations",
    "repack_for_gpu",
    "ternary_linear",
    "ternary_matmul_int",
]

KERNELS = ("auto", "gemv", "mma")
ADAPTER_STORAGES = ("fp16", "fp32")


# ---- availability ------------------------------------------------------------------------


def compiled() -> bool:
    """True when ``r3mes._native_cuda`` was built (nvcc was present at build time)."""
    return _native_cuda is not None


def _device_count() -> int:
    return int(_native_cuda.device_count()) if _native_cuda is not None else 0


def available() -> bool:
    """True when the CUDA module is built, torch sees a GPU, and the module sees one too."""
    return _native_cuda is not None and torch.cuda.is_available() and _device_count() > 0


def compiled_architectures() -> list[int]:
    """Compute capabilities the module carries code for (e.g. ``[80, 90]``); [] if unbuilt."""
    return list(_native_cuda.compiled_architectures()) if _native_cuda is not None else []


def info() -> dict[str, Any]:
    """Whether the module is built, its architectures, and the devices it sees."""
    return {
        "compiled": compiled(),
        "architectures": compiled_architectures(),
        "device_count": _device_count(),
        "available": available(),
    }


def _require_module() -> Any:
    if _native_cuda is None:
        raise RuntimeError(
            f"r3mes CUDA kernels are not built (r3mes._native_cuda: {_IMPORT_ERROR})"
        )
    return _native_cuda


def _require_device() -> Any:
    mod = _require_module()
    if not torch.cuda.is_available() or mod.device_count() == 0:
        raise RuntimeError(
            "r3mes CUDA kernels: no CUDA device is available (torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}, the module sees {mod.device_count()} devices)"
        )
    return mod


def _as_cuda_device(device: torch.device | str | int) -> torch.device:
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    _require_device()
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {dev} does not exist ({torch.cuda.device_count()} devices)")
    return dev


def _stream(dev: torch.device) -> int:
    return int(torch.cuda.current_stream(dev).cuda_stream)


def _on(dev: torch.device) -> contextlib.AbstractContextManager:
    """Make dev current for the native calls (they launch on the current device)."""
    if dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


# ---- argument checks -------------------------------------------------------------------


def _check_cuda_tensor(t: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(
            f"{name}: expected a CUDA tensor, got device {t.device} (the CPU kernels are "
            "r3mes.kernels.*; move it with .to('cuda'))"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{name}: is on {t.device} but the weight is on {device}")
    return t


def _as_cuda_f32_matrix(
    x: Any, name: str, device: torch.device | None = None, in_features: int | None = None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x [..., K] float on a CUDA device -> (contiguous float32 [M, K], leading shape);
    with ``in_features``, K must equal it."""
    x = _check_cuda_tensor(x, name, device)
    check_float_features(x, name, in_features)
    x2 = x.detach().to(torch.float32).contiguous().reshape(-1, x.shape[-1])
    return x2, tuple(x.shape[:-1])


def _check_finite(x2: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x2).all()):
        raise ValueError(f"{name}: activations contain NaN or Inf")


def _vector_on(t: Any, name: str, length: int, device: torch.device) -> torch.Tensor:
    """A float32 contiguous [length] tensor on device (copied there if it is not)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    v = t.detach().to(device=device, dtype=torch.float32).contiguous()
    if v.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(t.shape)}")
    return v


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")


# ---- weights -----------------------------------------------------------------------------


def repack_for_gpu(weight: TernaryWeight) -> torch.Tensor:
    """The GPU layout of a CPU :class:`~r3mes.kernels.TernaryWeight`, on the host: uint8
    [out_features, packed_row_bytes(in_features)]. Needs the module, not a GPU."""
    mod = _require_module()
    t = weight.unpack().contiguous()
    return torch.from_numpy(mod.repack_ternary(t.numpy()))


def unpack_gpu_layout(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`repack_for_gpu` (host): int8 ternary [out, in] from GPU-layout bytes."""
    mod = _require_module()
    return torch.from_numpy(mod.unpack_ternary(packed.detach().cpu().contiguous().numpy(),
                                               int(in_features)))


@dataclass(frozen=True)
class CudaTernaryWeight:
    """A ternary weight on a CUDA device in the GPU kernels' layout.

    ``packed`` is uint8 [out_features, packed_row_bytes(in_features)] on the device
    (``r3mes-cuda-2bit-c64``, documented in ``csrc/cuda/layout.h``); ``scale`` is s_w, so
    the dequantised weight is ``unpack() / scale``, exactly as the CPU weight it came from.
    """

    packed: torch.Tensor
    scale: float
    out_features: int
    in_features: int

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_cpu(
        cls, weight: TernaryWeight, device: torch.device | str | int = "cuda"
    ) -> CudaTernaryWeight:
        """Copy a CPU weight to ``device``: unpack, repack to the GPU layout on the host, copy."""
        dev = _as_cuda_device(device)
        host = repack_for_gpu(weight)
        return cls(host.to(dev), float(weight.scale), int(weight.out_features),
                   int(weight.in_features))

    def unpack(self) -> torch.Tensor:
        """The ternary values as a CPU int8 tensor [out_features, in_features]."""
        return unpack_gpu_layout(self.packed, self.in_features)


def _check_weight(weight: Any) -> CudaTernaryWeight:
    if not isinstance(weight, CudaTernaryWeight):
        raise TypeError(
            f"weight: expected a CudaTernaryWeight (CudaTernaryWeight.from_cpu(w)), got "
            f"{type(weight).__name__}"
        )
    return weight


# ---- activations and the ternary product ---------------------------------------------------


def _quantize_into(mod: Any, x2: torch.Tensor, dev: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x2.shape
    q = torch.empty((m, mod.padded_k(k)), dtype=torch.int8, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    qsum = torch.empty(m, dtype=torch.int32, device=dev)
    mod.quantize_activations(x2.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(),
                             qsum.data_ptr(), _stream(dev))
    return q, scale, qsum


def quantize_activations(
    x: torch.Tensor, check_finite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantisation of a CUDA tensor x [..., K].

    Returns ``(q, scale)`` on x's device: q int8 [..., K], scale float32 [...], bit-identical
    to :func:`r3mes.kernels.quantize_activations` for finite x. A token with NaN/Inf gets
    scale NaN and q = 0 (or ``ValueError`` with ``check_finite=True``).
    """
    x2, lead = _as_cuda_f32_matrix(x, "x")
    mod = _require_device()
    dev = x2.device
    k = x2.shape[1]
    if check_finite:
        _check_finite(x2, "x")
    if x2.shape[0] == 0:
        return (torch.empty((*lead, k), dtype=torch.int8, device=dev),
                torch.empty(lead, dtype=torch.float32, device=dev))
    with _on(dev):
        q, scale, _ = _quantize_into(mod, x2, dev)
    return q[:, :k].reshape(*lead, k), scale.reshape(lead)


def ternary_linear(
    x: torch.Tensor,
    weight: CudaTernaryWeight,
    bias: torch.Tensor | None = None,
    *,
    kernel: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """y = (quant(x) . T^T) / (s_x * s_w) (+ bias) for a CUDA x [..., in] -> float32 [..., out].

    The integer part is exact and the float epilogue is the CPU's, operation for operation:
    y equals :func:`r3mes.kernels.ternary_linear` bit for bit. ``kernel`` forces the dp4a
    GEMV (``"gemv"``) or the tensor-core GEMM (``"mma"``); ``"auto"`` picks the GEMV up to 8
    tokens.
    """
    w = _check_weight(weight)
    _check_kernel(kernel)
    x2, lead = _as_cuda_f32_matrix(x, "x", w.device, w.in_features)
    dev = w.device
    b = None if bias is None else _vector_on(bias, "bias", w.out_features, dev)
    mod = _require_device()
    if check_finite:
        _check_finite(x2, "x")
    m = x2.shape[0]
    out = torch.empty((m, w.out_features), dtype=torch.float32, device=dev)
    if m > 0:
        with _on(dev):
            q, scale, qsum = _quantize_into(mod, x2, dev)
            mod.ternary_gemm(q.data_ptr(), qsum.data_ptr(), scale.data_ptr(), w.packed.data_ptr(),
                             m, w.out_features, w.in_features, w.scale,
                             0 if b is None else b.data_ptr(), out.data_ptr(), 0, _stream(dev),
                             kernel)
    return out.reshape(*lead, w.out_features)


def ternary_matmul_int(q: torch.Tensor, weight: CudaTernaryWeight, *, kernel: str = "auto"
                       ) -> torch.Tensor:
    """Exact int32 q [M, K] (int8, CUDA) x T^T -> [M, N]: the integer core, for tests."""
    w = _check_weight(weight)
    _check_kernel(kernel)
    q = _check_cuda_tensor(q, "q", w.device)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"q: expected a 2-D int8 tensor, got {q.dtype} with {q.dim()} dims")
    if q.shape[1] != w.in_features:
        raise ValueError(
            f"q: has {q.shape[1]} features, weight expects in_features={w.in_features}"
        )
    mod = _require_device()
    dev = w.device
    m, k = q.shape
    out = torch.empty((m, w.out_features), dtype=torch.int32, device=dev)
    if m == 0:
        return out
    qp = torch.zeros((m, mod.padded_k(k)), dtype=torch.int8, device=dev)
    qp[:, :k] = q
    qsum = q.sum(dim=1, dtype=torch.int32)
    with _on(dev):
        mod.ternary_gemm(qp.data_ptr(), qsum.data_ptr(), 0, w.packed.data_ptr(), m,
                         w.out_features, k, w.scale, 0, 0, out.data_ptr(), _stream(dev), kernel)
    return out


# ---- DoRA ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaDoRAAdapter:
    """One DoRA adapter in the fused CUDA kernel's storage (see ``csrc/cuda/epilogue.cuh``).

    ``a`` [r, in] and ``b`` [out, r] on the device, fp16 (pre-scaled by powers of two,
    ``coef = s * a_scale * b_scale``) or fp32 (``coef = s``); ``g`` [out] float32 the gain
    m / ||W0 + s B A||_row. The fp16 form applies exactly the values of the CPU kernel's
    fp16 storage (:meth:`r3mes.kernels.DoRAKernelAdapter.effective`).
    """

    a: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor
    scaling: float
    coef: float
    storage: str

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def nbytes(self) -> int:
        """Device bytes the fused kernel reads for this adapter (A, B and g)."""
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.g))

    def native(self) -> tuple[int, int, int, int, float, bool]:
        return (self.a.data_ptr(), self.b.data_ptr(), self.g.data_ptr(), self.rank, self.coef,
                self.storage == "fp16")

    @classmethod
    def from_cpu(cls, adapter: DoRAKernelAdapter, device: torch.device | str | int = "cuda"
                 ) -> CudaDoRAAdapter:
        """The device form of a CPU-prepared adapter (same storage, same values)."""
        return prepare_dora_adapter_cuda(adapter.lora_A, adapter.lora_B, adapter.g,
                                         adapter.scaling, adapter.storage, device)


def prepare_dora_adapter_cuda(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    storage: str = "fp16",
    device: torch.device | str | int = "cuda",
) -> CudaDoRAAdapter:
    """Convert one adapter to the fused CUDA kernel's storage on ``device``.

    lora_A [r, in], lora_B [out, r], g [out] (the gain, see ``r3mes.kernels.dora_gain``),
    scaling s; ``storage`` ``"fp16"`` (compact) or ``"fp32"`` (exact). Inputs may live on
    any device; they are validated on the host side of the copy.
    """
    if storage not in ADAPTER_STORAGES:
        raise ValueError(f"storage: expected one of {ADAPTER_STORAGES}, got {storage!r}")
    for label, t in (("lora_A", lora_A), ("lora_B", lora_B), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
    a = lora_A.detach().to(torch.float32)
    b = lora_B.detach().to(torch.float32)
    gf = g.detach().to(torch.float32).reshape(-1)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"lora_A/lora_B: expected 2-D tensors, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0 or b.shape[0] == 0:
        raise ValueError(f"lora_A/lora_B: empty dimension in {tuple(a.shape)}, {tuple(b.shape)}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"lora_B: has {b.shape[1]} columns but lora_A has rank {a.shape[0]} rows")
    if gf.shape != (b.shape[0],):
        raise ValueError(f"g: expected shape ({b.shape[0]},), got {tuple(g.shape)}")
    for label, t in (("lora_A", a), ("lora_B", b), ("g", gf)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label}: contains NaN or Inf")
    if not math.isfinite(float(scaling)):
        raise ValueError("scaling: must be finite")
    dev = _as_cuda_device(device)
    s = float(scaling)
    if storage == "fp16":
        a_scale, b_scale = pow2_scale(a), pow2_scale(b)
        a_dev = (a / a_scale).to(torch.float16)
        b_dev = (b / b_scale).to(torch.float16)
        coef = s * a_scale * b_scale  # powers of two: exact, as the CPU's float product
    else:
        a_dev, b_dev, coef = a, b, s
    return CudaDoRAAdapter(
        a_dev.to(dev).contiguous(), b_dev.to(dev).contiguous(), gf.to(dev).contiguous(), s,
        float(coef), storage,
    )


def dora_linear(
    x: torch.Tensor,
    weight: CudaTernaryWeight,
    adapters: Sequence[CudaDoRAAdapter],
    mix: torch.Tensor,
    bias: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    *,
    kernel: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """The fused DoRA mix on the GPU, x [..., in] -> float32 [..., out]; the CUDA twin of
    :func:`r3mes.kernels.dora_linear` (same arguments, same math, one ternary GEMM for all
    adapters).

    ``mix`` [1 or M, E]: each token's weight on each adapter (rows normalised by the
    caller); ``base_weight`` [1 or M] adds ``b * base``. A token whose weights are all 0
    gets ``base + bias``. At most ``r3mes._native_cuda.max_adapters`` adapters a call.
    ``mix`` and ``base_weight`` may be CPU tensors (checked for NaN/Inf there, then copied)
    or device tensors (not checked: that would synchronise).
    """
    w = _check_weight(weight)
    _check_kernel(kernel)
    x2, lead = _as_cuda_f32_matrix(x, "x", w.device, w.in_features)
    mod = _require_device()
    dev = w.device
    m = x2.shape[0]
    n_ad = len(adapters)
    if n_ad > mod.max_adapters:
        raise ValueError(f"adapters: at most {mod.max_adapters} per call, got {n_ad}")
    for i, ad in enumerate(adapters):
        if not isinstance(ad, CudaDoRAAdapter):
            raise TypeError(f"adapters[{i}]: expected a CudaDoRAAdapter, got {type(ad).__name__}")
        if ad.device != dev:
            raise ValueError(f"adapters[{i}]: is on {ad.device} but the weight is on {dev}")
        if ad.in_features != w.in_features or ad.out_features != w.out_features:
            raise ValueError(
                f"adapters[{i}]: shape ({ad.out_features}, {ad.in_features}) does not match the "
                f"weight ({w.out_features}, {w.in_features})"
            )
    if not isinstance(mix, torch.Tensor):
        mix = torch.as_tensor(mix, dtype=torch.float32)
    if mix.dim() != 2 or mix.shape[1] != n_ad or mix.shape[0] not in (1, m):
        raise ValueError(f"mix: expected shape [1 or {m}, {n_ad}], got {tuple(mix.shape)}")
    if mix.device.type == "cpu" and not bool(torch.isfinite(mix.float()).all()):
        raise ValueError("mix: contains NaN or Inf")
    mix_d = mix.detach().to(device=dev, dtype=torch.float32).contiguous()
    bw = None
    if base_weight is not None:
        if not isinstance(base_weight, torch.Tensor):
            base_weight = torch.as_tensor(base_weight, dtype=torch.float32)
        if base_weight.device.type == "cpu" and not bool(torch.isfinite(base_weight.float()).all()):
            raise ValueError("base_weight: contains NaN or Inf")
        bw = _vector_on(base_weight.reshape(-1), "base_weight", mix.shape[0], dev)
    b = None if bias is None else _vector_on(bias, "bias", w.out_features, dev)
    if n_ad == 0:
        return ternary_linear(x, w, bias, kernel=kernel, check_finite=check_finite)
    if check_finite:
        _check_finite(x2, "x")
    out = torch.empty((m, w.out_features), dtype=torch.float32, device=dev)
    if m == 0:
        return out.reshape(*lead, w.out_features)
    z_cols = sum(ad.rank for ad in adapters)
    q = torch.empty((m, mod.padded_k(w.in_features)), dtype=torch.int8, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    qsum = torch.empty(m, dtype=torch.int32, device=dev)
    z = torch.empty((m, z_cols), dtype=torch.float32, device=dev)
    with _on(dev):
        mod.dora_linear(
            x2.data_ptr(), q.data_ptr(), scale.data_ptr(), qsum.data_ptr(), z.data_ptr(),
            w.packed.data_ptr(), m, w.out_features, w.in_features, w.scale,
            0 if b is None else b.data_ptr(), [ad.native() for ad in adapters],
            mix_d.data_ptr(), mix_d.shape[0], 0 if bw is None else bw.data_ptr(),
            out.data_ptr(), _stream(dev), kernel,
        )
    return out.reshape(*lead, w.out_features)


def dora_row_norms(
    weight: CudaTernaryWeight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||W0 + s B A||_row as float64 [out] on the weight's device, without forming the
    out x in matrix (the CUDA twin of :func:`r3mes.kernels.dora_row_norms`)."""
    w = _check_weight(weight)
    for label, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"lora_A/lora_B: expected 2-D tensors, got {tuple(lora_A.shape)} and "
            f"{tuple(lora_B.shape)}"
        )
    rank = lora_A.shape[0]
    if lora_A.shape[1] != w.in_features:
        raise ValueError(
            f"lora_A: has {lora_A.shape[1]} columns, expected in_features={w.in_features}"
        )
    if lora_B.shape != (w.out_features, rank):
        raise ValueError(
            f"lora_B: expected shape ({w.out_features}, {rank}), got {tuple(lora_B.shape)}"
        )
    if not math.isfinite(float(scaling)):
        raise ValueError("scaling: must be finite")
    mod = _require_device()
    dev = w.device
    a = lora_A.detach().to(device=dev, dtype=torch.float32).contiguous()
    b = lora_B.detach().to(device=dev, dtype=torch.float32).contiguous()
    gram = torch.empty((rank, rank), dtype=torch.float64, device=dev)
    norms = torch.empty(w.out_features, dtype=torch.float64, device=dev)
    with _on(dev):
        mod.dora_row_norms(w.packed.data_ptr(), w.out_features, w.in_features, w.scale,
                           a.data_ptr(), b.data_ptr(), rank, float(scaling), gram.data_ptr(),
                           norms.data_ptr(), _stream(dev))
    return norms
