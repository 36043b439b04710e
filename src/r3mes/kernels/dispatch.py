"""Which implementation of a kernel op runs, decided here and nowhere else; and what the
native module offers on this machine (SIMD level, threads, CPU features).

Every op has one device table, as bitsandbytes' backend registry has: op name ->
``{"native": fn, "reference": fn, "cuda": fn}`` (any entry may be missing). The op modules
(:mod:`~r3mes.kernels.ternary`, :mod:`~r3mes.kernels.int8`, :mod:`~r3mes.kernels.int4`,
:mod:`~r3mes.kernels.dora`, :mod:`~r3mes.kernels.attention`) fill the tables with
:func:`register`; their public functions validate the arguments, name the device the
arguments live on, and call the function :func:`implementation` returns. Every entry of a
table takes the same arguments.

The choice on the CPU:

* Arithmetic ops run the native kernel unless the torch reference is asked for
  (:func:`use_reference`, or ``R3MES_BACKEND=torch`` for the whole process), the native
  module is not built, or the arguments were prepared without it (``native_ready``).
  An op with no native implementation runs its reference.
* Layout ops (``layout=True``: packing, unpacking, weight memory) produce bytes, not
  arithmetic, and the bytes are the same either way; they run natively whenever the module
  is built, so reference mode costs no repacking.

No implementation that can run raises :class:`KernelNotAvailableError` naming the op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from r3mes.errors import R3mesError
from r3mes.kernels._checks import as_float32_matrix

try:
    from r3mes import _native
except ImportError as exc:  # pragma: no cover - only without a built extension
    _native = None
    _NATIVE_IMPORT_ERROR: Exception | None = exc
else:
    _NATIVE_IMPORT_ERROR = None

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "KernelNotAvailableError",
    "available",
    "cpu_features",
    "cuda_info",
    "get_num_threads",
    "implementation",
    "info",
    "register",
    "register_cuda",
    "run_on_rows",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "use_native",
    "use_reference",
]

BACKENDS = ("native", "reference", "cuda")

#: op name -> {backend: implementation}; filled by :func:`register` at import.
REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}
_LAYOUT_OPS: set[str] = set()

# None: follow R3MES_BACKEND (read at every call, as before the context manager existed, so
# a process that sets it after import is still obeyed). A contextvar rather than a global so
# a PyTorchBackend forward in one thread does not switch a native backend in another.
_FORCE_REFERENCE: ContextVar[bool | None] = ContextVar("r3mes_kernels_reference", default=None)

F = TypeVar("F", bound=Callable[..., Any])


class KernelNotAvailableError(R3mesError, RuntimeError):
    """No implementation of a kernel op can run here; the message names the op and why."""


# ---- the choice ---------------------------------------------------------------------------


def available() -> bool:
    """True when the native CPU module is importable."""
    return _native is not None


def _reference_requested() -> bool:
    forced = _FORCE_REFERENCE.get()
    if forced is not None:
        return forced
    return os.environ.get("R3MES_BACKEND", "").lower() == "torch"


def use_native() -> bool:
    """Whether arithmetic ops run natively now: the module is built and neither
    :func:`use_reference` nor ``R3MES_BACKEND=torch`` asks for the torch reference."""
    return _native is not None and not _reference_requested()


@contextmanager
def use_reference() -> Iterator[None]:
    """Run every arithmetic op on its torch reference inside the block.

    Nests (the outer block's choice comes back on exit) and is local to the thread or
    asyncio task that enters it: a thread started inside the block runs natively unless it
    enters a block itself. ``R3MES_BACKEND=torch`` sets the same for the whole process.
    """
    token = _FORCE_REFERENCE.set(True)
    try:
        yield
    finally:
        _FORCE_REFERENCE.reset(token)


def register(op: str, backend: str, *, layout: bool = False) -> Callable[[F], F]:
    """Decorator: ``fn`` is ``op``'s implementation on ``backend`` (one of :data:`BACKENDS`).
    ``layout=True`` marks an op whose result is a storage layout (see the module doc).
    Registering a backend twice for one op is a ValueError (two modules claiming an op)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")

    def add(fn: F) -> F:
        table = REGISTRY.setdefault(op, {})
        if backend in table:
            raise ValueError(f"kernel op {op!r}: a {backend} implementation is already "
                             f"registered ({table[backend].__qualname__})")
        table[backend] = fn
        if layout:
            _LAYOUT_OPS.add(op)
        return fn

    return add


def register_cuda(op: str) -> None:
    """Register ``r3mes.kernels.cuda.<op>`` as op's CUDA implementation, imported on first
    use: the CUDA module loads only once a CUDA tensor arrives."""

    def run(*args: Any, **kwargs: Any) -> Any:
        from r3mes.kernels import cuda

        return getattr(cuda, op)(*args, **kwargs)

    run.__qualname__ = f"cuda.{op}"
    register(op, "cuda")(run)


def implementation(op: str, device: str = "cpu", *, native_ready: bool = True
                   ) -> Callable[..., Any]:
    """The function that runs ``op`` now for arguments on ``device`` (``"cpu"`` or
    ``"cuda"``). ``native_ready=False``: the arguments carry no native state (e.g. DoRA
    adapters prepared in reference mode), so only the reference can take them.

    Raises :class:`KernelNotAvailableError` naming the op when nothing can run it."""
    table = REGISTRY.get(op)
    if table is None:
        raise KernelNotAvailableError(f"no kernel op named {op!r}")
    if device == "cuda":
        fn = table.get("cuda")
        if fn is None:
            raise KernelNotAvailableError(f"kernel op {op!r} has no CUDA implementation")
        return fn
    if device != "cpu":
        raise KernelNotAvailableError(f"kernel op {op!r}: no implementation for device "
                                      f"{device!r}")
    native = table.get("native") if _native is not None and native_ready else None
    if native is not None and (op in _LAYOUT_OPS or not _reference_requested()):
        return native
    reference = table.get("reference")
    if reference is not None:
        return reference
    if "native" not in table:
        why = "it has neither a native nor a torch reference implementation"
    elif _native is None:
        why = ("it has no torch reference and the native module r3mes._native is not "
               f"available ({_NATIVE_IMPORT_ERROR})")
    elif not native_ready:
        why = "it has no torch reference and its arguments were prepared without the native module"
    else:
        why = ("it has no torch reference, and the reference was asked for "
               "(kernels.use_reference() or R3MES_BACKEND=torch)")
    raise KernelNotAvailableError(f"kernel op {op!r} cannot run on the CPU: {why}")


def run_on_rows(op: str, x: Any, weight: Any) -> Any:
    """A CPU-only linear op on x [..., in]: x checked and flattened to float32 [M, in], the
    op's implementation run on it with ``weight``, the result shaped [..., out]."""
    x2 = as_float32_matrix(x, "x", weight.in_features)
    y = implementation(op)(x2, weight)
    return y.reshape(*x.shape[:-1], weight.out_features)


# ---- the native module: what it offers here -------------------------------------------------


def require_native() -> Any:
    """The native module, or RuntimeError saying why it did not import."""
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
    from r3mes.kernels import cuda

    return cuda.info()


def cpu_features() -> dict[str, bool]:
    """CPU features the kernels dispatch on (empty without the native module)."""
    return dict(_native.info()["cpu_features"]) if _native is not None else {}


def simd_level() -> str:
    """The SIMD level the native kernels use now."""
    return require_native().get_simd_level()


def set_simd_level(level: str) -> None:
    """Force a SIMD level (scalar, avx2, avx512, avx512vnni); ValueError if the CPU lacks it."""
    require_native().set_simd_level(level)


def get_num_threads() -> int:
    """Threads the native kernels use now."""
    return require_native().get_num_threads()


def set_num_threads(n: int) -> None:
    """Threads for the native kernels; ``n <= 0`` restores the default (all cores)."""
    require_native().set_num_threads(int(n))
