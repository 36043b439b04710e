"""Inference backends (seed Decision 3) and :func:`get_best_backend`."""

from __future__ import annotations

from r3mes import kernels
from r3mes.core.backends.base import InferenceBackend
from r3mes.core.backends.bitnet_cpp_backend import BitNetCppBackend
from r3mes.core.backends.pytorch_backend import PyTorchBackend

__all__ = ["BitNetCppBackend", "InferenceBackend", "PyTorchBackend", "available_backends",
           "get_best_backend"]


def available_backends() -> list[str]:
    """Backend names usable here, fastest first."""
    names = []
    if kernels.available():
        names.append(BitNetCppBackend.name)
    names.append(PyTorchBackend.name)
    return names


def get_best_backend(num_threads: int | None = None) -> InferenceBackend:
    """The fastest backend available: native CPU kernels, else the torch reference.

    The CUDA path (``BitNetCppBackend(device="cuda")``) is not picked here until it has
    been run on a GPU; ask for it explicitly.
    """
    if kernels.available():
        return BitNetCppBackend(num_threads=num_threads)
    return PyTorchBackend()
