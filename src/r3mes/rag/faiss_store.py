"""Dense vector store on FAISS: exact by default, HNSW or IVF-PQ when asked.

The store owns the canonical vectors (``float32``, unit norm) and their int64 ids; the FAISS
index is a search structure built from them, so it can always be rebuilt, trained later, or
checked against exact search. Kinds:

- ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact inner product (cosine on unit vectors).
- ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``; HNSW cannot remove vectors, so a deleted id stays
  in the graph as a tombstone that searches skip (a FAISS ``IDSelector``); the graph is rebuilt
  only once tombstones pass :data:`HNSW_TOMBSTONE_FRACTION` of it, or when it is saved.
- ``ivfpq``: ``IndexIDMap2(IndexIVFPQ)`` with exact re-ranking of ``refine x k`` candidates
  from the stored vectors. It needs training data, so until the store holds ``ivf_min_train``
  vectors it searches exactly (``active_kind`` says which is in use) and trains itself the first
  time it is large enough. ``nlist`` defaults to ~4 sqrt(n) lists, ``nprobe`` to a quarter of
  them.

``save(dir)`` writes ``index.faiss`` (``faiss.serialize_index``), ``vectors.npy``, ``ids.npy``
and ``store.json`` (parameters + per-id metadata), each atomically; ``load(dir)`` maps the
vectors read-only (``np.load(mmap_mode="r")``) and refuses inconsistent or corrupted files with
:class:`IndexCorruptedError` naming the file.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r3mes.rag.errors import IndexCorruptedError
from r3mes.utils.atomic import atomic_write_bytes, atomic_write_json

KINDS = ("flat", "hnsw", "ivfpq")
STORE_FORMAT = 1
# Deleted HNSW vectors are skipped at search time until they are this share of the graph; past
# it, searching through the dead nodes costs more than rebuilding once.
HNSW_TOMBSTONE_FRACTION = 0.2


def _faiss():
    import faiss

    return faiss


class FaissStore:
    """Vectors with int64 ids and optional JSON metadata, searchable by inner product."""

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        ivf_min_train: int = 4096,
        pq_m: int | None = None,
        nprobe: int | None = None,
        refine: int = 8,
        nlist: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind '{kind}' (choose one of {', '.join(KINDS)})")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.kind = kind
        self.params: dict[str, Any] = {
            "hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
            "ivf_min_train": ivf_min_train, "pq_m": pq_m, "nprobe": nprobe, "refine": refine,
            "nlist": nlist,
        }
        self._vecs = np.empty((0, dim), dtype=np.float32)
        self._ids = np.empty((0,), dtype=np.int64)
        self._pos: dict[int, int] = {}
        self.metadata: dict[int, dict[str, Any]] = {}
        self._index = None
        self._stale = True
        self._trained_kind: str | None = None  # what the built index actually is
        self._tombstones: set[int] = set()  # ids removed from the store, still in the HNSW graph
        self._search_params = None  # FAISS search parameters skipping the tombstones

    # -- size and state ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item: int) -> bool:
        return int(item) in self._pos

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    @property
    def vectors(self) -> np.ndarray:
        return self._vecs

    @property
    def active_kind(self) -> str:
        """The structure searches use now: ``ivfpq`` stays ``flat`` until it is trained."""
        if self.kind == "ivfpq" and len(self) < self.params["ivf_min_train"]:
            return "flat"
        return self.kind

    # -- mutation ------------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Add vectors; an id already present is replaced (update)."""
        ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vecs.shape}")
        if len(ids_arr) != len(vecs):
            raise ValueError(f"{len(ids_arr)} ids for {len(vecs)} vectors")
        if len(np.unique(ids_arr)) != len(ids_arr):
            raise ValueError("duplicate ids in one add() call")
        if not np.all(np.isfinite(vecs)):
            raise ValueError("vectors contain NaN or infinity")
        if metadata is not None and len(metadata) != len(ids_arr):
            raise ValueError(f"{len(metadata)} metadata entries for {len(ids_arr)} vectors")
        present = [int(i) for i in ids_arr if int(i) in self._pos]
        if present:
            self.remove(present)
        base = len(self._ids)
        self._vecs = np.concatenate([np.asarray(self._vecs), vecs])
        self._ids = np.concatenate([np.asarray(self._ids), ids_arr])
        for off, i in enumerate(ids_arr):
            self._pos[int(i)] = base + off
        if metadata is not None:
            for i, meta in zip(ids_arr, metadata, strict=True):
                if meta is not None:
                    self.metadata[int(i)] = dict(meta)
        if self._index is not None and not self._stale and \
                self._trained_kind == self.active_kind and \
                not self._tombstones.intersection(int(i) for i in ids_arr):
            self._index.add_with_ids(vecs, ids_arr)
        else:  # (re-adding a tombstoned id would leave two graph nodes with that id)
            self._stale = True

    def remove(self, ids: Iterable[int]) -> int:
        """Remove ids that are present; returns how many were removed."""
        gone = sorted({int(i) for i in ids if int(i) in self._pos})
        if not gone:
            return 0
        rows = np.array([self._pos[i] for i in gone], dtype=np.int64)
        keep = np.ones(len(self._ids), dtype=bool)
        keep[rows] = False
        self._vecs = np.asarray(self._vecs)[keep]
        self._ids = np.asarray(self._ids)[keep]
        self._pos = {int(i): r for r, i in enumerate(self._ids)}
        for i in gone:
            self.metadata.pop(i, None)
        if self._index is not None and not self._stale and self._trained_kind == "hnsw":
            self._tombstones.update(gone)
            self._search_params = None
            if len(self._tombstones) > HNSW_TOMBSTONE_FRACTION * max(1, self._index.ntotal):
                self._stale = True
        elif self._index is not None and not self._stale:
            self._index.remove_ids(np.array(gone, dtype=np.int64))
        else:
            self._stale = True
        if self.active_kind != self._trained_kind:
            self._stale = True
        return len(gone)

    # -- search --------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: Iterable[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, ids)``, each ``(n_queries, k)``; missing slots have id -1.

        With ``allowed_ids`` the search is exact over just those ids (a metadata filter).
        """
        q = self._queries(queries)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if allowed_ids is not None:
            rows = np.array(sorted(self._pos[int(i)] for i in allowed_ids if int(i) in self._pos),
                            dtype=np.int64)
            return _exact_topk(np.asarray(self._vecs)[rows] if len(rows) else
                               np.empty((0, self.dim), np.float32),
                               self._ids[rows] if len(rows) else np.empty(0, np.int64), q, k)
        if len(self) == 0:
            return (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        index = self._ensure_index()
        if self._trained_kind == "ivfpq":
            n_cand = min(len(self), k * max(1, int(self.params["refine"])))
            _, cand = index.search(q, n_cand)
            return self._rerank(q, cand, k)
        if self._tombstones:
            scores, found = index.search(q, min(k, len(self)), params=self._skip_tombstones())
        else:
            scores, found = index.search(q, min(k, len(self)))
        return _pad(scores, found, k)

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` over the stored vectors (the ground truth)."""
        return _exact_topk(np.asarray(self._vecs), self._ids, self._queries(queries), k)

    def get_vector(self, id_: int) -> np.ndarray:
        return np.array(self._vecs[self._pos[int(id_)]])

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """``(len(ids), dim)`` float32 copy of the stored vectors of ``ids``, in order."""
        rows = np.array([self._pos[int(i)] for i in ids], dtype=np.int64)
        if not len(rows):
            return np.empty((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.asarray(self._vecs)[rows])

    # -- persistence ---------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the store into ``directory``; returns the file names written."""
        faiss = _faiss()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self._tombstones:
            self._stale = True  # the file must hold exactly the stored vectors
        index = self._ensure_index() if len(self) else None
        if index is not None:
            atomic_write_bytes(d / "index.faiss", faiss.serialize_index(index).tobytes())
        atomic_write_bytes(d / "vectors.npy", npy_bytes(np.asarray(self._vecs)))
        atomic_write_bytes(d / "ids.npy", npy_bytes(np.asarray(self._ids)))
        atomic_write_json(d / "store.json", {
            "format": STORE_FORMAT, "dim": self.dim, "kind": self.kind,
            "built_kind": self._trained_kind if index is not None else None,
            "params": self.params, "count": len(self),
            "metadata": {str(i): m for i, m in self.metadata.items()},
        })
        return (["index.faiss"] if index is not None else []) + \
            ["vectors.npy", "ids.npy", "store.json"]

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = True) -> FaissStore:
        """Read a saved store; vectors are memory-mapped read-only when ``mmap``."""
        d = Path(directory)
        cfg = _read_json(d / "store.json")
        try:
            if cfg.get("format") != STORE_FORMAT:
                raise ValueError(f"unsupported format {cfg.get('format')!r}")
            store = cls(int(cfg["dim"]), cfg["kind"], **cfg["params"])
            count = int(cfg["count"])
            metadata = {int(k): v for k, v in cfg.get("metadata", {}).items()}
            built_kind = cfg.get("built_kind")
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptedError(f"{d / 'store.json'}: invalid store description ({exc})") \
                from exc
        vecs = read_npy(d / "vectors.npy", mmap)
        ids = read_npy(d / "ids.npy", False)
        if vecs.dtype != np.float32 or vecs.ndim != 2 or vecs.shape != (count, store.dim):
            raise IndexCorruptedError(
                f"{d / 'vectors.npy'}: expected float32 ({count}, {store.dim}), got "
                f"{vecs.dtype} {vecs.shape}")
        if ids.dtype != np.int64 or ids.shape != (count,) or len(np.unique(ids)) != count:
            raise IndexCorruptedError(f"{d / 'ids.npy'}: expected {count} unique int64 ids")
        store._vecs, store._ids = vecs, ids
        store._pos = {int(i): r for r, i in enumerate(ids)}
        store.metadata = metadata
        if count:
            index_file = d / "index.faiss"
            try:
                raw = np.fromfile(index_file, dtype=np.uint8)
                index = _faiss().deserialize_index(raw)
            except FileNotFoundError as exc:
                raise IndexCorruptedError(f"{index_file}: missing") from exc
            except Exception as exc:  # FAISS raises RuntimeError with C++ text
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
                raise IndexCorruptedError(f"{index_file}: not a readable FAISS index ({first})") \
                    from exc
            if index.ntotal != count or index.d != store.dim:
                raise IndexCorruptedError(
                    f"{index_file}: holds {index.ntotal} vectors of dim {index.d}, expected "
                    f"{count} of dim {store.dim}")
            store._index, store._trained_kind, store._stale = index, built_kind, False
            store._apply_search_params()
        return store

    # -- internals -----------------------------------------------------------------------

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {q.shape}")
        return q

    def _ensure_index(self):
        if self._index is not None and not self._stale:
            return self._index
        self._index = self._build(self.active_kind)
        self._trained_kind = self.active_kind
        self._stale = False
        return self._index

    def _skip_tombstones(self):
        if self._search_params is None:
            faiss = _faiss()
            dead = np.array(sorted(self._tombstones), dtype=np.int64)
            params = faiss.SearchParametersHNSW()
            # the selector objects must outlive the parameters that point at them
            params._batch = faiss.IDSelectorBatch(dead)
            params._not = faiss.IDSelectorNot(params._batch)
            params.sel = params._not
            params.efSearch = int(self.params["ef_search"])
            self._search_params = params
        return self._search_params

    def _build(self, kind: str):
        faiss = _faiss()
        p = self.params
        self._tombstones = set()
        self._search_params = None
        vecs = np.ascontiguousarray(np.asarray(self._vecs))
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, int(p["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = int(p["ef_construction"])
        else:
            return self._build_ivfpq(vecs)
        # faiss's Python constructors keep references to the inner index.
        index = faiss.IndexIDMap2(inner)
        if len(vecs):
            index.add_with_ids(vecs, np.asarray(self._ids))
        self._index = index
        self._apply_search_params()
        return index

    def _build_ivfpq(self, vecs: np.ndarray):
        faiss = _faiss()
        p = self.params
        n = len(vecs)
        # ~4 sqrt(n) lists, but at least 39 training points per list (FAISS's guidance), and
        # codebooks of 2^nbits centroids that the data can train (<= 8 bits).
        # ``nlist`` (when given) trades recall for a cheaper k-means, e.g. at a million vectors.
        nlist = max(1, min(int(p.get("nlist") or 4 * math.sqrt(n)), n // 39))
        nbits = int(max(4, min(8, math.floor(math.log2(max(16, n // 39))))))
        pq_m = p["pq_m"] or _default_pq_m(self.dim)
        quantizer = faiss.IndexFlatIP(self.dim)
        # IVF takes external ids itself; wrapping it in IndexIDMap2 would break remove_ids
        # (IDMap compacts its id table as if the inner index renumbered, which IVF does not).
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, pq_m, nbits,
                                 faiss.METRIC_INNER_PRODUCT)
        # Training cost grows with the sample; 64 points a centroid is plenty.
        limit = max(nlist, 2**nbits) * 64
        sample = vecs if n <= limit else vecs[np.random.default_rng(0).choice(n, limit, False)]
        index.cp.min_points_per_centroid = 1  # silence FAISS's "please provide" warnings
        index.pq.cp.min_points_per_centroid = 1
        index.train(np.ascontiguousarray(sample))
        index.add_with_ids(vecs, np.asarray(self._ids))
        self._index = index
        self._apply_search_params()
        return index

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        if self._index is None:
            return
        inner = self._index
        if isinstance(inner, faiss.IndexIDMap):
            inner = faiss.downcast_index(inner.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = int(self.params["ef_search"])
            self._search_params = None
        elif isinstance(inner, faiss.IndexIVF):
            nprobe = self.params["nprobe"] or max(8, inner.nlist // 4)
            inner.nprobe = min(int(nprobe), inner.nlist)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        vecs = np.asarray(self._vecs)
        for r in range(len(q)):
            c = cand[r][cand[r] >= 0]
            if not len(c):
                continue
            rows = np.array([self._pos[int(i)] for i in c], dtype=np.int64)
            s = vecs[rows] @ q[r]
            order = np.argsort(-s, kind="stable")[:k]
            out_s[r, :len(order)] = s[order]
            out_i[r, :len(order)] = c[order]
        return out_s, out_i


def recall_at_k(store: FaissStore, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-``k`` that the store's index search also returns.

    1.0 for ``flat``; the measure of how much an HNSW / IVF-PQ index gives up.
    """
    _, approx = store.search(queries, k)
    _, exact = store.exact_search(queries, k)
    total = 0.0
    for a, e in zip(approx, exact, strict=True):
        truth = {int(x) for x in e if x >= 0}
        if truth:
            total += len(truth & {int(x) for x in a if x >= 0}) / len(truth)
    return total / max(1, len(exact))


def _exact_topk(vecs: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    if len(vecs) == 0:
        return out_s, out_i
    scores = q @ vecs.T
    kk = min(k, len(vecs))
    for r in range(len(q)):
        part = np.argpartition(-scores[r], kk - 1)[:kk] if kk < len(vecs) else \
            np.arange(len(vecs))
        order = part[np.argsort(-scores[r][part], kind="stable")]
        out_s[r, :kk] = scores[r][order]
        out_i[r, :kk] = ids[order]
    return out_s, out_i


def _pad(scores: np.ndarray, ids: np.ndarray, k: int):
    if scores.shape[1] == k:
        return scores, ids
    n = len(scores)
    s = np.full((n, k), -np.inf, dtype=np.float32)
    i = np.full((n, k), -1, dtype=np.int64)
    s[:, :scores.shape[1]] = scores
    i[:, :ids.shape[1]] = ids
    return s, i


def _default_pq_m(dim: int) -> int:
    # 16 dimensions per sub-quantiser (24 bytes a 384-d vector) trains fast; exact re-ranking
    # of the candidates recovers the precision; fall back to any divisor.
    for m in (dim // 16, dim // 8, dim // 4, dim // 2, dim):
        if m > 0 and dim % m == 0:
            return m
    return 1


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as ``.npy`` file bytes (``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array (never pickled objects); a bad file is :class:`IndexCorruptedError`."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as exc:
        raise IndexCorruptedError(f"{path}: missing") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise IndexCorruptedError(f"{path}: not a readable .npy array ({exc})") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexCorruptedError(f"{path}: missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCorruptedError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise IndexCorruptedError(f"{path}: expected a JSON object")
    return obj
