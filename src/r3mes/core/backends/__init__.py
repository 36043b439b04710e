"""Inference backends (seed Decision 3) and :func:`get_best_backend`."""

from __future__ import annotations

from r3mes import kernels
from r3mes.core.backends.base import InferenceBackend
from r3mes.core.backends.bitnet_cpp_backend import BitNetCppBackend
from r3mes.core.backends.pytorch_backend import PyTorchBackend
from r3mes.errors import R3mesError

__all__ = ["BACKEND_NAMES", "BitNetCppBackend", "InferenceBackend", "PyTorchBackend",
           "UnknownBackendError", "available_backends", "create_backend", "get_best_backend"]

#: the names :func:`create_backend` takes (the ``inference.backend`` setting's values)
BACKEND_NAMES = ("auto", "pytorch", "bitnet_cpp")


class UnknownBackendError(R3mesError, ValueError):
    """:func:`create_backend` was asked for a backend name it does not know."""


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


def create_backend(name: str = "auto", *, device: str = "cpu",
                   adapter_storage: str | None = None,
                   num_threads: int | None = None) -> InferenceBackend:
    """The backend called ``name`` (no model loaded yet): the one place a backend is chosen.

    - ``"pytorch"``: the torch reference (``device`` and ``adapter_storage`` do not apply);
    - ``"bitnet_cpp"``: the native kernels on ``device`` with ``adapter_storage``;
    - ``"auto"``: the native kernels when ``device`` is not ``"cpu"`` or an
      ``adapter_storage`` is asked for (only they have those), else
      :func:`get_best_backend`.

    Raises UnknownBackendError for an unknown ``name`` (naming the known ones) and the
    backend's own
    errors (RuntimeError when the native module or a GPU is missing, ValueError for a bad
    ``adapter_storage``).
    """
    if name not in BACKEND_NAMES:
        raise UnknownBackendError(f"unknown backend {name!r} ({', '.join(BACKEND_NAMES[:-1])} or "
                         f"{BACKEND_NAMES[-1]})")
    if name == "pytorch":
        return PyTorchBackend()
    if name == "bitnet_cpp" or device != "cpu" or adapter_storage is not None:
        return BitNetCppBackend(num_threads=num_threads, adapter_storage=adapter_storage,
                                device=device)
    return get_best_backend(num_threads=num_threads)
