"""Input checks shared by the op modules of :mod:`r3mes.kernels` (and the CUDA entry points
in :mod:`r3mes.kernels.cuda`), so every implementation of an op rejects bad arguments with
the same messages, whichever of them runs."""

from __future__ import annotations

from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_features(x: torch.Tensor, name: str, in_features: int | None = None) -> None:
    """x must be a floating-point tensor [..., K] with K > 0 (and K == in_features if given)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: last dimension (features) must be > 0")
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(
            f"{name}: has {x.shape[-1]} features, weight expects in_features={in_features}"
        )


def is_cuda(x: Any) -> bool:
    """Whether x is a tensor on an NVIDIA device (the ops then take their CUDA entry)."""
    return isinstance(x, torch.Tensor) and x.is_cuda


def as_float32_matrix(x: torch.Tensor, name: str, in_features: int | None = None
                      ) -> torch.Tensor:
    """x [..., K] on the CPU -> float32 [M, K]; with ``in_features``, K must equal it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_float_features(x, name, in_features)
    if x.device.type != "cpu":
        raise ValueError(f"{name}: the CPU kernels need a CPU tensor, got device {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
    return x.detach().to(torch.float32).reshape(-1, x.shape[-1])


def fast_input(x: Any, in_features: int) -> bool:
    """Whether x can go straight to a native kernel (decode's hot path): a plain float32
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
    )


def check_finite_activations(x2: torch.Tensor) -> None:
    """The torch references' NaN/Inf check (the native kernels make it themselves)."""
    if not torch.isfinite(x2).all():
        raise ValueError("x: activations contain NaN or Inf")


def check_bias(bias: torch.Tensor | None, out_features: int) -> torch.Tensor | None:
    """bias as contiguous float32 [out_features] (None stays None)."""
    if bias is None:
        return None
    bias = bias.detach().to(torch.float32).contiguous()
    if bias.shape != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    return bias


def check_float_weight(w: Any) -> torch.Tensor:
    """A float weight [out, in] to quantise, as contiguous float32."""
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise TypeError("weight: expected a floating-point torch.Tensor")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight: expected a non-empty 2-D tensor, got shape {tuple(w.shape)}")
    return w.detach().to(torch.float32).contiguous()


def check_adapter_tensors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, out_features: int | None, in_features: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A [r, in] and lora_B [out, r] as contiguous float32, their shapes checked
    against each other and, where given, the layer's."""
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


def check_mix(mix: torch.Tensor, rows: int, n_adapters: int) -> torch.Tensor:
    """A DoRA mix [1 or rows, n_adapters] of finite weights, as contiguous float32."""
    mix = torch.as_tensor(mix).detach().to(torch.float32).contiguous()
    if mix.dim() != 2 or mix.shape[1] != n_adapters or mix.shape[0] not in (1, rows):
        raise ValueError(
            f"mix: expected shape [1 or {rows}, {n_adapters}], got {tuple(mix.shape)}"
        )
    if not torch.isfinite(mix).all():
        raise ValueError("mix: contains NaN or Inf")
    return mix


def check_base_weight(bw: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """A DoRA mix's "no adapter" share [1 or rows], finite, as float32 (None stays None)."""
    if bw is None:
        return None
    bw = torch.as_tensor(bw).detach().to(torch.float32).reshape(-1).contiguous()
    if bw.shape[0] not in (1, rows) or not torch.isfinite(bw).all():
        raise ValueError(f"base_weight: expected {rows} finite values, got {tuple(bw.shape)}")
    return bw
