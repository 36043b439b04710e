"""Every error class r3mes defines derives from R3mesError, so callers can catch r3mes's
refusals (``except R3mesError``) without catching programming errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import r3mes
from r3mes.errors import R3mesError


def _error_classes() -> list[type[BaseException]]:
    found = []
    for mod in pkgutil.walk_packages(r3mes.__path__, "r3mes."):
        if mod.name.endswith(("._native", "._native_cuda")):
            continue
        module = importlib.import_module(mod.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (issubclass(obj, Exception) and obj.__module__ == mod.name
                    and not obj.__name__.startswith("_")):
                found.append(obj)
    return found


def test_every_error_class_derives_from_r3mes_error():
    classes = _error_classes()
    assert len(classes) >= 20, [c.__name__ for c in classes]  # the walk found the packages
    stray = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, R3mesError)]
    assert stray == []


def test_errors_keep_their_builtin_bases():
    from r3mes.cache import AdapterNotFoundError, AdapterValidationError
    from r3mes.core.checkpoint import CheckpointError
    from r3mes.rag.errors import UnknownIndexError
    from r3mes.utils.diskspace import DiskFullError

    assert issubclass(AdapterValidationError, ValueError)
    assert issubclass(AdapterNotFoundError, KeyError) and issubclass(UnknownIndexError, KeyError)
    assert issubclass(CheckpointError, ValueError) and issubclass(DiskFullError, OSError)
