"""Content digests of files (adapters, checkpoints, indices, bundled assets).

The content-addressed stores (adapters, index snapshots) name an object by a digest of its
files' sha256s and refuse content that does not hash to what was recorded; the file-level
half of that (hash, hash while copying, check one file) lives here, each store's digest
format next to the store.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["copy_file_hashing", "file_problem", "file_sha256", "sha256sum_digest"]

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (never whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_file_hashing(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """Copy ``src`` to ``dst`` (a new file) and return the hex sha256 of what was copied,
    reading the source once."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def sha256sum_digest(file_digests: Mapping[str, str]) -> str:
    """The sha256 of ``"<sha256>  <name>\\n"`` lines in name order (``sha256sum``'s output),
    so a tree's digest is checkable with standard tools and one file's hash shows which
    file is damaged."""
    lines = "".join(f"{file_digests[name]}  {name}\n" for name in sorted(file_digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def file_problem(path: str | os.PathLike[str], sha256: str, size: int | None = None
                 ) -> str | None:
    """Why the file at ``path`` is not the recorded content, or None when it is.

    The answer names the file: ``"<path>: missing"`` or ``"<path>: sha256 mismatch (...)"``.
    A recorded ``size`` that differs is reported without hashing the file.
    """
    file = Path(path)
    if not file.is_file():
        return f"{file}: missing"
    if size is not None and (got_size := file.stat().st_size) != size:
        return f"{file}: sha256 mismatch (the file has {got_size} bytes, {size} were recorded)"
    got = file_sha256(file)
    if got != sha256:
        return f"{file}: sha256 mismatch (expected {sha256}, found {got})"
    return None
