"""Named indices and their versioned, content-addressed snapshots.

There are six indices: ``general``, ``news``, ``medical``, ``legal``, ``code`` and ``user``.
``news`` has a time-to-live of 7 days: a news chunk expires 7 days after its document's
``timestamp`` metadata (epoch seconds or ISO 8601), else after it was added; expired chunks are
never returned and :meth:`NamedIndex.purge_expired` (run before every save) removes them.

On disk, under ``<home>/rag/``::

    snapshots/<digest>/      one immutable snapshot of one index
        manifest.json        index name, format, counts, config, model fingerprint, parent,
                             and the sha256 + size of every other file
        index.faiss vectors.npy ids.npy store.json    the dense store (see faiss_store)
        chunks.jsonl         one chunk a line: id, doc, position, text, metadata, times, terms
    refs/<index>.json        {"current": <digest>, "history": [older digests, newest first]}
    embedding-cache/         the embedder's cache (see embedder)

``<digest>`` is the sha256 of the index name and the sorted ``file:sha256`` lines of the
snapshot's files, so a
snapshot is identified by its content and a tampered file is detected on load. A snapshot is
written into a temporary directory, fsynced and renamed into place; only then is the ref
replaced (atomically), so a crash leaves the previous snapshot current and intact. Loading
verifies every digest; a corrupted snapshot is refused with :class:`IndexCorruptedError` and
nothing is changed, so ``restore`` can switch back to an older one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from r3mes.rag.chunker import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP, Chunker, Document
from r3mes.rag.errors import DocumentError, IndexCorruptedError, UnknownIndexError
from r3mes.rag.faiss_store import KINDS, FaissStore
from r3mes.rag.sparse import BM25Index, TokenizerConfig
from r3mes.utils.atomic import atomic_write_bytes, atomic_write_json
from r3mes.utils.paths import r3mes_home

INDEX_NAMES = ("general", "news", "medical", "legal", "code", "user")
DAY_S = 86400.0
DEFAULT_TTL_S: dict[str, float] = {"news": 7 * DAY_S}
SNAPSHOT_FORMAT = 1
DEFAULT_KEEP_SNAPSHOTS = 10

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


def check_index_name(name: str) -> str:
    """``name`` if it is one of :data:`INDEX_NAMES`, else :class:`UnknownIndexError`."""
    if name not in INDEX_NAMES:
        raise UnknownIndexError(
            f"unknown index '{name}' (the indices are: {', '.join(INDEX_NAMES)})")
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

    # -- content -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def add_documents(self, docs: Iterable[Document], now: float | None = None) -> dict[str, int]:
        """Chunk, embed and index ``docs``. A ``doc_id`` already present is replaced (update).

        All documents are validated and chunked before anything changes, so one bad document
        leaves the index as it was. Returns counts: documents, replaced, chunks.
        """
        now = self.clock() if now is None else now
        docs = list(docs)
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
        return {"documents": len(planned), "replaced": replaced, "chunks": len(ids)}

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
        if not filters and (self.config.ttl_s is None or not any(
                r.expired(now) for r in self.records.values())):
            return None
        return {i for i, r in self.records.items()
                if not r.expired(now) and _matches(r, filters)}

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
        files = self.dense.save(directory)
        lines = []
        for i in sorted(self.records):
            r = self.records[i]
            lines.append(json.dumps({
                "id": r.id, "doc_id": r.doc_id, "position": r.position, "text": r.text,
                "metadata": r.metadata, "added_at": r.added_at, "expires_at": r.expires_at,
                "terms": self.sparse.tokens(i),
            }, ensure_ascii=False, sort_keys=True))
        atomic_write_bytes(directory / "chunks.jsonl", ("\n".join(lines) + "\n").encode()
                           if lines else b"")
        return files + ["chunks.jsonl"]

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
        path = directory / "chunks.jsonl"
        ids, terms = [], []
        with open(path, encoding="utf-8") as fh:
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
                index.records[rec.id] = rec
                index.docs.setdefault(rec.doc_id, []).append(rec.id)
                ids.append(rec.id)
                terms.append(term_list)
        if set(ids) != {int(i) for i in store.ids}:
            raise IndexCorruptedError(
                f"{directory}: chunks.jsonl and ids.npy disagree ({len(ids)} vs {len(store)})")
        index.sparse.add_tokens(ids, terms)
        index.next_id = max(next_id, max(ids, default=-1) + 1)
        return index


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
    """A snapshot as listed: digest, index, creation time, counts, parent digest."""

    digest: str
    index: str
    created: float
    documents: int
    chunks: int
    parent: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "index": self.index, "created": self.created,
                "documents": self.documents, "chunks": self.chunks, "parent": self.parent}


class RagStore:
    """All named indices under ``<home>/rag``: load, save as snapshot, list, restore.

    ``embedder`` defaults to an :class:`~r3mes.rag.embedder.Embedder` with its cache under
    ``<home>/rag/embedding-cache``. ``configs`` overrides per-index settings for indices that
    have no snapshot yet (a stored index keeps the settings it was built with).
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        embedder: Any = None,
        configs: Mapping[str, IndexConfig] | None = None,
        clock: Callable[[], float] = time.time,
        keep_snapshots: int = DEFAULT_KEEP_SNAPSHOTS,
    ) -> None:
        self.root = r3mes_home(home) / "rag"
        self.root.mkdir(parents=True, exist_ok=True)
        self._embedder = embedder
        self.configs = dict(configs or {})
        self.clock = clock
        self.keep_snapshots = max(1, keep_snapshots)
        self._loaded: dict[str, NamedIndex] = {}

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from r3mes.rag.embedder import Embedder

            self._embedder = Embedder(cache_dir=self.root / "embedding-cache")
        return self._embedder

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
        """The index ``name``: its current snapshot, loaded and verified once, or a new one."""
        check_index_name(name)
        if name not in self._loaded:
            ref = self._read_ref(name)
            if ref is None:
                cfg = self.configs.get(name) or IndexConfig.for_index(name)
                self._loaded[name] = NamedIndex(name, self.embedder, cfg, self.clock)
            else:
                self._loaded[name] = self._load_snapshot(name, ref["current"])
        return self._loaded[name]

    def existing(self) -> list[str]:
        """Names of the indices that have a saved snapshot or unsaved content."""
        return [n for n in INDEX_NAMES if (self.root / "refs" / f"{n}.json").exists()
                or (n in self._loaded and len(self._loaded[n]))]

    # -- snapshots -----------------------------------------------------------------------

    def save(self, name: str) -> SnapshotInfo:
        """Purge expired chunks, write the index as a snapshot and make it current."""
        index = self.index(name)
        index.purge_expired()
        snaps = self.root / "snapshots"
        snaps.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=snaps))
        try:
            files = index.write_files(tmp)
            entries = {f: _file_entry(tmp / f) for f in sorted(files)}
            digest = _snapshot_digest(name, entries)
            created = self.clock()
            manifest = {
                "format": SNAPSHOT_FORMAT, "digest": digest, "index": name, "created": created,
                "parent": index.parent, "files": entries, "config": index.config.to_dict(),
                "next_id": index.next_id, "embedding_model": index.embedder.fingerprint,
                "dim": index.embedder.dim,
                "counts": {"documents": len(index.docs), "chunks": len(index.records)},
            }
            atomic_write_json(tmp / "manifest.json", manifest)
            final = snaps / digest
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
        old = self._read_ref(name, strict=False)
        history = []
        if old is not None:
            history = [d for d in [old["current"], *old.get("history", [])] if d != digest]
        self._write_ref(name, digest, history[: self.keep_snapshots - 1])
        index.parent = digest
        self._prune()
        return _info(manifest)

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        """Snapshots of ``name`` that can be restored, current first."""
        check_index_name(name)
        ref = self._read_ref(name)
        if ref is None:
            return []
        out = []
        for digest in [ref["current"], *ref.get("history", [])]:
            try:
                out.append(_info(self._read_manifest(self.root / "snapshots" / digest)))
            except IndexCorruptedError:
                continue
        return out

    def restore(self, name: str, digest: str) -> SnapshotInfo:
        """Verify snapshot ``digest`` (a unique prefix is enough) and make it current."""
        check_index_name(name)
        full = self._resolve_digest(digest)
        loaded = self._load_snapshot(name, full)  # verifies every file before switching
        old = self._read_ref(name, strict=False)
        history = []
        if old is not None:
            history = [d for d in [old["current"], *old.get("history", [])] if d != full]
        self._write_ref(name, full, history[: self.keep_snapshots - 1])
        self._loaded[name] = loaded
        return _info(self._read_manifest(self.root / "snapshots" / full))

    def verify(self, name: str) -> SnapshotInfo | None:
        """Load and verify the current snapshot of ``name`` (None when there is none)."""
        ref = self._read_ref(name)
        if ref is None:
            return None
        self._load_snapshot(name, ref["current"])
        return _info(self._read_manifest(self.root / "snapshots" / ref["current"]))

    # -- internals -----------------------------------------------------------------------

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
                f"{path}: unreadable index reference ({exc}); run `r3mes rag list` and "
                f"`r3mes rag restore {name} DIGEST` to pick a snapshot") from exc

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
            if m["format"] != SNAPSHOT_FORMAT:
                raise ValueError(f"unsupported format {m['format']!r}")
            for key in ("digest", "index", "files", "config", "counts", "created"):
                m[key]  # noqa: B018 - presence check
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptedError(f"{path}: invalid manifest ({exc})") from exc
        return m

    def _load_snapshot(self, name: str, digest: str) -> NamedIndex:
        directory = self.root / "snapshots" / digest
        manifest = self._read_manifest(directory)
        if manifest["index"] != name:
            raise IndexCorruptedError(
                f"{directory}: snapshot belongs to index '{manifest['index']}', not '{name}'")
        entries = manifest["files"]
        for fname, entry in entries.items():
            got = _file_entry(directory / fname) if (directory / fname).is_file() else None
            if got is None:
                raise IndexCorruptedError(f"{directory / fname}: missing from snapshot")
            if got != entry:
                raise IndexCorruptedError(
                    f"{directory / fname}: sha256 mismatch (expected {entry.get('sha256')}, "
                    f"found {got['sha256']}); the snapshot is corrupted")
        if _snapshot_digest(name, entries) != digest or manifest["digest"] != digest:
            raise IndexCorruptedError(f"{directory}: manifest digest does not match the snapshot")
        if manifest.get("embedding_model") != self.embedder.fingerprint:
            raise IndexCorruptedError(
                f"{directory}: built with embedding model {manifest.get('embedding_model')}, "
                f"the current model is {self.embedder.fingerprint}; re-index the documents")
        try:
            config = IndexConfig.from_dict(manifest["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptedError(f"{directory}/manifest.json: invalid config ({exc})") \
                from exc
        index = NamedIndex.read_files(directory, name, self.embedder, config,
                                      int(manifest.get("next_id", 0)), self.clock)
        index.parent = digest
        return index

    def _resolve_digest(self, prefix: str) -> str:
        snaps = self.root / "snapshots"
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
        """Delete snapshot directories no ref mentions (beyond each ref's history)."""
        keep: set[str] = set()
        for n in INDEX_NAMES:
            ref = self._read_ref(n, strict=False)
            if ref is None and self._ref_path(n).exists():
                return  # an unreadable ref: keep everything so nothing it needed is lost
            if ref is not None:
                keep.update([ref["current"], *ref.get("history", [])])
        snaps = self.root / "snapshots"
        for p in snaps.iterdir():
            if p.is_dir() and not p.name.startswith(".") and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _file_entry(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def _snapshot_digest(index: str, entries: Mapping[str, Mapping[str, Any]]) -> str:
    h = hashlib.sha256(f"r3mes-rag-snapshot/{SNAPSHOT_FORMAT}/{index}\n".encode())
    for name in sorted(entries):
        h.update(f"{name}:{entries[name]['sha256']}\n".encode())
    return h.hexdigest()


def _info(m: Mapping[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(m["digest"], m["index"], float(m["created"]),
                        int(m["counts"]["documents"]), int(m["counts"]["chunks"]), m.get("parent"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
