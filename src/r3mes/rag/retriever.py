"""Search over the named indices: dense, sparse (BM25), or hybrid by weighted Reciprocal Rank
Fusion, optionally re-ranked by a local cross-encoder; and the prompt/citation helper.

Reciprocal Rank Fusion (Cormack et al., 2009): a chunk's fused score is
``sum over lists of w / (k + rank)`` with 1-based ranks. It needs no score calibration,
which is why it is used both to fuse dense with sparse and to merge several indices' BM25
lists (BM25 scores of different indices are not comparable: each has its own idf; those
merge with ``w = 1, k = 60``). Hybrid search weights an index's dense list by
``dense_weight`` and its BM25 list by ``1 - dense_weight``; how much the dense list deserves
depends on the embedding model (the English MiniLM ranks Turkish poorly, e5 well), so the
defaults, :data:`DEFAULT_FUSION`, are per model, fitted on the dev half of a Turkish
known-item set and measured on the other half (BENCHMARKS.md, "BEIR-format corpus"). An
index's config (:class:`~r3mes.rag.named_index.IndexConfig`) or the :class:`Retriever` can
set them. Dense scores are cosines and are merged across indices by value when the indices
share an embedding model, by RRF when they do not (two models' cosines are not comparable).

Reranking is off by default. It needs a cross-encoder saved in a local directory
(``sentence_transformers.CrossEncoder(path)``); nothing is downloaded, and asking for reranking
without such a directory raises :class:`RerankerUnavailableError`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3mes.rag.embedder import E5_MODEL, MINILM_MODEL
from r3mes.rag.errors import QueryError, RagError, RerankerUnavailableError, UnknownIndexError
from r3mes.rag.indices import RagStore, check_index_name, route_domain
from r3mes.rag.named_index import check_fusion

MODES = ("dense", "sparse", "hybrid")
DEFAULT_RRF_K = 60


@dataclass(frozen=True)
class Fusion:
    """Weighted RRF of one index's dense and BM25 rankings: a chunk scores
    ``dense_weight / (k + dense rank) + (1 - dense_weight) / (k + BM25 rank)``."""

    dense_weight: float = 0.5
    k: int = DEFAULT_RRF_K


#: Hybrid fusion per embedding model, fitted on the dev split of the help-page BEIR set
#: (``benchmarks/bench_rag_beir.py --fit``); a model not listed (a local directory) fuses
#: with equal weights and k = 60, plain RRF.
DEFAULT_FUSION: dict[str, Fusion] = {
    MINILM_MODEL: Fusion(dense_weight=0.3, k=10),
    E5_MODEL: Fusion(dense_weight=0.55, k=10),
}
MAX_QUERY_CHARS = 4096
MAX_TOP_K = 1000


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: where it came from, its text, and its score under the mode used
    (cosine for dense, BM25 for sparse on one index, RRF otherwise, cross-encoder score when
    reranked)."""

    doc_id: str
    chunk_id: str
    text: str
    score: float
    index: str
    position: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "chunk_id": self.chunk_id, "text": self.text,
                "score": self.score, "index": self.index, "position": self.position,
                "metadata": self.metadata}


def rrf_fuse(rankings: Sequence[Sequence[Hashable]], k: int | Sequence[int] = DEFAULT_RRF_K,
             weights: Sequence[float] | None = None) -> list[tuple[Hashable, float]]:
    """Fuse ranked lists by (weighted) Reciprocal Rank Fusion; best first, ties by first
    appearance. ``k`` and ``weights`` are one value for all lists or one a list (weights
    default to 1)."""
    ks = [k] * len(rankings) if isinstance(k, int) else list(k)
    ws = [1.0] * len(rankings) if weights is None else list(weights)
    if len(ks) != len(rankings) or len(ws) != len(rankings):
        raise ValueError("rrf_fuse needs one k and one weight a ranking")
    if any(x < 0 for x in ks):
        raise ValueError(f"RRF k must be non-negative, got {k}")
    scores: dict[Hashable, float] = {}
    first: dict[Hashable, int] = {}
    n = 0
    for ranking, k_list, w in zip(rankings, ks, ws, strict=True):
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + w / (k_list + rank)
            if key not in first:
                first[key] = n
                n += 1
    return sorted(scores.items(), key=lambda kv: (-kv[1], first[kv[0]]))


class CrossEncoderReranker:
    """A sentence-transformers ``CrossEncoder`` loaded from a local directory only."""

    def __init__(self, model_path: str | os.PathLike[str], device: str = "cpu") -> None:
        path = Path(model_path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise RerankerUnavailableError(
                f"reranker model '{model_path}' is not a local model directory (with "
                "config.json); r3mes never downloads models: save a cross-encoder with "
                "sentence-transformers and pass its path")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import CrossEncoder

        try:
            self.model = CrossEncoder(str(path), device=device, local_files_only=True)
        except Exception as exc:  # a broken directory must name itself
            raise RerankerUnavailableError(f"{path}: cannot load a cross-encoder ({exc})") \
                from exc
        self.path = path

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        out = self.model.predict([(query, t) for t in texts], show_progress_bar=False)
        return [float(s) for s in out]


class Retriever:
    """Search the named indices of a :class:`RagStore`.

    ``candidates`` is how deep each list is read before fusion or reranking. ``rerank=True``
    needs ``reranker_model`` (a local directory) or a ready ``reranker``. ``dense_weight``
    and ``rrf_k``, when given, set the hybrid fusion of every index (see the module);
    otherwise each index's config decides, else the default of its embedding model.
    ``rrf_k`` also merges several indices' BM25 lists (default 60).
    """

    def __init__(
        self,
        store: RagStore,
        mode: str = "hybrid",
        rrf_k: int | None = None,
        candidates: int = 50,
        rerank: bool = False,
        reranker_model: str | os.PathLike[str] | None = None,
        reranker: CrossEncoderReranker | None = None,
        dense_weight: float | None = None,
    ) -> None:
        _check_mode(mode)
        check_fusion(dense_weight, rrf_k)
        self.store = store
        self.mode = mode
        self.rrf_k = rrf_k
        self.dense_weight = dense_weight
        self.candidates = candidates
        self.reranker = reranker
        if rerank and self.reranker is None:
            if reranker_model is None:
                raise RerankerUnavailableError(
                    "reranking was enabled but no local cross-encoder was given "
                    "(pass reranker_model=<directory>; nothing is downloaded)")
            self.reranker = CrossEncoderReranker(reranker_model)

    def search(
        self,
        query: str,
        top_k: int = 5,
        indices: Sequence[str] | str | None = None,
        filters: Mapping[str, Any] | None = None,
        mode: str | None = None,
        domain: str | None = None,
        skipped: list[str] | None = None,
    ) -> list[Hit]:
        """The ``top_k`` best chunks for ``query``.

        ``indices`` names the indices to search (explicitly); otherwise ``domain`` (a router
        domain) routes the query, and with neither every index that has content is searched.
        ``filters`` maps a metadata key (or ``doc_id``) to a value or a list of accepted values.
        Raises :class:`QueryError` for an empty or over-long query or a bad ``top_k``, and
        :class:`UnknownIndexError` for an unknown index name. With a ``skipped`` list, an
        index that cannot be loaded (corrupted, built with another embedding model) is left
        out and one line saying why is appended to the list, so one broken index does not
        fail the search over the others; without it the error is raised.
        """
        mode = _check_mode(mode or self.mode)
        query = _check_query(query)
        if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise QueryError(f"top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
        names = self._targets(indices, domain)
        depth = max(self.candidates, top_k)
        now = self.store.clock()
        per_index = []
        for name in names:
            try:
                ix = self.store.index(name)
            except (RagError, OSError, ValueError) as exc:
                if skipped is None:
                    raise
                skipped.append(f"index {name} skipped: {exc}")
                continue
            if len(ix):
                per_index.append((name, ix))
        if not per_index:
            return []
        # One view per search: store.index() may load a newer snapshot between two calls.
        loaded = dict(per_index)

        # Each index is searched with queries of its own embedding model; a model's query
        # vector is computed once per search.
        dense_lists: list[tuple[str, list[tuple[tuple[str, int], float]]]] = []  # (model, list)
        sparse_lists: list[list[tuple[tuple[str, int], float]]] = []
        qvecs: dict[str, Any] = {}
        for name, ix in per_index:
            allowed = ix.allowed_ids(now, filters)
            if mode != "sparse":
                model = str(ix.embedder.fingerprint)
                if model not in qvecs:
                    qvecs[model] = ix.embedder.embed_query(query)
                dense_lists.append((model, [((name, i), s) for i, s in
                                            ix.dense_search(qvecs[model], depth, allowed)]))
            if mode != "dense":
                sparse_lists.append([((name, i), s) for i, s in ix.sparse_search(query, depth,
                                                                                 allowed)])

        if mode == "dense":
            groups: dict[str, list[tuple[tuple[str, int], float]]] = {}
            for model, lst in dense_lists:
                groups.setdefault(model, []).extend(lst)
            by_model = [sorted(g, key=lambda p: -p[1]) for g in groups.values()]
            ranked = by_model[0] if len(by_model) == 1 else rrf_fuse(
                [[key for key, _ in lst] for lst in by_model], self._merge_k)
        elif mode == "sparse" and len(sparse_lists) == 1:
            ranked = sparse_lists[0]
        elif mode == "sparse":
            ranked = rrf_fuse([[key for key, _ in lst] for lst in sparse_lists], self._merge_k)
        else:
            # one dense and one BM25 list an index, both in the order of per_index
            fusions = [self.fusion(ix) for _, ix in per_index]
            ranked = rrf_fuse(
                [[key for key, _ in lst] for lst in [d for _, d in dense_lists] + sparse_lists],
                [f.k for f in fusions] * 2,
                [f.dense_weight for f in fusions] + [1.0 - f.dense_weight for f in fusions])
        ranked = ranked[:depth]
        hits = [self._hit(loaded, key, score) for key, score in ranked]
        if self.reranker is not None and hits:
            ce = self.reranker.scores(query, [h.text for h in hits])
            order = sorted(range(len(hits)), key=lambda j: -ce[j])
            hits = [_with_score(hits[j], ce[j]) for j in order]
        return hits[:top_k]

    def fusion(self, index: Any) -> Fusion:
        """How hybrid search fuses ``index``'s two rankings: this retriever's settings, else
        the index's config, else :data:`DEFAULT_FUSION` for its embedding model."""
        default = DEFAULT_FUSION.get(getattr(index.embedder, "name", ""), Fusion())
        weight = next(w for w in (self.dense_weight, index.config.dense_weight,
                                  default.dense_weight) if w is not None)
        k = next(x for x in (self.rrf_k, index.config.rrf_k, default.k) if x is not None)
        return Fusion(float(weight), int(k))

    @property
    def _merge_k(self) -> int:
        """RRF k of the merges that are not a hybrid fusion: several indices' BM25 lists,
        dense lists of indices built with different models."""
        return DEFAULT_RRF_K if self.rrf_k is None else self.rrf_k

    def _targets(self, indices: Sequence[str] | str | None, domain: str | None) -> list[str]:
        if isinstance(indices, str):
            indices = [indices]
        if indices is not None:
            if not indices:
                raise QueryError("indices is empty; name at least one index or pass None")
            names = list(dict.fromkeys(check_index_name(n) for n in indices))
            # A default index exists even when empty; a user-named one only once created
            # (a typo in a name must not read as "no hits").
            known = set(self.store.names())
            missing = [n for n in names if n not in known]
            if missing:
                raise UnknownIndexError(
                    f"unknown index {', '.join(repr(n) for n in missing)} (the indices are: "
                    f"{', '.join(sorted(known))}; create one with 'r3mes index add')")
            return names
        if domain is not None:
            return route_domain(domain)
        return self.store.existing() or ["general"]

    def _hit(self, loaded: Mapping[str, Any], key: tuple[str, int], score: float) -> Hit:
        name, cid = key
        rec = loaded[name].records[cid]
        return Hit(rec.doc_id, rec.chunk_id, rec.text, float(score), name, rec.position,
                   dict(rec.metadata))


def _with_score(hit: Hit, score: float) -> Hit:
    return Hit(hit.doc_id, hit.chunk_id, hit.text, score, hit.index, hit.position, hit.metadata)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise QueryError(f"unknown search mode '{mode}' (choose one of {', '.join(MODES)})")
    return mode


def _check_query(query: Any) -> str:
    if not isinstance(query, str):
        raise QueryError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise QueryError("query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(
            f"query is {len(query)} characters, over the {MAX_QUERY_CHARS}-character limit")
    return query.strip()


# -- prompt and citations ----------------------------------------------------------------

PROMPT_TEMPLATE = "Context:\n{retrieved_docs}\n\nQuery: {user_query}"


#: between two passages of one document under one source number
PASSAGE_SEPARATOR = "\n[...]\n"


def build_prompt(query: str, hits: Sequence[Hit]) -> tuple[str, dict[int, dict[str, Any]]]:
    """The seed's prompt with numbered sources, and the map ``number -> source`` to resolve
    citations such as ``[2]`` in the answer.

    One document is one source: chunks of the same document (same index and ``doc_id``)
    share the number of its best-ranked chunk, their passages in reading order joined by
    :data:`PASSAGE_SEPARATOR`, so an answer never lists one document twice. A source has
    ``doc_id, chunk_id`` (the best chunk), ``chunk_ids`` and ``positions`` (every merged
    chunk, in reading order), ``index, title, source`` and ``score`` (the best chunk's)."""
    groups: dict[tuple[str, str], list[Hit]] = {}
    for hit in hits:
        groups.setdefault((hit.index, hit.doc_id), []).append(hit)
    lines = []
    sources: dict[int, dict[str, Any]] = {}
    for n, group in enumerate(groups.values(), start=1):
        best = group[0]  # hits arrive best first
        passages = sorted(group, key=lambda h: h.position)
        lines.append(f"[{n}] " + PASSAGE_SEPARATOR.join(h.text for h in passages))
        sources[n] = {"doc_id": best.doc_id, "chunk_id": best.chunk_id,
                      "chunk_ids": [h.chunk_id for h in passages],
                      "positions": [h.position for h in passages], "index": best.index,
                      "title": best.metadata.get("title"), "source": best.metadata.get("source"),
                      "score": float(best.score)}
    return PROMPT_TEMPLATE.format(retrieved_docs="\n\n".join(lines), user_query=query), sources


def cited_sources(answer: str, sources: Mapping[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Sources an answer cites as ``[n]``, in order of first citation, unknown numbers ignored."""
    import re

    out, seen = [], set()
    for m in re.finditer(r"\[(\d+)\]", answer):
        n = int(m.group(1))
        if n in sources and n not in seen:
            seen.add(n)
            out.append({"number": n, **sources[n]})
    return out
