"""The r3mes data directory: all state (adapter store, RAG indices, caches, config) lives here."""

from __future__ import annotations

import os
from pathlib import Path


def r3mes_home(override: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``override``, else ``$R3MES_HOME``, else ``~/.r3mes``.

    The directory is created if missing.
    """
    if override is not None:
        home = Path(override)
    elif os.environ.get("R3MES_HOME"):
        home = Path(os.environ["R3MES_HOME"])
    else:
        home = Path.home() / ".r3mes"
    home = home.expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
