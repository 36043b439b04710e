"""Named indices and their versioned, content-addressed snapshots.

Six indices exist by default: ``general``, ``news``, ``medical``, ``legal``, ``code`` and
``user``; any other valid name (:func:`check_index_name`) makes a new index on first use.
``news`` has a time-to-live of 7 days: a news chunk expires 7 days after its document's
``timestamp`` metadata (epoch seconds or ISO 8601), else after it was added; expired chunks are
never returned and :meth:`NamedIndex.purge_expired` (run before every save) removes them.

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
older one. ``export`` / ``import_snapshot`` move a snapshot with everything it builds on
between data directories (a directory or a tar archive), verified on both sides.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from r3mes.rag.chunker import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP, Chunker, Document
from r3mes.rag.errors import (
    DocumentError,
    IndexCorruptedError,
    RagError,
    StaleIndexError,
    UnknownIndexError,
)
from r3mes.rag.faiss_store import KINDS, FaissStore, npy_bytes, read_npy
from r3mes.rag.sparse import BM25Index, TokenizerConfig
from r3mes.utils.atomic import atomic_open, atomic_write_bytes, atomic_write_json
from r3mes.utils.hashing import file_sha256
from r3mes.utils.paths import r3mes_home

INDEX_NAMES = ("general", "news", "medical", "legal", "code", "user")
DAY_S = 86400.0
DEFAULT_TTL_S: dict[str, float] = {"news": 7 * DAY_S}
SNAPSHOT_FORMAT = 1  # a full snapshot's manifest
DELTA_FORMAT = 2  # a delta snapshot's manifest (older readers refuse it instead of misreading)
EXPORT_FORMAT = 1
EXPORT_TYPE = "r3mes-rag-export"
DEFAULT_KEEP_SNAPSHOTS = 10
# Deltas are for small changes to large indices: past 8 stacked deltas, or once they touch a
# quarter of the chunks (then rewriting costs about as much as the deltas add up to), the next
# save writes a full snapshot again.
DEFAULT_MAX_DELTAS = 8
DEFAULT_COMPACT_FRACTION = 0.25

# The router's domain names (and a few common synonyms, English and Turkish) -> index.
DOMAIN_TO_INDEX: dict[str, str] = {
    "general": "general", "genel": "general",
    "news": "news", "haber": "news", "haberler": "news", "current_events": "news",
    "medical": "medical", "medicine": "medical", "health": "medical", "tıp": "medical",
    "sağlık": "medical", "saglik": "medical",
    "legal": "legal", "law": "legal", "hukuk": "legal",
    "code": "code", "coding": "code", "programming": "code", "software": "code",
    "yazılım": "code", "kod": "code",
    "user": "user", "personal": "user",
}


_INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_index_name(name: str) -> str:
    """``name`` if it is a valid index name, else :class:`UnknownIndexError`.

    Index names are the user's: letters, digits, ``-`` and ``_``, starting with a letter or
    digit, at most 64 characters (they become file names). :data:`INDEX_NAMES` are the
    defaults that exist without being created (``news`` with its time-to-live)."""
    if not isinstance(name, str) or not _INDEX_NAME.match(name):
        raise UnknownIndexError(
            f"invalid index name {name!r}: use letters, digits, '-' and '_' (at most 64, "
            f"starting with a letter or digit; the defaults are {', '.join(INDEX_NAMES)})")
    return name


def route_domain(domain: str | None) -> list[str]:
    """Indices to search for a router domain: the domain's own index first, then ``general``;
    an unknown or missing domain searches ``general`` only."""
    if not domain:
        return ["general"]
    target = DOMAIN_TO_INDEX.get(domain.strip().lower())
    if target is None or target == "general":
        return ["general"]
    return [target, "general"]


def parse_timestamp(value: Any, where: str) -> float:
    """Epoch seconds from a number or an ISO 8601 string (naive means UTC)."""
    if isinstance(value, bool):
        raise DocumentError(f"{where}: timestamp must be a number or ISO 8601 string")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise DocumentError(f"{where}: timestamp '{value}' is not ISO 8601") from exc
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    raise DocumentError(f"{where}: timestamp must be a number or ISO 8601 string")


@dataclass
class ChunkRecord:
    """What is stored about one chunk besides its vector."""

    id: int
    doc_id: str
    position: int
    text: str
    metadata: dict[str, Any]
    added_at: float
    expires_at: float | None = None

    @property
    def chunk_id(self) -> str:
        return f"{self.doc_id}#{self.position}"

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass
class IndexConfig:
    """Per-index settings, stored in every snapshot manifest."""

    kind: str = "flat"
    max_tokens: int = DEFAULT_MAX_TOKENS
    overlap: int = DEFAULT_OVERLAP
    ttl_s: float | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    store_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind '{self.kind}' (choose one of {KINDS})")

    @classmethod
    def for_index(cls, name: str, **overrides: Any) -> IndexConfig:
        overrides.setdefault("ttl_s", DEFAULT_TTL_S.get(name))
        return cls(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_tokens": self.max_tokens, "overlap": self.overlap,
                "ttl_s": self.ttl_s, "tokenizer": self.tokenizer.to_dict(),
                "store_params": self.store_params}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IndexConfig:
        return cls(kind=d["kind"], max_tokens=int(d["max_tokens"]), overlap=int(d["overlap"]),
                   ttl_s=d.get("ttl_s"), tokenizer=TokenizerConfig(**d["tokenizer"]),
                   store_params=dict(d.get("store_params", {})))


class NamedIndex:
    """One named index: chunks, their dense vectors (FAISS) and BM25 terms, kept in step."""

    def __init__(
        self,
        name: str,
        embedder: Any,
        config: IndexConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = check_index_name(name)
        self.embedder = embedder
        self.config = config or IndexConfig.for_index(name)
        # A chunk longer than the model reads would be embedded from its beginning only, so
        # chunks are capped at the model's window (254 word pieces for MiniLM).
        model_window = getattr(embedder, "max_tokens", None)
        if model_window and self.config.max_tokens > model_window:
            self.config.max_tokens = int(model_window)
            self.config.overlap = min(self.config.overlap, self.config.max_tokens // 4)
        self.clock = clock
        self.chunker = Chunker(self.config.max_tokens, self.config.overlap)
        self.dense = FaissStore(embedder.dim, self.config.kind, **self.config.store_params)
        self.sparse = BM25Index(self.config.tokenizer)
        self.records: dict[int, ChunkRecord] = {}
        self.docs: dict[str, list[int]] = {}
        self.next_id = 0
        self.parent: str | None = None  # digest of the snapshot this state was loaded from
        self._saved_ids: set[int] = set()  # chunk ids stored in that snapshot
        self._expiry_stale = True  # records changed since _earliest was computed
        self._earliest: float | None = None

    # -- content -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def add_documents(self, docs: Iterable[Document], now: float | None = None) -> dict[str, int]:
        """Chunk, embed and index ``docs``. A ``doc_id`` already present is replaced (update).

        All documents are validated and chunked before anything changes, so one bad document
        leaves the index as it was. Returns counts: documents, replaced, chunks.

        An id made from a file name (``README.md``, ``notes.jsonl:3``, as
        :func:`~r3mes.rag.chunker.load_documents` makes them) names one *file*: a document
        with that id from another ``source`` path gets ``<id>@<8 hex of its path>`` instead
        of replacing the first (two folders' README.md are two documents).
        """
        now = self.clock() if now is None else now
        docs = self._ids_unique_per_source(list(docs))
        seen: set[str] = set()
        planned: list[tuple[Document, list, float | None]] = []
        for doc in docs:
            if doc.doc_id in seen:
                raise DocumentError(f"document id '{doc.doc_id}' appears twice in one batch")
            seen.add(doc.doc_id)
            chunks = self.chunker.chunk(doc)
            expires = None
            if self.config.ttl_s is not None:
                base = now
                if "timestamp" in doc.metadata:
                    base = parse_timestamp(doc.metadata["timestamp"], f"document '{doc.doc_id}'")
                expires = base + float(self.config.ttl_s)
            planned.append((doc, chunks, expires))
        texts = [c.text for _, chunks, _ in planned for c in chunks]
        vectors = self.embedder.embed(texts) if texts else np.empty((0, self.embedder.dim))
        replaced = self.delete_documents([d.doc_id for d, _, _ in planned if d.doc_id in self.docs])
        ids: list[int] = []
        for doc, chunks, expires in planned:
            doc_ids = []
            for c in chunks:
                rec = ChunkRecord(self.next_id, c.doc_id, c.position, c.text, c.metadata,
                                  now, expires)
                self.records[rec.id] = rec
                doc_ids.append(rec.id)
                ids.append(rec.id)
                self.next_id += 1
            self.docs[doc.doc_id] = doc_ids
        if ids:
            self.dense.add(np.array(ids, dtype=np.int64), vectors)
            self.sparse.add(ids, texts)
        self._expiry_stale = True
        return {"documents": len(planned), "replaced": replaced, "chunks": len(ids)}

    def _ids_unique_per_source(self, docs: list[Document]) -> list[Document]:
        """``docs`` with file-name ids made unique per source path (see add_documents)."""
        sources = {d: self.records[ids[0]].metadata.get("source")
                   for d, ids in self.docs.items() if ids}
        out = []
        for doc in docs:
            source = doc.metadata.get("source")
            if isinstance(source, str) and _id_from_file_name(doc.doc_id, source):
                taken = sources.get(doc.doc_id, source)
                if taken != source:
                    digest = hashlib.sha256(source.encode("utf-8", "replace")).hexdigest()
                    doc = Document(f"{doc.doc_id}@{digest[:8]}", doc.text, doc.metadata)
                sources.setdefault(doc.doc_id, source)
            out.append(doc)
        return out

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove documents (all their chunks); returns how many documents were present."""
        gone_docs = 0
        gone_ids: list[int] = []
        for doc_id in doc_ids:
            ids = self.docs.pop(doc_id, None)
            if ids is None:
                continue
            gone_docs += 1
            gone_ids.extend(ids)
            for i in ids:
                self.records.pop(i, None)
        if gone_ids:
            self.dense.remove(gone_ids)
            self.sparse.remove(gone_ids)
            self._expiry_stale = True
        return gone_docs

    def expired_doc_ids(self, now: float | None = None) -> list[str]:
        now = self.clock() if now is None else now
        return sorted({r.doc_id for r in self.records.values() if r.expired(now)})

    def purge_expired(self, now: float | None = None) -> list[str]:
        """Delete every document whose chunks have expired; returns their ids."""
        expired = self.expired_doc_ids(now)
        self.delete_documents(expired)
        return expired

    # -- search --------------------------------------------------------------------------

    def allowed_ids(
        self, now: float, filters: Mapping[str, Any] | None = None
    ) -> set[int] | None:
        """Ids a search may return, or ``None`` for all (no filter, nothing expired)."""
        if not filters:
            earliest = self._earliest_expiry()
            if earliest is None or earliest > now:
                return None
        return {i for i, r in self.records.items()
                if not r.expired(now) and _matches(r, filters)}

    def _earliest_expiry(self) -> float | None:
        # Cached so that a search on an index with a time-to-live does not scan every chunk
        # in Python (O(n) a query) just to learn that nothing has expired yet.
        if self._expiry_stale:
            self._earliest = min((r.expires_at for r in self.records.values()
                                  if r.expires_at is not None), default=None)
            self._expiry_stale = False
        return self._earliest

    def dense_search(
        self, query_vec: np.ndarray, k: int, allowed: set[int] | None = None
    ) -> list[tuple[int, float]]:
        if not self.records or (allowed is not None and not allowed):
            return []
        scores, ids = self.dense.search(query_vec, k, allowed_ids=allowed)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def sparse_search(
        self, query: str, k: int, allowed: set[int] | None = None
    ) -> list[tuple[int, float]]:
        if not self.records or (allowed is not None and not allowed):
            return []
        return self.sparse.search(query, k, allowed_ids=allowed)

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "documents": len(self.docs), "chunks": len(self.records),
                "kind": self.config.kind, "active_kind": self.dense.active_kind,
                "ttl_s": self.config.ttl_s, "snapshot": self.parent}

    # -- serialisation -------------------------------------------------------------------

    def write_files(self, directory: Path) -> list[str]:
        """Write the whole index (a full snapshot's files) into ``directory``."""
        files = self.dense.save(directory)
        lines = [self._record_line(i) for i in sorted(self.records)]
        atomic_write_bytes(directory / "chunks.jsonl", ("\n".join(lines) + "\n").encode()
                           if lines else b"")
        return files + ["chunks.jsonl"]

    def changes_since_saved(self) -> tuple[list[int], list[int]]:
        """``(added, deleted)`` chunk ids relative to the snapshot this state was loaded from
        or last saved as. Chunk ids are never reused, so an update is a delete plus an add."""
        current = set(self.records)
        return sorted(current - self._saved_ids), sorted(self._saved_ids - current)

    def mark_saved(self) -> None:
        self._saved_ids = set(self.records)

    def write_delta(self, directory: Path, added: Sequence[int], deleted: Sequence[int]
                    ) -> list[str]:
        """Write the changes since the saved state as a delta: ``added.jsonl`` (chunk records,
        as in ``chunks.jsonl``), ``added-vectors.npy`` (their vectors, same order) and
        ``deleted.npy`` (int64 chunk ids)."""
        directory.mkdir(parents=True, exist_ok=True)
        lines = [self._record_line(i) for i in added]
        atomic_write_bytes(directory / "added.jsonl",
                           ("\n".join(lines) + "\n").encode() if lines else b"")
        vecs = self.dense.get_vectors(added)
        atomic_write_bytes(directory / "added-vectors.npy", npy_bytes(vecs))
        atomic_write_bytes(directory / "deleted.npy",
                           npy_bytes(np.asarray(deleted, dtype=np.int64)))
        return ["added-vectors.npy", "added.jsonl", "deleted.npy"]

    def apply_delta(self, directory: Path) -> None:
        """Apply a delta written by :meth:`write_delta` (already digest-verified)."""
        deleted = read_npy(directory / "deleted.npy")
        if deleted.dtype != np.int64 or deleted.ndim != 1:
            raise IndexCorruptedError(f"{directory / 'deleted.npy'}: expected 1-d int64 ids")
        records = list(_read_records(directory / "added.jsonl"))
        vecs = read_npy(directory / "added-vectors.npy")
        if vecs.dtype != np.float32 or vecs.shape != (len(records), self.dense.dim):
            raise IndexCorruptedError(
                f"{directory / 'added-vectors.npy'}: expected float32 ({len(records)}, "
                f"{self.dense.dim}), got {vecs.dtype} {vecs.shape}")
        missing = [int(i) for i in deleted if int(i) not in self.records]
        clash = [r.id for r, _ in records if r.id in self.records]
        if missing or clash:
            raise IndexCorruptedError(
                f"{directory}: delta does not fit its parent (deletes unknown chunk ids "
                f"{missing[:5]}, re-adds present ids {clash[:5]})")
        gone = [int(i) for i in deleted]
        for i in gone:
            rec = self.records.pop(i)
            ids = self.docs[rec.doc_id]
            ids.remove(i)
            if not ids:
                del self.docs[rec.doc_id]
        if gone:
            self.dense.remove(gone)
            self.sparse.remove(gone)
        for rec, _ in records:
            self.records[rec.id] = rec
            self.docs.setdefault(rec.doc_id, []).append(rec.id)
        if records:
            ids_arr = np.array([r.id for r, _ in records], dtype=np.int64)
            self.dense.add(ids_arr, vecs)
            self.sparse.add_tokens(ids_arr.tolist(), [t for _, t in records])
        self.next_id = max(self.next_id, max(self.records, default=-1) + 1)
        self._expiry_stale = True

    def _record_line(self, i: int) -> str:
        r = self.records[i]
        return json.dumps({
            "id": r.id, "doc_id": r.doc_id, "position": r.position, "text": r.text,
            "metadata": r.metadata, "added_at": r.added_at, "expires_at": r.expires_at,
            "terms": self.sparse.tokens(i),
        }, ensure_ascii=False, sort_keys=True)

    @classmethod
    def read_files(
        cls, directory: Path, name: str, embedder: Any, config: IndexConfig, next_id: int,
        clock: Callable[[], float] = time.time,
    ) -> NamedIndex:
        index = cls(name, embedder, config, clock)
        store = FaissStore.load(directory)
        if store.dim != embedder.dim:
            raise IndexCorruptedError(
                f"{directory}: vectors have dim {store.dim}, the embedding model gives "
                f"{embedder.dim}")
        index.dense = store
        ids, terms = [], []
        for rec, term_list in _read_records(directory / "chunks.jsonl"):
            index.records[rec.id] = rec
            index.docs.setdefault(rec.doc_id, []).append(rec.id)
            ids.append(rec.id)
            terms.append(term_list)
        if set(ids) != {int(i) for i in store.ids}:
            raise IndexCorruptedError(
                f"{directory}: chunks.jsonl and ids.npy disagree ({len(ids)} vs {len(store)})")
        index.sparse.add_tokens(ids, terms)
        index.next_id = max(next_id, max(ids, default=-1) + 1)
        index.mark_saved()
        return index


def _read_records(path: Path) -> Iterator[tuple[ChunkRecord, list[str]]]:
    """Chunk records and their BM25 terms from a ``chunks.jsonl`` / ``added.jsonl`` file."""
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError as exc:
        raise IndexCorruptedError(f"{path}: missing") from exc
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rec = ChunkRecord(int(d["id"]), str(d["doc_id"]), int(d["position"]),
                                  str(d["text"]), dict(d["metadata"]), float(d["added_at"]),
                                  None if d["expires_at"] is None else float(d["expires_at"]))
                term_list = [str(t) for t in d["terms"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise IndexCorruptedError(f"{path}:{lineno}: invalid chunk record ({exc})") \
                    from exc
            yield rec, term_list


def _id_from_file_name(doc_id: str, source: str) -> bool:
    """Whether ``doc_id`` is the one load_documents derives from the file ``source``."""
    name = os.path.basename(source)
    return bool(name) and (doc_id == name or (
        doc_id.startswith(name + ":") and doc_id[len(name) + 1:].isdigit()))


def _matches(rec: ChunkRecord, filters: Mapping[str, Any] | None) -> bool:
    if not filters:
        return True
    for key, want in filters.items():
        have = rec.doc_id if key == "doc_id" else rec.metadata.get(key)
        if isinstance(want, (list, tuple, set, frozenset)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


# -- the store of all indices ----------------------------------------------------------------


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

    ``embedder`` defaults to an :class:`~r3mes.rag.embedder.Embedder` with its cache under
    ``<home>/rag/embedding-cache``. ``configs`` overrides per-index settings for indices that
    have no snapshot yet (a stored index keeps the settings it was built with).

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
    ) -> None:
        self.root = r3mes_home(home) / "rag"
        self.root.mkdir(parents=True, exist_ok=True)
        self._embedder = embedder
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

            self._embedder = Embedder(cache_dir=self.root / "embedding-cache")
        return self._embedder

    @property
    def fingerprint(self) -> str:
        """The embedding model's fingerprint, without loading the model when not loaded yet."""
        if self._embedder is not None:
            return str(self._embedder.fingerprint)
        from r3mes.core.text_encoder import model_fingerprint

        return model_fingerprint(None)

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for a load-modify-save cycle across processes."""
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

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
            self._loaded[name] = self._load_snapshot(name, ref["current"])
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

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        """Snapshots of ``name`` that can be restored, current first."""
        check_index_name(name)
        ref = self._read_ref(name)
        if ref is None:
            return []
        out = []
        for digest in [ref["current"], *ref.get("history", [])]:
            try:
                out.append(_info(self._read_manifest(self.snapshots_dir / digest)))
            except IndexCorruptedError:
                continue
        return out

    def restore(self, name: str, digest: str) -> SnapshotInfo:
        """Verify snapshot ``digest`` (a unique prefix is enough) and make it current."""
        check_index_name(name)
        full = self._resolve_digest(digest)
        loaded = self._load_snapshot(name, full)  # verifies every file before switching
        self._make_current(name, full)
        self._loaded[name] = loaded
        return _info(self._read_manifest(self.snapshots_dir / full))

    def verify(self, name: str) -> SnapshotInfo | None:
        """Load and verify the current snapshot of ``name`` (None when there is none)."""
        ref = self._read_ref(name)
        if ref is None:
            return None
        self._load_snapshot(name, ref["current"])
        return _info(self._read_manifest(self.snapshots_dir / ref["current"]))

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
                m = self._read_manifest(self.snapshots_dir / ref["current"])
                info = _info(m)
                chain = m.get("chain", [])
                base_files = m["files"] if info.kind == "full" else self._read_manifest(
                    self.snapshots_dir / str(m["base"]))["files"]
                row.update(
                    snapshot_kind=info.kind, deltas=info.deltas, base=info.base,
                    documents=info.documents, chunks=info.chunks,
                    kind=m["config"].get("kind"), ttl_s=m["config"].get("ttl_s"),
                    created=info.created, embedding_model=m.get("embedding_model"),
                    disk_bytes=sum(int(e["bytes"]) for e in base_files.values()) + sum(
                        int(e["bytes"]) for c in chain for e in c["files"].values()))
                if verify:
                    self._load_snapshot(name, ref["current"])
            except RagError as exc:
                row["error"] = str(exc)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                row["error"] = f"{name}: invalid manifest ({exc!r})"
            rows.append(row)
        return rows

    # -- export / import -----------------------------------------------------------------

    def export(
        self, name: str, out: str | os.PathLike[str], digest: str | None = None
    ) -> dict[str, Any]:
        """Write snapshot ``digest`` of ``name`` (default: the current one), verified, with
        every snapshot it builds on, to ``out``: a directory, or a tar archive when ``out``
        ends in ``.tar``, ``.tar.gz`` or ``.tgz``. Layout::

            export.json                 {"format", "type", "index", "digest", "snapshots"}
            snapshots/<digest>/...      manifest.json and the files it lists (base first)

        Returns ``{"index", "digest", "snapshots", "path", "format", "bytes"}``.
        """
        check_index_name(name)
        if digest is None:
            ref = self._read_ref(name)
            if ref is None:
                raise RagError(f"index '{name}' has no snapshot to export (add documents first)")
            full = ref["current"]
        else:
            full = self._resolve_digest(digest)
        _, base, chain = self._verify_snapshot(name, full, self.snapshots_dir)
        digests = [base["digest"], *[e["digest"] for e in chain]]
        dest = Path(out)
        fmt = _archive_format(dest)
        if dest.exists() and (fmt != "directory" or not dest.is_dir() or any(dest.iterdir())):
            raise RagError(f"{dest}: already exists; export to a new path")
        if not dest.parent.is_dir():
            raise RagError(f"{dest.parent}: no such directory")
        header = {"format": EXPORT_FORMAT, "type": EXPORT_TYPE, "index": name, "digest": full,
                  "snapshots": digests}
        members = [(f"snapshots/{d}/{f}", self.snapshots_dir / d / f) for d in digests
                   for f in ["manifest.json", *sorted(self._read_manifest(
                       self.snapshots_dir / d)["files"])]]
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
                info.size, info.mtime = len(raw), int(self.clock())
                tar.addfile(info, io.BytesIO(raw))
                for rel, src in members:
                    tar.add(src, arcname=rel, recursive=False)
            size = dest.stat().st_size
        return {"index": name, "digest": full, "snapshots": digests, "path": str(dest),
                "format": fmt, "bytes": size}

    def import_snapshot(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Import an :meth:`export` (directory or tar archive) and make it the current
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
        snaps = self.snapshots_dir
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
                m = self._read_manifest(from_dir)
                (clean / d).mkdir(parents=True)
                for f in ["manifest.json", *m["files"]]:
                    _check_file_name(f, from_dir)
                    if not (from_dir / f).is_file():
                        raise IndexCorruptedError(f"{from_dir / f}: missing from the export")
                    shutil.copyfile(from_dir / f, clean / d / f)
            try:
                manifest, base, chain = self._verify_snapshot(name, head, clean)
                self._load_snapshot(name, head, clean)  # parses every file; checks the model
            except IndexCorruptedError as exc:
                # name the file as the user knows it, not the staging copy
                shown = f"{src}:snapshots" if root != src else str(src / "snapshots")
                raise IndexCorruptedError(
                    f"import refused, nothing was changed: {str(exc).replace(str(clean), shown)}"
                ) from exc
            needed = [base["digest"], *[e["digest"] for e in chain]]
            for d in needed:
                if (snaps / d).is_dir():
                    if _files_match(snaps / d, self._read_manifest(clean / d)["files"]):
                        continue
                    # a damaged local copy of the same snapshot: keep it aside, install ours
                    os.replace(snaps / d, snaps / f".damaged-{d}-{int(self.clock())}")
                os.replace(clean / d, snaps / d)
            _fsync_dir(snaps)
            old = self._read_ref(name, strict=False)
            self._make_current(name, head)
            self._loaded.pop(name, None)
            self._prune()
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        replaced = old["current"] if old is not None and old["current"] != head else None
        return {"imported": _info(manifest), "replaced": replaced, "snapshots": needed}

    # -- internals -----------------------------------------------------------------------

    def _parent_manifest(self, index: NamedIndex) -> dict[str, Any] | None:
        """The manifest of the snapshot ``index`` was loaded from / saved as, if intact."""
        if index.parent is None:
            return None
        try:
            m = self._read_manifest(self.snapshots_dir / index.parent)
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
                manifest = self._read_manifest(final)
            else:
                os.replace(tmp, final)
                _fsync_dir(snaps)
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

    def _read_manifest(self, directory: Path) -> dict[str, Any]:
        path = directory / "manifest.json"
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise IndexCorruptedError(f"{path}: missing (no such snapshot)") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise IndexCorruptedError(f"{path}: not valid JSON ({exc})") from exc
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

    def _verify_snapshot(
        self, name: str, digest: str, snaps: Path
    ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        """Check snapshot ``digest`` of ``name`` under ``snaps``: every file's sha256 and
        size, and every digest (base and each delta of the chain, from the files up).
        Returns ``(manifest, base manifest, chain)``; raises :class:`IndexCorruptedError`."""
        directory = snaps / digest
        manifest = self._read_manifest(directory)
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
        base, _, _ = self._verify_snapshot(name, manifest["base"], snaps)
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

    def _load_snapshot(self, name: str, digest: str, snaps: Path | None = None) -> NamedIndex:
        snaps = self.snapshots_dir if snaps is None else snaps
        manifest, base, chain = self._verify_snapshot(name, digest, snaps)
        directory = snaps / digest
        if manifest.get("embedding_model") != self.fingerprint:
            raise IndexCorruptedError(
                f"{directory}: built with embedding model {manifest.get('embedding_model')}, "
                f"the current model is {self.fingerprint}; re-index the documents")
        try:
            config = IndexConfig.from_dict(base["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptedError(f"{snaps / base['digest']}/manifest.json: invalid config "
                                      f"({exc})") from exc
        index = NamedIndex.read_files(snaps / base["digest"], name, self.embedder, config,
                                      int(base.get("next_id", 0)), self.clock)
        for entry in chain:
            index.apply_delta(snaps / entry["digest"])
        index.next_id = max(index.next_id, int(manifest.get("next_id", 0)))
        index.parent = digest
        index.mark_saved()
        return index

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
                m = self._read_manifest(snaps / digest)
            except IndexCorruptedError:
                return  # what it builds on is unknown: keep everything
            if m["kind"] == "delta":
                keep.add(str(m["base"]))
                keep.update(str(e["digest"]) for e in m["chain"])
        for p in snaps.iterdir():
            if p.is_dir() and not p.name.startswith(".") and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


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
        path = directory / fname
        if not path.is_file():
            raise IndexCorruptedError(f"{path}: missing from snapshot")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise IndexCorruptedError(f"{directory}/manifest.json: invalid entry for {fname}")
        got = _file_entry(path)
        if got != entry:
            raise IndexCorruptedError(
                f"{path}: sha256 mismatch (expected {entry.get('sha256')}, found "
                f"{got['sha256']}); the snapshot is corrupted")


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
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexCorruptedError(f"{path}: missing; not an r3mes index export") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexCorruptedError(f"{path}: not valid JSON ({exc})") from exc
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


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
