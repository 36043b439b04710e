"""Stage 2 of routing: sentence-embedding similarity to each expert's representative queries.

The query is embedded with the router's sentence encoder (:mod:`r3mes.router.encoders`: the
bundled multilingual-e5-small by default, MiniLM or a local sentence-transformers directory
by name) and compared by cosine similarity with every representative query of every
expert. :meth:`SemanticRouter.similarities` is the *maximum* over an expert's queries
(max-pooling, as the seed says), so one close example is enough and a broad expert is not
diluted by its other examples; :meth:`SemanticRouter.features` adds the mean of the closest
3 and 8 examples and the similarity to the expert's centroid, which the calibrated fusion
(:mod:`r3mes.router.calibration`) weighs.

Expert embeddings are computed once (``r3mes experts embed``) and stored as a pair of files,
``expert_embeddings-<model>.npy`` (float32, L2-normalised rows, loaded with
``allow_pickle=False``) and ``expert_embeddings-<model>.json`` (which experts own which rows,
the registry digest, the model fingerprint and the ``.npy``'s sha256). A pair whose registry
digest, model fingerprint, shape or checksum does not match is *stale* and rebuilt. The
package ships the pair for the default registry and model; anything else is built into
``$R3MES_HOME/router/`` on first use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r3mes.core.text_encoder import DEFAULT_MODEL, resolve_model_path
from r3mes.router.encoders import E5Encoder, encoder_slug, load_encoder
from r3mes.router.registry import ExpertRegistry, resolve_registry
from r3mes.utils.atomic import atomic_write_bytes, atomic_write_json
from r3mes.utils.paths import r3mes_home

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = 1
PACKAGED_DIR = Path(__file__).with_name("data")
#: names of the per-expert columns of :meth:`SemanticRouter.features`
FEATURE_NAMES = ("max", "top3", "top8", "centroid")


def model_slug(model_name: str | None) -> str:
    """File-name-safe identity of a sentence-transformers model name: MiniLM keeps its
    name, a local path becomes its directory name plus a short hash of the full path."""
    if model_name in (None, DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        return DEFAULT_MODEL
    path = str(resolve_model_path(model_name).resolve())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).name)[:48] or "model"
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


def embedding_paths(directory: str | Path, model_name: str | None) -> tuple[Path, Path]:
    """``(npy, json)`` paths of the expert-embedding pair for ``model_name`` in ``directory``."""
    return _paths_for_slug(directory, encoder_slug(model_name))


def _paths_for_slug(directory: str | Path, slug: str) -> tuple[Path, Path]:
    stem = Path(directory) / f"expert_embeddings-{slug}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def home_embeddings_dir(home: str | Path | None = None) -> Path:
    """Where embeddings for custom registries or models are built: ``<home>/router``."""
    return r3mes_home(home) / "router"


@dataclass(frozen=True)
class ExpertEmbeddings:
    """Representative-query embeddings of every expert of a registry file.

    ``matrix`` is ``(sum(counts), dim)`` float32 with unit rows; expert ``expert_ids[i]``
    owns the next ``counts[i]`` rows.
    """

    matrix: np.ndarray
    expert_ids: tuple[str, ...]
    counts: tuple[int, ...]
    registry_sha256: str
    model: str
    model_fingerprint: str

    def rows_of(self, expert_id: str) -> slice:
        start = sum(self.counts[: self.expert_ids.index(expert_id)])
        return slice(start, start + self.counts[self.expert_ids.index(expert_id)])

    def metadata(self, npy_sha256: str) -> dict[str, Any]:
        return {
            "format": EMBEDDINGS_FORMAT,
            "registry_sha256": self.registry_sha256,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "dim": int(self.matrix.shape[1]),
            "rows": int(self.matrix.shape[0]),
            "expert_ids": list(self.expert_ids),
            "counts": list(self.counts),
            "npy_sha256": npy_sha256,
        }


def build_embeddings(registry: ExpertRegistry, model_name: str | None = None) -> ExpertEmbeddings:
    """Embed every representative query of every expert in the registry *file*."""
    experts = registry.universe
    texts = [q for e in experts for q in e.queries]
    encoder = load_encoder(model_name)
    matrix = encoder.encode(texts)
    return ExpertEmbeddings(
        matrix=np.ascontiguousarray(matrix, dtype=np.float32),
        expert_ids=tuple(e.id for e in experts),
        counts=tuple(len(e.queries) for e in experts),
        registry_sha256=registry.digest,
        model=encoder.slug,
        model_fingerprint=encoder.fingerprint(),
    )


def save_embeddings(embeddings: ExpertEmbeddings, directory: str | Path) -> tuple[Path, Path]:
    """Write the ``.npy`` then its ``.json`` (the commit marker, with the ``.npy``'s sha256),
    each atomically. Returns the two paths."""
    npy_path, json_path = _paths_for_slug(directory, embeddings.model)
    buffer = io.BytesIO()
    np.save(buffer, embeddings.matrix, allow_pickle=False)
    data = buffer.getvalue()
    atomic_write_bytes(npy_path, data)
    atomic_write_json(json_path, embeddings.metadata(hashlib.sha256(data).hexdigest()))
    return npy_path, json_path


def read_embeddings(
    directory: str | Path, registry: ExpertRegistry, model_name: str | None = None
) -> tuple[ExpertEmbeddings | None, str]:
    """Load the stored pair for ``registry`` and ``model_name`` from ``directory``.

    Returns ``(embeddings, "ok")`` or ``(None, reason)`` where reason says why the pair is
    missing or stale (registry changed, model changed, checksum or shape mismatch,
    unreadable file). Never raises for a bad file: a bad file is a file to rebuild.
    """
    npy_path, json_path = embedding_paths(directory, model_name)
    if not json_path.is_file() or not npy_path.is_file():
        return None, f"missing ({npy_path.name})"
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        data = npy_path.read_bytes()
    except (OSError, ValueError) as exc:
        return None, f"unreadable metadata {json_path}: {exc}"
    if not isinstance(meta, dict) or meta.get("format") != EMBEDDINGS_FORMAT:
        return None, f"{json_path}: unknown format"
    if meta.get("registry_sha256") != registry.digest:
        return None, f"{json_path}: stale, built for another registry"
    fingerprint = load_encoder(model_name).fingerprint()
    if meta.get("model_fingerprint") != fingerprint:
        return None, f"{json_path}: stale, built with another model"
    if meta.get("npy_sha256") != hashlib.sha256(data).hexdigest():
        return None, f"{npy_path}: checksum mismatch"
    try:
        matrix = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        return None, f"{npy_path}: not a valid .npy file ({exc})"
    ids = tuple(meta.get("expert_ids") or ())
    counts = tuple(int(c) for c in meta.get("counts") or ())
    expected_ids = tuple(e.id for e in registry.universe)
    expected_counts = tuple(len(e.queries) for e in registry.universe)
    if ids != expected_ids or counts != expected_counts:
        return None, f"{json_path}: experts or query counts differ from the registry"
    if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != sum(counts):
        return None, f"{npy_path}: shape {matrix.shape} / dtype {matrix.dtype} do not match"
    return (
        ExpertEmbeddings(matrix, ids, counts, registry.digest, str(meta["model"]), fingerprint),
        "ok",
    )


def load_or_build_embeddings(
    registry: ExpertRegistry,
    model_name: str | None = None,
    home: str | Path | None = None,
    *,
    rebuild: bool = False,
) -> tuple[ExpertEmbeddings, str]:
    """Expert embeddings for ``registry`` and ``model_name`` and where they came from:
    ``"packaged"``, ``"cached"`` (``<home>/router``) or ``"built"`` (computed now and
    written to ``<home>/router``, replacing a stale pair)."""
    if not rebuild:
        found, _ = read_embeddings(PACKAGED_DIR, registry, model_name)
        if found is not None:
            return found, "packaged"
    directory = home_embeddings_dir(home)
    if not rebuild:
        found, reason = read_embeddings(directory, registry, model_name)
        if found is not None:
            return found, "cached"
        log.info("rebuilding expert embeddings: %s", reason)
    built = build_embeddings(registry, model_name)
    try:
        save_embeddings(built, directory)
    except OSError as exc:  # a read-only home costs a rebuild next time, nothing else
        log.warning("could not store expert embeddings in %s: %s", directory, exc)
    return built, "built"


class SemanticRouter:
    """Scores experts by their representative queries' cosine similarity to the query.

    The sentence encoder and the embeddings are loaded on first use (:meth:`load`), so a
    router whose queries all take the keyword fast path never loads them.
    """

    def __init__(
        self,
        registry: ExpertRegistry | str | None = None,
        *,
        expert_ids: Sequence[str] | None = None,
        model_name: str | None = None,
        home: str | Path | None = None,
        max_chars: int = 4096,
        torch_threads: int | None = None,
    ) -> None:
        self.registry = resolve_registry(registry, expert_ids)
        # One short query is a tiny matrix: intra-op threads cost more in hand-off than they
        # save (measured 10 ms with 1 thread against 70-130 ms with 2 on a loaded 2-core
        # machine), but torch's thread count is process-wide, so changing it while the
        # pipeline runs inference on another thread would race: opt in only when the router
        # runs alone. None (the default) leaves torch's setting alone. Only the
        # sentence-transformers encoders use torch; the default e5 engine does not.
        self.torch_threads = torch_threads
        self.model_name = model_name
        self.home = home
        self.max_chars = max_chars
        self.embeddings_source: str | None = None
        self._encoder: Any = None
        self._matrix: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._centroids: np.ndarray | None = None
        # [experts, most examples]: each expert's rows of _matrix, padded with the index of
        # a -inf similarity appended per query (so features() needs no loop per expert).
        self._example_rows: np.ndarray | None = None
        self._example_counts: np.ndarray | None = None

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def encoder_slug(self) -> str:
        """Identity of the encoder this router uses (names its stored files)."""
        return self._encoder.slug if self._encoder is not None else encoder_slug(self.model_name)

    def load(self) -> SemanticRouter:
        """Load the sentence encoder and the expert embeddings (building them if stale)."""
        if self._encoder is not None:
            return self
        embeddings, source = load_or_build_embeddings(self.registry, self.model_name, self.home)
        # Keep only the rows of the experts in this (possibly restricted) view.
        slices = [embeddings.rows_of(e.id) for e in self.registry]
        self._matrix = np.ascontiguousarray(np.concatenate([embeddings.matrix[s] for s in slices]))
        sizes = [s.stop - s.start for s in slices]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        rows = np.full((len(sizes), max(sizes)), len(self._matrix), dtype=np.intp)
        for i, (start, n) in enumerate(zip(self._offsets.tolist(), sizes, strict=True)):
            rows[i, :n] = np.arange(start, start + n)
        self._example_rows = rows
        self._example_counts = np.asarray(sizes, dtype=np.float64)
        centroids = np.stack([embeddings.matrix[s].mean(axis=0) for s in slices])
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        self._centroids = np.ascontiguousarray(centroids / np.where(norms > 0, norms, 1.0),
                                               dtype=np.float32)
        self.embeddings_source = source
        self._encoder = load_encoder(self.model_name)
        return self

    def encode(self, query: str) -> np.ndarray:
        """The unit-norm float32 embedding of ``query`` (its first ``max_chars`` characters)."""
        self.load()
        previous = None
        if self.torch_threads is not None and self._encoder.slug != E5Encoder.slug:
            import torch

            previous = torch.get_num_threads()
            if previous != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
        try:
            vector = self._encoder.encode_query(query[: self.max_chars])
        finally:
            if previous is not None and previous != self.torch_threads:
                torch.set_num_threads(previous)
        return vector

    def similarities(self, query: str) -> np.ndarray:
        """Per-expert max cosine similarity, in registry order (values in [-1, 1])."""
        vector = self.encode(query)
        assert self._matrix is not None and self._offsets is not None
        return np.maximum.reduceat(self._matrix @ vector, self._offsets)

    def features(self, query: str) -> np.ndarray:
        """``(len(registry), 4)`` per-expert evidence, registry order, columns
        :data:`FEATURE_NAMES`: the closest example's similarity, the mean of the closest 3
        and 8 (an expert with several close examples is surer than one with a single
        lucky neighbour), and the similarity to the mean of the expert's examples."""
        vector = self.encode(query)
        assert self._matrix is not None and self._offsets is not None
        assert self._centroids is not None and self._example_rows is not None
        sims = np.append(self._matrix @ vector, -np.inf)[self._example_rows]
        k = min(8, sims.shape[1])
        best = np.sort(np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:], axis=1)[:, ::-1]
        # Means of the closest 3 and 8 over the examples an expert has (fewer: all of them).
        summed = np.cumsum(np.where(np.isfinite(best), best, 0.0), axis=1)
        counts = self._example_counts
        out = np.empty((len(counts), len(FEATURE_NAMES)), dtype=np.float64)
        out[:, 0] = best[:, 0]
        out[:, 1] = summed[:, min(3, k) - 1] / np.minimum(3, counts)
        out[:, 2] = summed[:, k - 1] / np.minimum(8, counts)
        out[:, 3] = self._centroids @ vector
        return out

    def score(self, query: str) -> list[tuple[str, float]]:
        """``[(expert_id, similarity)]`` for every expert, best first."""
        sims = self.similarities(query)
        pairs = zip(self.registry.ids, sims.tolist(), strict=True)
        ranked = sorted(pairs, key=lambda kv: (-kv[1], kv[0]))
        return [(eid, round(float(s), 6)) for eid, s in ranked]
