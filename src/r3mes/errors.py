"""The root of r3mes's exceptions.

Every error class the package raises for bad input or bad stored state derives from
:class:`R3mesError`, so a caller can catch "anything r3mes refused" without catching
programming errors (``except R3mesError``, not ``except Exception``). Each subclass also keeps
the built-in base it always had (``ValueError``, ``KeyError``, ``RuntimeError``, ``OSError``),
so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["R3mesError"]


class R3mesError(Exception):
    """Base class of every error r3mes raises on purpose; the message names what is wrong."""
