"""Named indices: one index's chunks, dense vectors (FAISS) and BM25 terms, kept in step.

Six indices exist by default: ``general``, ``news``, ``medical``, ``legal``, ``code`` and
``user``; any other valid name (:func:`check_index_name`) makes a new index on first use.
``news`` has a time-to-live of 7 days: a news chunk expires 7 days after its document's
``timestamp`` metadata (epoch seconds or ISO 8601), else after it was added; expired chunks are
never returned and :meth:`NamedIndex.purge_expired` (run before every save) removes them.

A :class:`NamedIndex` writes and reads the files of one snapshot (``chunks.jsonl`` and the
dense store's files, or a delta's ``added.jsonl``, ``added-vectors.npy`` and ``deleted.npy``);
:mod:`r3mes.rag.snapshots` makes those files content-addressed, versioned snapshots.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from r3mes.rag.chunker import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP, Chunker, Document
from r3mes.rag.errors import DocumentError, IndexCorruptedError, UnknownIndexError
from r3mes.rag.faiss_store import KINDS, FaissStore, npy_bytes, read_npy
from r3mes.rag.sparse import BM25Index, TokenizerConfig
from r3mes.utils.atomic import atomic_write_bytes

__all__ = [
    "DAY_S", "DEFAULT_TTL_S", "DOMAIN_TO_INDEX", "INDEX_NAMES", "ChunkRecord", "IndexConfig",
    "NamedIndex", "check_index_name", "parse_timestamp", "route_domain",
]

INDEX_NAMES = ("general", "news", "medical", "legal", "code", "user")
DAY_S = 86400.0
DEFAULT_TTL_S: dict[str, float] = {"news": 7 * DAY_S}

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


def check_fusion(dense_weight: float | None, rrf_k: int | None) -> None:
    """The hybrid-fusion settings an index or a retriever may set (None: not set)."""
    if dense_weight is not None and not 0.0 <= dense_weight <= 1.0:
        raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
    if rrf_k is not None and rrf_k < 0:
        raise ValueError(f"RRF k must be non-negative, got {rrf_k}")


@dataclass
class IndexConfig:
    """Per-index settings, stored in every snapshot manifest.

    ``dense_weight`` and ``rrf_k`` set how hybrid search fuses this index's dense and BM25
    rankings (weighted Reciprocal Rank Fusion, :mod:`r3mes.rag.retriever`); ``None`` takes
    the default fitted for the index's embedding model."""

    kind: str = "flat"
    max_tokens: int = DEFAULT_MAX_TOKENS
    overlap: int = DEFAULT_OVERLAP
    ttl_s: float | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    store_params: dict[str, Any] = field(default_factory=dict)
    dense_weight: float | None = None
    rrf_k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind '{self.kind}' (choose one of {KINDS})")
        check_fusion(self.dense_weight, self.rrf_k)

    @classmethod
    def for_index(cls, name: str, **overrides: Any) -> IndexConfig:
        overrides.setdefault("ttl_s", DEFAULT_TTL_S.get(name))
        return cls(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_tokens": self.max_tokens, "overlap": self.overlap,
                "ttl_s": self.ttl_s, "tokenizer": self.tokenizer.to_dict(),
                "store_params": self.store_params, "dense_weight": self.dense_weight,
                "rrf_k": self.rrf_k}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IndexConfig:
        return cls(kind=d["kind"], max_tokens=int(d["max_tokens"]), overlap=int(d["overlap"]),
                   ttl_s=d.get("ttl_s"), tokenizer=TokenizerConfig(**d["tokenizer"]),
                   store_params=dict(d.get("store_params", {})),
                   dense_weight=None if d.get("dense_weight") is None
                   else float(d["dense_weight"]),
                   rrf_k=None if d.get("rrf_k") is None else int(d["rrf_k"]))


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
