"""Tier 3 of the expert cache: a content-addressed store of PEFT-format DoRA adapters on disk.

Layout under ``<home>/adapters/``::

    manifest.json                 id -> record (digest, size, rank, modules, base model, LRU, pin)
    objects/<digest>/             one immutable adapter directory per distinct content
        adapter_config.json
        adapter_model.safetensors
    .lock                         inter-process lock for mutations (fcntl)
    .staging-*/                   imports in progress (removed at the next mutation if orphaned)

The **digest** of an adapter is the sha256 of its *tree*: the lines
``"<sha256 of file>  <file name>\\n"`` for both files in name order (the ``sha256sum`` format),
so two ids with the same content share one object, and a single file's hash tells which file
is damaged. Object directories are built in a staging directory, fsynced and renamed into
place, then the manifest is rewritten atomically: a crash at any point leaves either the old
store or the new one (at worst an unreferenced object, which the next mutation removes).

The manifest is the only source of truth for ids. It is never rewritten from a corrupted
copy: a manifest that does not parse raises :class:`ManifestCorruptError` and nothing is
touched, so the operator can restore it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3mes.core.peft_config import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    AdapterInfo,
    validate_adapter,
)
from r3mes.errors import R3mesError
from r3mes.utils.atomic import atomic_write_json, file_lock, fsync_dir, fsync_tree
from r3mes.utils.diskspace import ensure_free_space, format_bytes
from r3mes.utils.hashing import copy_file_hashing, file_problem, file_sha256
from r3mes.utils.hashing import sha256sum_digest as tree_digest
from r3mes.utils.paths import r3mes_home

if TYPE_CHECKING:  # pragma: no cover
    from r3mes.cache.fetchers import Fetcher

__all__ = [
    "ADAPTER_FILES", "CONFIG_NAME", "WEIGHTS_NAME", "AdapterInfo", "AdapterNotFoundError",
    "AdapterRecord", "AdapterStore", "AdapterStoreError", "AdapterValidationError",
    "BaseModelMismatchError", "DigestMismatchError", "ManifestCorruptError", "StoreFullError",
    "VerifyResult", "adapter_digest", "inspect_adapter_dir", "shape_fingerprint", "tree_digest",
]

ADAPTER_FILES: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME)
MANIFEST_FORMAT = "r3mes-adapter-store"
MANIFEST_VERSION = 1

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_ROOM = 256 * 1024  # a generous bound on one manifest rewrite


# --------------------------------------------------------------------------- errors


class AdapterStoreError(R3mesError):
    """Base class of every error the adapter store raises."""


class AdapterValidationError(AdapterStoreError, AdapterFormatError):
    """An adapter directory is not a valid PEFT DoRA adapter (the message names file and key)."""


class DigestMismatchError(AdapterValidationError):
    """The content of an adapter does not hash to the digest it was expected to have."""


class BaseModelMismatchError(AdapterValidationError):
    """The adapter was made for a different base model than the store serves."""


class ManifestCorruptError(AdapterStoreError):
    """``manifest.json`` does not parse or has the wrong schema; nothing was modified."""


class AdapterNotFoundError(AdapterStoreError, KeyError):
    """No adapter with this id is in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "adapter not found"


class StoreFullError(AdapterStoreError):
    """The store's size limit cannot be met even after evicting every unpinned adapter."""


# --------------------------------------------------------------------------- validation


def inspect_adapter_dir(path: str | os.PathLike[str]) -> AdapterInfo:
    """Validate a PEFT DoRA adapter directory at header depth and describe it
    (:func:`r3mes.core.peft_config.validate_adapter`: config, safetensors header, keys,
    shapes, per-module ranks, ``target_modules``; no tensor data is read). Raises
    :class:`AdapterValidationError` naming file and key."""
    return validate_adapter(path, "header", AdapterValidationError)


def adapter_digest(path: str | os.PathLike[str]) -> str:
    """The content digest of an adapter directory (see :func:`tree_digest`)."""
    root = Path(path)
    return tree_digest({name: file_sha256(root / name) for name in ADAPTER_FILES})


def shape_fingerprint(module_shapes: Mapping[str, tuple[int, int]]) -> str:
    """A short hash of the adapted modules and their (out, in) shapes."""
    text = "\n".join(f"{m} {o} {i}" for m, (o, i) in sorted(module_shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- records


@dataclass
class AdapterRecord:
    """One manifest entry. ``size_bytes`` is the on-disk size of the object directory."""

    id: str
    digest: str
    files: dict[str, str]
    size_bytes: int
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    num_modules: int
    base_model: str | None
    base_model_fingerprint: str | None
    shape_fingerprint: str
    added_at: float
    last_used: float
    pinned: bool = False
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, adapter_id: str, data: Mapping[str, Any]) -> AdapterRecord:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["id"] = adapter_id
        return cls(**fields)


@dataclass
class VerifyResult:
    """The outcome of re-hashing one stored adapter."""

    id: str
    digest: str
    ok: bool
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- the store


class AdapterStore:
    """A content-addressed, size-limited store of DoRA adapters (tier 3 of the expert cache).

    Args:
        home: the r3mes data directory (``r3mes_home(home)``); the store lives in ``adapters/``.
        base_model: if set, adapters whose ``base_model_name_or_path`` differs are refused.
        base_model_fingerprint: if set, adapters declared for another fingerprint are refused.
        expected_shapes: if set (module suffix such as ``"self_attn.q_proj"`` or full module
            path -> (out, in)), each adapted module must match the base model's shape.
        max_size_gb: size limit; overrides (and persists to) the manifest's stored limit.
        fetchers: remote sources tried by :meth:`ensure` for ids the store lacks. Empty by
            default: nothing is ever fetched unless configured.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        base_model: str | None = None,
        base_model_fingerprint: str | None = None,
        expected_shapes: Mapping[str, tuple[int, int]] | None = None,
        max_size_gb: float | None = None,
        fetchers: Sequence[Fetcher] = (),
    ) -> None:
        self.root = r3mes_home(home) / "adapters"
        self.objects = self.root / "objects"
        self.manifest_path = self.root / "manifest.json"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.base_model = base_model
        self.base_model_fingerprint = base_model_fingerprint
        self.expected_shapes = dict(expected_shapes) if expected_shapes else None
        self.fetchers: list[Fetcher] = list(fetchers)
        self._thread_lock = threading.RLock()
        self._pending_touch: dict[str, float] = {}
        self._last_flush = time.monotonic()
        #: ids evicted by the last :meth:`add` to honour the size limit
        self.last_evicted: list[str] = []
        # Fail early on a corrupted manifest rather than at the first mutation.
        self._read_manifest()
        if max_size_gb is not None:
            self.set_max_size_gb(max_size_gb)

    # ------------------------------------------------------------------ manifest + lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise mutations across threads (RLock) and processes (flock on ``.lock``)."""
        with self._thread_lock, file_lock(self.root / ".lock"):
            yield

    def _read_manifest(self) -> dict[str, Any]:
        """The parsed manifest. ``max_size_bytes`` is present only once a limit (or an
        explicit "none") was set, so a default never passes for the user's choice."""
        if not self.manifest_path.exists():
            return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "adapters": {}}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestCorruptError(
                f"{self.manifest_path}: corrupted ({exc}); the store was not modified. Restore "
                f"the file from a backup; adapter contents under {self.objects} are intact"
            ) from exc
        if (not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT
                or not isinstance(data.get("adapters"), dict)):
            raise ManifestCorruptError(
                f"{self.manifest_path}: not an r3mes adapter manifest (format/adapters missing); "
                "the store was not modified")
        if data.get("version") != MANIFEST_VERSION:
            raise ManifestCorruptError(
                f"{self.manifest_path}: manifest version {data.get('version')!r} is not "
                f"supported (expected {MANIFEST_VERSION})")
        for adapter_id, entry in data["adapters"].items():
            if (not isinstance(entry, dict) or not _DIGEST_RE.match(str(entry.get("digest", "")))
                    or not isinstance(entry.get("size_bytes"), int)):
                raise ManifestCorruptError(
                    f"{self.manifest_path}: entry {adapter_id!r} is malformed; the store was "
                    "not modified")
        return data

    def _write_manifest(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, data)

    def _records(self, data: Mapping[str, Any]) -> dict[str, AdapterRecord]:
        return {k: AdapterRecord.from_json(k, v) for k, v in data["adapters"].items()}

    def _merge_pending_touch(self, data: dict[str, Any]) -> None:
        for adapter_id, when in self._pending_touch.items():
            entry = data["adapters"].get(adapter_id)
            if entry is not None:
                entry["last_used"] = max(float(entry.get("last_used", 0.0)), when)
        self._pending_touch.clear()
        self._last_flush = time.monotonic()

    def _cleanup_orphans(self, data: Mapping[str, Any]) -> None:
        """Remove staging dirs and unreferenced objects (only ever called under the lock)."""
        referenced = {entry["digest"] for entry in data["adapters"].values()}
        for child in [*self.root.glob(".staging-*"), *self.root.glob(".fetch-*")]:
            # Another live process (or thread of ours) may be copying into its staging dir
            # right now; only a dead writer's leftovers are orphans.
            if not _pid_alive(_staging_pid(child.name)):
                shutil.rmtree(child, ignore_errors=True)
        for leftover in self.root.glob(".manifest.json.*.tmp"):
            # atomic_write_json's temp file from a writer killed before its rename; a live
            # writer holds the lock we hold now, so none of these is in progress.
            leftover.unlink(missing_ok=True)
        for child in self.objects.iterdir():
            if child.name not in referenced:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    # ------------------------------------------------------------------ queries

    def list(self) -> list[AdapterRecord]:
        """All records, sorted by id (last-used times include not yet flushed touches)."""
        with self._thread_lock:
            records = self._records(self._read_manifest())
            for adapter_id, when in self._pending_touch.items():
                if adapter_id in records:
                    records[adapter_id].last_used = max(records[adapter_id].last_used, when)
        return [records[k] for k in sorted(records)]

    def get(self, adapter_id: str) -> AdapterRecord:
        """The record of ``adapter_id``; :class:`AdapterNotFoundError` if absent."""
        records = self._records(self._read_manifest())
        if adapter_id not in records:
            raise AdapterNotFoundError(
                f"adapter {adapter_id!r} is not in the store {self.root} "
                f"(known: {', '.join(sorted(records)) or 'none'})")
        return records[adapter_id]

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and adapter_id in self._read_manifest()["adapters"]

    def path(self, adapter_id: str) -> Path:
        """The (read-only, immutable) object directory of ``adapter_id``."""
        return self.objects / self.get(adapter_id).digest

    @property
    def max_size_bytes(self) -> int | None:
        """The size limit in bytes, or ``None`` for unlimited."""
        return self._read_manifest().get("max_size_bytes")

    def total_bytes(self) -> int:
        """Bytes used by distinct objects (adapters sharing content are counted once)."""
        by_digest = {e["digest"]: e["size_bytes"]
                     for e in self._read_manifest()["adapters"].values()}
        return sum(by_digest.values())

    def stats(self) -> dict[str, Any]:
        """Counts and sizes, JSON-ready (the ``r3mes adapters stats --json`` schema)."""
        records = self.list()
        used = self.total_bytes()
        limit = self.max_size_bytes
        return {
            "root": str(self.root),
            "adapters": len(records),
            "objects": len({r.digest for r in records}),
            "pinned": sum(r.pinned for r in records),
            "total_bytes": used,
            "max_size_bytes": limit,
            "utilisation": (used / limit) if limit else None,
        }

    # ------------------------------------------------------------------ mutations

    def set_max_size_gb(self, max_size_gb: float | None) -> list[str]:
        """Set (and persist) the size limit; evicts LRU unpinned adapters to meet it.

        Returns the evicted ids.
        """
        return self._set_limit(max_size_gb, only_if_unset=False)

    def limit_is_set(self) -> bool:
        """Whether a size limit (a number or an explicit "none") is recorded in the store."""
        return "max_size_bytes" in self._read_manifest()

    def set_default_max_size_gb(self, max_size_gb: float | None) -> list[str]:
        """Record ``max_size_gb`` as the size limit only when the store has none recorded
        yet (a new store): a limit the user set with ``r3mes adapters limit`` is theirs and
        is never reset by a default. Returns the evicted ids (none for an existing limit)."""
        return self._set_limit(max_size_gb, only_if_unset=True)

    def _set_limit(self, max_size_gb: float | None, *, only_if_unset: bool) -> list[str]:
        if max_size_gb is not None and (not math.isfinite(max_size_gb) or max_size_gb <= 0):
            raise ValueError(f"max_size_gb must be a positive number or None, got {max_size_gb!r}")
        with self._locked():
            data = self._read_manifest()
            if only_if_unset and "max_size_bytes" in data:
                return []
            self._merge_pending_touch(data)
            data["max_size_bytes"] = (None if max_size_gb is None
                                      else int(max_size_gb * 1024**3))
            evicted = self._evict_for(data, incoming_digest=None, incoming_bytes=0)
            self._write_manifest(data)
            self._cleanup_orphans(data)
        return evicted

    def add(
        self,
        path: str | os.PathLike[str],
        adapter_id: str,
        *,
        pinned: bool = False,
        expected_digest: str | None = None,
        base_model_fingerprint: str | None = None,
        replace: bool = False,
        source: str | None = None,
    ) -> AdapterRecord:
        """Import the adapter directory ``path`` as ``adapter_id``.

        The files are copied into a staging directory while being hashed, validated there
        (so a file changing under us cannot slip through), fsynced and renamed into
        ``objects/<digest>``; then the manifest is updated atomically.

        Args:
            expected_digest: refuse (:class:`DigestMismatchError`) unless the content hashes
                to it.
            base_model_fingerprint: the fingerprint of the model the adapter was trained on,
                if known; refused if the store expects another.
            replace: allow re-pointing an existing id at new content.
        Raises:
            AdapterValidationError (or a subclass), StoreFullError, ValueError for a bad id.
        """
        if not isinstance(adapter_id, str) or not _ID_RE.match(adapter_id):
            raise ValueError(
                f"invalid adapter id {adapter_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit")
        if expected_digest is not None and not _DIGEST_RE.match(expected_digest):
            raise ValueError(
                f"expected_digest must be 64 lowercase hex digits: {expected_digest!r}")
        src = Path(path)
        if not src.is_dir():
            raise AdapterValidationError(f"{src}: not a directory")
        for name in ADAPTER_FILES:
            if not (src / name).is_file():
                raise AdapterValidationError(f"{src / name}: missing")
        # The copy, plus room for the new manifest: refused up front on a full disk.
        ensure_free_space(self.root, sum((src / n).stat().st_size for n in ADAPTER_FILES)
                          + _MANIFEST_ROOM, f"adding adapter {adapter_id!r}")
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=self.root))
        try:
            file_digests = {name: copy_file_hashing(src / name, staging / name)
                            for name in ADAPTER_FILES}
            digest = tree_digest(file_digests)
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatchError(
                    f"{src}: content digest {digest} does not match the expected "
                    f"{expected_digest}")
            info = inspect_adapter_dir(staging)
            self._check_base_model(src, info, base_model_fingerprint)
            fsync_tree(staging)
            size = sum((staging / name).stat().st_size for name in ADAPTER_FILES)
            now = time.time()
            with self._locked():
                data = self._read_manifest()
                self._merge_pending_touch(data)
                old = data["adapters"].get(adapter_id)
                if old is not None and old["digest"] != digest and not replace:
                    raise AdapterStoreError(
                        f"adapter id {adapter_id!r} already exists with digest {old['digest']}; "
                        "remove it first or pass replace=True (--replace)")
                if old is not None:
                    # Re-adding is an update of the same id: it must not count against itself.
                    del data["adapters"][adapter_id]
                evicted = self._evict_for(data, incoming_digest=digest, incoming_bytes=size,
                                          incoming_id=adapter_id)
                target = self.objects / digest
                if not target.exists():
                    os.replace(staging, target)
                    fsync_dir(self.objects)
                record = AdapterRecord(
                    id=adapter_id, digest=digest, files=file_digests, size_bytes=size,
                    rank=info.rank, lora_alpha=info.lora_alpha, use_rslora=info.use_rslora,
                    target_modules=list(info.target_modules), num_modules=len(info.module_shapes),
                    base_model=info.base_model,
                    base_model_fingerprint=base_model_fingerprint or self.base_model_fingerprint,
                    shape_fingerprint=shape_fingerprint(info.module_shapes),
                    added_at=old["added_at"] if old and old["digest"] == digest else now,
                    last_used=now, pinned=pinned or bool(old and old.get("pinned")),
                    source=source or str(src.resolve()),
                )
                data["adapters"][adapter_id] = record.to_json()
                self._write_manifest(data)
                self._cleanup_orphans(data)
            self.last_evicted = evicted
            return record
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _check_base_model(self, src: Path, info: AdapterInfo, fingerprint: str | None) -> None:
        if self.base_model is not None and info.base_model not in (None, "") and (
                _norm_model(info.base_model) != _norm_model(self.base_model)):
            raise BaseModelMismatchError(
                f"{src / CONFIG_NAME}: made for base model {info.base_model!r}, but this store "
                f"serves {self.base_model!r}")
        if (self.base_model_fingerprint is not None and fingerprint is not None
                and fingerprint != self.base_model_fingerprint):
            raise BaseModelMismatchError(
                f"{src}: made for base-model fingerprint {fingerprint}, but this store serves "
                f"{self.base_model_fingerprint}")
        if self.expected_shapes:
            for module, shape in info.module_shapes.items():
                expected = self.expected_shapes.get(module)
                if expected is None:
                    expected = next((v for k, v in self.expected_shapes.items()
                                     if module.endswith("." + k)), None)
                if expected is None:
                    raise BaseModelMismatchError(
                        f"{src / WEIGHTS_NAME}: module {module!r} does not exist in the base model")
                if tuple(expected) != tuple(shape):
                    raise BaseModelMismatchError(
                        f"{src / WEIGHTS_NAME}: module {module!r} is [out={shape[0]}, "
                        f"in={shape[1]}] but the base model's is [out={expected[0]}, "
                        f"in={expected[1]}]")

    def _evict_for(self, data: dict[str, Any], *, incoming_digest: str | None,
                   incoming_bytes: int, incoming_id: str | None = None) -> list[str]:
        """Drop LRU unpinned adapters from ``data`` until the incoming object fits the limit."""
        limit = data.get("max_size_bytes")
        if limit is None:
            return []
        adapters: dict[str, Any] = data["adapters"]

        if incoming_bytes > limit:
            raise StoreFullError(
                f"adapter {incoming_id!r} is {format_bytes(incoming_bytes)}, larger than the "
                f"store limit of {format_bytes(limit)}")
        evicted: list[str] = []
        candidates = sorted(
            (k for k, e in adapters.items() if not e.get("pinned")
             and e["digest"] != incoming_digest),
            key=lambda k: (adapters[k].get("last_used", 0.0), k))
        plan = dict(adapters)
        for adapter_id in candidates:
            if _used_bytes(plan, incoming_digest, incoming_bytes) <= limit:
                break
            del plan[adapter_id]
            evicted.append(adapter_id)
        if _used_bytes(plan, incoming_digest, incoming_bytes) > limit:
            raise StoreFullError(
                f"store limit {format_bytes(limit)} cannot hold "
                f"{incoming_id or 'the adapters'!r} ({format_bytes(incoming_bytes)}) even after "
                "evicting every unpinned adapter; "
                f"{format_bytes(_used_bytes(plan, incoming_digest, incoming_bytes))} would "
                "remain in use; unpin or remove adapters, or raise "
                "max_size_gb")
        for adapter_id in evicted:
            del adapters[adapter_id]
        return evicted

    def remove(self, adapter_id: str) -> AdapterRecord:
        """Remove ``adapter_id``; its object is deleted when no other id shares it.

        Works on a full disk: when the new manifest cannot be written for lack of space,
        the adapter's object (if no other id shares it) is deleted first to make room. A
        crash between the two leaves a manifest entry whose files are gone, which
        ``verify`` reports and a second ``remove`` clears."""
        with self._locked():
            data = self._manifest_holding(adapter_id)
            record = AdapterRecord.from_json(adapter_id, data["adapters"].pop(adapter_id))
            try:
                self._write_manifest(data)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if record.digest not in {e["digest"] for e in data["adapters"].values()}:
                    shutil.rmtree(self.objects / record.digest, ignore_errors=True)
                self._write_manifest(data)
            self._cleanup_orphans(data)
        return record

    def set_pinned(self, adapter_id: str, pinned: bool = True) -> AdapterRecord:
        """Pin (exempt from LRU eviction) or unpin an adapter."""
        with self._locked():
            data = self._manifest_holding(adapter_id)
            data["adapters"][adapter_id]["pinned"] = bool(pinned)
            self._write_manifest(data)
            return AdapterRecord.from_json(adapter_id, data["adapters"][adapter_id])


    def _manifest_holding(self, adapter_id: str) -> dict[str, Any]:
        """The manifest (pending LRU touches merged) of a store that holds ``adapter_id``;
        call with the lock held."""
        data = self._read_manifest()
        self._merge_pending_touch(data)
        if adapter_id not in data["adapters"]:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in the store {self.root}")
        return data
    def touch(self, adapter_id: str, when: float | None = None,
              flush_after_s: float = 30.0) -> None:
        """Record a use for LRU. Batched: the manifest is rewritten at most every
        ``flush_after_s`` seconds (and at every mutation / :meth:`flush`), so a hot path that
        loads adapters does not pay an fsync per load."""
        with self._thread_lock:
            self._pending_touch[adapter_id] = time.time() if when is None else when
            due = time.monotonic() - self._last_flush >= flush_after_s
        if due:
            try:
                self.flush()
            except OSError:  # e.g. a full disk: last-used times are hints, the load goes on
                pass

    def flush(self) -> None:
        """Write pending last-used times to the manifest."""
        with self._locked():
            if not self._pending_touch:
                return
            data = self._read_manifest()
            self._merge_pending_touch(data)
            self._write_manifest(data)

    def verify(self, adapter_id: str | None = None) -> list[VerifyResult]:
        """Re-hash stored files and re-validate structure; one result per adapter.

        Does not raise for damaged adapters: each result lists its problems (missing file,
        digest mismatch naming the file, structural error).
        """
        records = [self.get(adapter_id)] if adapter_id is not None else self.list()
        results: list[VerifyResult] = []
        for record in records:
            problems: list[str] = []
            obj = self.objects / record.digest
            for name, expected in sorted(record.files.items()):
                problem = file_problem(obj / name, expected)
                if problem is not None:
                    problems.append(problem)
            if not problems and tree_digest(record.files) != record.digest:
                problems.append(f"manifest entry {record.id!r}: file digests do not add up to "
                                f"{record.digest}")
            if not problems:
                try:
                    inspect_adapter_dir(obj)
                except AdapterValidationError as exc:
                    problems.append(str(exc))
            results.append(VerifyResult(record.id, record.digest, not problems, problems))
        return results

    # ------------------------------------------------------------------ remote sources

    def ensure(self, adapter_id: str, *, expected_digest: str | None = None) -> AdapterRecord:
        """The record of ``adapter_id``, fetching it from a configured fetcher if absent.

        With no fetchers configured this is :meth:`get` (raises AdapterNotFoundError).
        """
        try:
            return self.get(adapter_id)
        except AdapterNotFoundError:
            if not self.fetchers:
                raise
        errors: list[str] = []
        for fetcher in self.fetchers:
            if not fetcher.has(adapter_id):
                continue
            with tempfile.TemporaryDirectory(prefix=f".fetch-{os.getpid()}-",
                                             dir=self.root) as tmp:
                try:
                    fetched = fetcher.fetch(adapter_id, Path(tmp),
                                            expected_digest=expected_digest)
                    digest = expected_digest or fetcher.digest_for(adapter_id)
                    return self.add(fetched, adapter_id, expected_digest=digest,
                                    source=fetcher.describe(adapter_id))
                except AdapterStoreError as exc:
                    errors.append(f"{fetcher.describe(adapter_id)}: {exc}")
        detail = "; ".join(errors) if errors else "no configured fetcher knows it"
        raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in the store and could not "
                                   f"be fetched: {detail}")


def _used_bytes(adapters: Mapping[str, Any], incoming_digest: str | None,
                incoming_bytes: int) -> int:
    by_digest = {e["digest"]: e["size_bytes"] for e in adapters.values()}
    if incoming_digest is not None:
        by_digest[incoming_digest] = incoming_bytes
    return sum(by_digest.values())


def _staging_pid(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _norm_model(name: str) -> str:
    return name.strip().rstrip("/").lower()
