"""Moving index snapshots between data directories: export and import.

An export holds one snapshot with every snapshot it builds on (a delta's base and chain)::

    export.json                 {"format", "type", "index", "digest", "snapshots"}
    snapshots/<digest>/...      manifest.json and the files it lists (base first)

as a directory or a tar archive (``.tar``, ``.tar.gz``, ``.tgz``). Both sides verify every
digest; an import is checked and loaded from a staging copy before anything under ``<home>``
changes. :meth:`RagStore.export` and :meth:`RagStore.import_snapshot` call these functions,
which work through the store's public snapshot primitives (resolve, read, verify, load,
install).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from r3mes.rag.errors import IndexCorruptedError, RagError
from r3mes.rag.named_index import check_index_name
from r3mes.rag.snapshots import _check_file_name, _files_match, _info, _read_json
from r3mes.utils.atomic import atomic_open, atomic_write_json, fsync_dir

if TYPE_CHECKING:  # pragma: no cover
    from r3mes.rag.snapshots import RagStore

__all__ = ["EXPORT_FORMAT", "EXPORT_TYPE", "export_index", "import_index"]

EXPORT_FORMAT = 1
EXPORT_TYPE = "r3mes-rag-export"


def export_index(
    store: RagStore, name: str, out: str | os.PathLike[str], digest: str | None = None
) -> dict[str, Any]:
    """Write snapshot ``digest`` of ``name`` (default: the current one), verified, with
    every snapshot it builds on, to ``out``: a directory, or a tar archive when ``out``
    ends in ``.tar``, ``.tar.gz`` or ``.tgz``. Layout::

        export.json                 {"format", "type", "index", "digest", "snapshots"}
        snapshots/<digest>/...      manifest.json and the files it lists (base first)

    Returns ``{"index", "digest", "snapshots", "path", "format", "bytes"}``.
    """
    full = store.resolve_snapshot(name, digest)
    _, base, chain = store.verify_snapshot(name, full)
    digests = [base["digest"], *[e["digest"] for e in chain]]
    dest = Path(out)
    fmt = _archive_format(dest)
    if dest.exists() and (fmt != "directory" or not dest.is_dir() or any(dest.iterdir())):
        raise RagError(f"{dest}: already exists; export to a new path")
    if not dest.parent.is_dir():
        raise RagError(f"{dest.parent}: no such directory")
    header = {"format": EXPORT_FORMAT, "type": EXPORT_TYPE, "index": name, "digest": full,
              "snapshots": digests}
    members = [(f"snapshots/{d}/{f}", store.snapshots_dir / d / f) for d in digests
               for f in ["manifest.json", *sorted(store.read_manifest(
                   store.snapshots_dir / d)["files"])]]
    if fmt == "directory":
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for rel, src in members:
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, stage / rel)
            atomic_write_json(stage / "export.json", header)
            if dest.exists():
                dest.rmdir()  # empty (checked above)
            os.replace(stage, dest)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    else:
        raw = json.dumps(header, indent=2, sort_keys=True).encode()
        with atomic_open(dest, "wb") as fh, tarfile.open(
                fileobj=fh, mode="w:gz" if fmt == "tar.gz" else "w") as tar:
            info = tarfile.TarInfo("export.json")
            info.size, info.mtime = len(raw), int(store.clock())
            tar.addfile(info, io.BytesIO(raw))
            for rel, src in members:
                tar.add(src, arcname=rel, recursive=False)
        size = dest.stat().st_size
    return {"index": name, "digest": full, "snapshots": digests, "path": str(dest),
            "format": fmt, "bytes": size}

def import_index(store: RagStore, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Import an :func:`export_index` (directory or tar archive) and make it the current
    snapshot of its index; the previous one stays in the history (``restore`` brings it
    back).

    Only the files the manifests list are taken; every digest is verified and the index
    is loaded once from a staging copy before anything under ``<home>`` changes, so a
    tampered or truncated export raises :class:`IndexCorruptedError` naming the file and
    leaves every existing index as it was. Returns ``{"imported": S, "replaced": digest or
    None, "snapshots": [digests]}``.
    """
    src = Path(path)
    if not src.exists():
        raise RagError(f"{src}: no such file or directory")
    snaps = store.snapshots_dir
    snaps.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".import-", dir=snaps))
    try:
        root = src
        if not src.is_dir():
            root = stage / "archive"
            _extract_archive(src, root)
        header = _read_export_header(root / "export.json")
        name = check_index_name(header["index"])
        head = header["digest"]
        clean = stage / "snapshots"
        for d in header["snapshots"]:
            from_dir = root / "snapshots" / d
            m = store.read_manifest(from_dir)
            (clean / d).mkdir(parents=True)
            for f in ["manifest.json", *m["files"]]:
                _check_file_name(f, from_dir)
                if not (from_dir / f).is_file():
                    raise IndexCorruptedError(f"{from_dir / f}: missing from the export")
                shutil.copyfile(from_dir / f, clean / d / f)
        try:
            manifest, base, chain = store.verify_snapshot(name, head, clean)
            store.load_snapshot(name, head, clean)  # parses every file; checks the model
        except IndexCorruptedError as exc:
            # name the file as the user knows it, not the staging copy
            shown = f"{src}:snapshots" if root != src else str(src / "snapshots")
            raise IndexCorruptedError(
                f"import refused, nothing was changed: {str(exc).replace(str(clean), shown)}"
            ) from exc
        needed = [base["digest"], *[e["digest"] for e in chain]]
        for d in needed:
            if (snaps / d).is_dir():
                if _files_match(snaps / d, store.read_manifest(clean / d)["files"]):
                    continue
                # a damaged local copy of the same snapshot: keep it aside, install ours
                os.replace(snaps / d, snaps / f".damaged-{d}-{int(store.clock())}")
            os.replace(clean / d, snaps / d)
        fsync_dir(snaps)
        old = store.install_snapshot(name, head)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    replaced = old if old != head else None
    return {"imported": _info(manifest), "replaced": replaced, "snapshots": needed}


def _archive_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if name.endswith(".tar"):
        return "tar"
    return "directory"


def _extract_archive(src: Path, dest: Path) -> None:
    """Unpack an export archive: regular files and directories with relative names only."""
    try:
        with tarfile.open(src) as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise IndexCorruptedError(
                        f"{src}: archive member '{m.name}' is not a plain relative file")
            dest.mkdir(parents=True)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IndexCorruptedError(
            f"{src}: not a readable snapshot archive (.tar, .tar.gz) ({first.rstrip(':')})"
        ) from exc


def _read_export_header(path: Path) -> dict[str, Any]:
    h = _read_json(path, "not an r3mes index export")
    ok = (isinstance(h, dict) and h.get("type") == EXPORT_TYPE
          and h.get("format") == EXPORT_FORMAT and isinstance(h.get("index"), str)
          and isinstance(h.get("snapshots"), list) and h["snapshots"]
          and all(isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)
                  for d in h["snapshots"])
          and h.get("digest") == h["snapshots"][-1])
    if not ok:
        raise IndexCorruptedError(
            f"{path}: invalid export header (expected type {EXPORT_TYPE!r}, format "
            f"{EXPORT_FORMAT}, index, digest and the snapshots list ending at the digest)")
    return h

