"""The one place that decides between the native kernels and the torch reference.

Callers use these functions and never test for a CPU feature or a backend themselves. The
package is a front over one module per op group:

* :mod:`~r3mes.kernels.ternary` - :func:`quantize_weight`, :class:`TernaryWeight`,
  :func:`ternary_linear` (the numerical contract), :func:`ternary_matmul_int`, weight memory
  (:func:`weight_empty`, :func:`weight_copy`).
* :mod:`~r3mes.kernels.int8` - :func:`quantize_activations` (per-token absmax int8) and the
  8-bit head: :class:`Int8Weight`, :func:`quantize_int8_weight`, :func:`int8_linear`.
* :mod:`~r3mes.kernels.int4` - the 4-bit head: :class:`Int4Weight`,
  :func:`quantize_int4_weight`, :func:`int4_linear`, :data:`INT4_GROUPS`.
* :mod:`~r3mes.kernels.dora` - DoRA: :func:`dora_row_norms`, :func:`dora_gain`,
  :func:`prepare_dora_adapter`, the fused mix :func:`dora_linear`, a prepared mix
  (:func:`prepare_dora_mix`, :func:`dora_mix_linear`).
* :mod:`~r3mes.kernels.attention` - :func:`decode_attention`.
* :mod:`~r3mes.kernels.reference` - the torch reference of every op (the DoRA one too).
* :mod:`~r3mes.kernels.dispatch` - the device table of each op and the choice between
  native, reference and CUDA (:func:`use_reference`, :func:`use_native`), plus what the
  native module offers here (:func:`available`, :func:`cpu_features`, :func:`info`, SIMD
  level, threads).
* :mod:`~r3mes.kernels.cuda` - the CUDA kernels, reached through the same functions when
  the tensors are on an NVIDIA GPU.

The native module takes numpy buffers; CPU tensors cross without a copy.
"""

from __future__ import annotations

# Kept importable from here (the "x as x" form marks a re-export): the reference module,
# core.dora's adapter check, and the native module tests and benchmarks call directly.
from r3mes.kernels import reference as reference
from r3mes.kernels._checks import check_adapter_tensors as _check_adapter_tensors  # noqa: F401
from r3mes.kernels.attention import decode_attention
from r3mes.kernels.dispatch import (
    KernelNotAvailableError,
    available,
    cpu_features,
    cuda_info,
    get_num_threads,
    info,
    set_num_threads,
    set_simd_level,
    simd_level,
    use_native,
    use_reference,
)
from r3mes.kernels.dispatch import _native as _native
from r3mes.kernels.dora import (
    ADAPTER_STORAGES,
    DoRAKernelAdapter,
    DoRAMix,
    dora_gain,
    dora_linear,
    dora_linear_reference,
    dora_mix_linear,
    dora_row_norms,
    prepare_dora_adapter,
    prepare_dora_mix,
    ternary_float_matmul,
)
from r3mes.kernels.int4 import INT4_GROUPS, Int4Weight, int4_linear, quantize_int4_weight
from r3mes.kernels.int8 import Int8Weight, int8_linear, quantize_activations, quantize_int8_weight
from r3mes.kernels.ternary import (
    TernaryWeight,
    quantize_weight,
    ternary_linear,
    ternary_matmul_int,
    weight_copy,
    weight_empty,
)

__all__ = [
    "ADAPTER_STORAGES",
    "INT4_GROUPS",
    "DoRAKernelAdapter",
    "DoRAMix",
    "Int4Weight",
    "Int8Weight",
    "KernelNotAvailableError",
    "TernaryWeight",
    "available",
    "cpu_features",
    "cuda_info",
    "decode_attention",
    "dora_gain",
    "dora_linear",
    "dora_linear_reference",
    "dora_mix_linear",
    "dora_row_norms",
    "get_num_threads",
    "info",
    "int4_linear",
    "int8_linear",
    "prepare_dora_adapter",
    "prepare_dora_mix",
    "quantize_activations",
    "quantize_int4_weight",
    "quantize_int8_weight",
    "quantize_weight",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "ternary_float_matmul",
    "ternary_linear",
    "ternary_matmul_int",
    "use_native",
    "use_reference",
    "weight_copy",
    "weight_empty",
]
