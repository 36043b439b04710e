"""Free disk space: a check before long work, and one clear message when the disk is full.

r3mes writes to the data directory (adapters, index snapshots, the embedding cache). On a
full disk a write fails with ``ENOSPC``; commands that would spend minutes first (embedding
documents, copying adapters) check the free space up front with :func:`ensure_free_space`,
and the command line turns any ``ENOSPC`` into one line (:func:`disk_full_message`)
instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from r3mes.errors import R3mesError

__all__ = ["DiskFullError", "disk_full_message", "ensure_free_space", "format_bytes",
           "free_bytes"]


class DiskFullError(R3mesError, OSError):
    """Not enough free space for what was asked; nothing was changed."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(errno.ENOSPC, message, None if path is None else str(path))

    def __str__(self) -> str:  # the message alone, without "[Errno 28]"
        return str(self.strerror)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, as every r3mes report writes sizes (``1.50 GiB``)."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes free to this user on the file system that holds ``path`` (or the nearest
    existing parent, for a path not created yet)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def ensure_free_space(path: str | os.PathLike[str], needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` unless ``needed`` bytes are free where ``path`` lives.

    ``what`` names the work in the message (``"indexing 3 documents"``). An estimate is
    enough: the point is to refuse in a second what would otherwise fail after minutes."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(
            f"{what} needs about {format_bytes(needed)} free on the disk of {path}, but only "
            f"{format_bytes(free)} is free; nothing was changed. Free some space (or use "
            "--home / R3MES_HOME on a larger disk) and retry", path)


def disk_full_message(exc: OSError) -> str:
    """One line for an ``ENOSPC`` / ``EDQUOT`` error: where, and what to do."""
    if isinstance(exc, DiskFullError):
        return str(exc)
    where = exc.filename or "the data directory"
    kind = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return (f"{kind} while writing {where}; the write was not completed (the previous "
            "state is kept). Free some space and retry")
