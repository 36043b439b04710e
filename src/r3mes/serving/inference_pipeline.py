"""The inference pipeline: router + RAG + tiered expert cache + backend, end to end.

The seed's API::

    pipeline = create_pipeline(enable_rag=True)
    await pipeline.initialize()
    await pipeline.load_model("path/to/model")      # optional: the demo model otherwise
    result = await pipeline.run("Diyabet tedavisi hakkında bilgi ver")
    result.output, result.experts_used, result.metrics.total_time_ms
    async for piece in pipeline.run_streaming("..."): ...
    results = await pipeline.run_batch(["...", "..."])
    pipeline.add_rag_document("med_001", "Diyabet ...", {"domain": "medical"})
    pipeline.get_stats()["router"]["fast_path_rate"]

One query is the data flow of DESIGN.md ("Data flow of one query"), one step a method of
:meth:`InferencePipeline._answer`:

1. **check** the request (:meth:`~InferencePipeline.check_request`);
2. concurrently (``asyncio.gather``): **route** (keyword -> semantic -> fusion -> VRAM-adaptive
   gating, :meth:`~InferencePipeline.route`), **retrieve** (:meth:`~InferencePipeline.retrieve`)
   and **prefetch** (the keyword stage's candidates handed to the cache's ``predictive_load``);
3. **prompt**: system + numbered context + history + query, through the model's chat
   template when it has one;
4. **adapters**: the chosen experts leased from the tiered cache, which owns the adapters
   the backend holds (:mod:`r3mes.cache.residency`);
5. **generate**: a job for the engine (:mod:`r3mes.serving.engine`: continuous batching, its
   own queue and thread), tokens decoded incrementally (:mod:`r3mes.serving.streaming`);
6. **post-process** (safety filter, whitespace, citations) as the text streams, so a stream
   shows exactly the final answer.

Start-up (model, tokenizer, router, cache, RAG) is :mod:`r3mes.serving.startup`; the
settings are :class:`~r3mes.serving.pipeline_config.PipelineConfig`.

Experts: the pipeline routes over the experts whose adapters are installed in the data
directory's adapter store (plus the registry's fallback, ``general_dora``, which is the
base model alone when it has no adapter).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3mes.serving import startup
from r3mes.serving.engine import Engine, EngineOverloaded, GenerationJob
from r3mes.serving.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PipelineError,
    UnknownExpertError,
)
from r3mes.serving.pipeline_config import PipelineConfig
from r3mes.serving.postprocess import Postprocessor, SafetyFilter
from r3mes.serving.prompt import context_block, prompt_ids
from r3mes.serving.results import PipelineMetrics, PipelineResult
from r3mes.serving.sampling import SEED_MAX, SEED_MIN, Sampling, check_sampling
from r3mes.serving.startup import (
    DEMO_MODEL_NOTICE,
    MODEL_HELP,
    assets_dir,
    resolve_model_path,
)
from r3mes.serving.streaming import Emit, IncrementalDecoder, stream_pieces

if TYPE_CHECKING:
    from r3mes.cache.residency import AdapterResidency
    from r3mes.core.backends import InferenceBackend

__all__ = [
    "DEMO_MODEL_NOTICE", "GENERAL_EXPERT", "MODEL_HELP", "InferencePipeline",
    "InvalidRequestError", "ModelNotFoundError", "PipelineConfig", "PipelineError",
    "PipelineMetrics", "PipelineResult", "SEED_MAX", "SEED_MIN", "UnknownExpertError",
    "assets_dir",
    "create_pipeline", "resolve_model_path",
]

log = logging.getLogger(__name__)

GENERAL_EXPERT = "general_dora"


# --------------------------------------------------------------------------- the pipeline


class InferencePipeline:
    """Router + RAG + tiered cache + backend (see the module docstring).

    Components may be passed in (already built, real ones); whatever is not passed is built
    by :meth:`initialize` and :meth:`load_model` from ``config``
    (:mod:`r3mes.serving.startup`).

    Args:
        config: the settings (default: :class:`PipelineConfig` defaults).
        backend: an :class:`~r3mes.core.backends.InferenceBackend` with its model loaded
            (skips :meth:`load_model`'s backend creation).
        tokenizer: a ``tokenizers.Tokenizer`` (or anything with ``encode(text).ids`` and
            ``decode(ids)``); default: the backend's, else the model directory's.
        router: a :class:`~r3mes.router.hybrid_router.HybridRouter`.
        rag_store: a :class:`~r3mes.rag.RagStore`.
        adapter_store: an :class:`~r3mes.cache.AdapterStore`.
    """

    def __init__(
        self,
        config: PipelineConfig | None = None,
        *,
        backend: InferenceBackend | None = None,
        tokenizer: Any = None,
        router: Any = None,
        rag_store: Any = None,
        adapter_store: Any = None,
    ) -> None:
        self.config = config or PipelineConfig()
        self.backend = backend
        self.tokenizer = tokenizer
        self.router = router
        self.rag_store = rag_store
        self.retriever: Any = None
        self.adapter_store = adapter_store
        self.cache: Any = None
        self.residency: AdapterResidency | None = None
        self.engine: Engine | None = None
        self.model_path: Path | None = None
        self.installed_experts: list[str] = []
        #: stored experts left out of routing, with why (made for another base model,
        #: shapes that do not fit it, damaged files)
        self.skipped_experts: dict[str, str] = {}
        #: one-line notes for the user about this pipeline (the demo model, skipped experts)
        self.notices: list[str] = []
        self._broken_experts: dict[str, str] = {}  # id -> digest that failed to load
        self._target_model_path: Path | None = None  # what load_model is about to load
        self.initialized = False
        self.safety = SafetyFilter(self.config.blocked_terms, self.config.safety_replacement,
                                   self.config.safety_enabled)
        # Routing, retrieval and start-up run in these threads (never on the event loop);
        # the model runs in the engine's own thread.
        self._stage_executor = ThreadPoolExecutor(2, thread_name_prefix="r3mes-stage")
        self._rag_lock = threading.RLock()
        self._init_lock: asyncio.Lock | None = None
        self._counters: dict[str, float] = {
            "requests": 0, "failures": 0, "tokens_generated": 0,
            "total_ms": 0.0, "overhead_ms": 0.0, "inference_ms": 0.0,
        }

    # ------------------------------------------------------------------ lifecycle

    @property
    def home(self) -> Path:
        from r3mes.utils.paths import r3mes_home

        return r3mes_home(self.config.home)

    @property
    def rag_lock(self) -> threading.RLock:
        """Held by whatever reads or changes the RAG indices (retrieval, adding documents,
        installing snapshots), so no retrieval reads an index while it changes."""
        return self._rag_lock

    async def initialize(self) -> None:
        """Build the adapter store (importing bundled/configured experts), the router over
        the installed experts, the RAG store (importing the bundled knowledge base when the
        data directory has none) and the retriever. Idempotent."""
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if self.initialized:
                return
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._stage_executor, self._initialize_sync)
            self.initialized = True

    def _initialize_sync(self) -> None:
        cfg = self.config
        if self.adapter_store is None:
            self.adapter_store = startup.open_adapter_store(cfg)
        shape = startup.model_shape_before_loading(cfg, self._target_model_path, self.backend)
        fitting, skipped = startup.fitting_experts(self.adapter_store, shape)
        self.skipped_experts.update(skipped)
        if skipped:
            note = startup.skipped_notice(skipped)
            self.notices.append(note)
            log.info("%s", note)  # shown by the CLI and the server, once
        self.installed_experts = sorted(fitting)
        if self.router is None:
            self.router = startup.build_router(cfg, fitting)
        else:
            startup.warm_up_router(self.router, cfg)
        if cfg.enable_rag and self.rag_store is None:
            self.rag_store = startup.open_rag_store(cfg)
        if self.rag_store is not None and self.retriever is None:
            self.retriever = startup.build_retriever(cfg, self.rag_store)

    async def load_model(self, path: str | Path | None = None) -> None:
        """Load the base model (``path``, else the configured one, else the demo model) on
        the configured backend, then start the engine and the expert cache (pinning the
        preload experts).

        Raises :class:`ModelNotFoundError` with what to pass when there is no model.
        """
        model_path = None
        if self.backend is None:  # fail on a missing model before the slow start-up
            model_path = resolve_model_path(path if path is not None else self.config.model_path)
            self._target_model_path = model_path
        await self.initialize()
        if self.backend is None:
            assert model_path is not None
            self.backend = await startup.load_backend(self.config, model_path,
                                                      self._stage_executor)
            self.model_path = model_path
            if startup.is_demo_model(model_path):
                self.notices.insert(0, DEMO_MODEL_NOTICE)
        if self.tokenizer is None:
            self.tokenizer = startup.load_tokenizer(self.backend, self.model_path)
        if self.residency is None:
            from r3mes.cache.residency import AdapterResidency

            self.residency = AdapterResidency(self.backend)
        if self.engine is None:
            self.engine = startup.build_engine(self.config, self.backend, self.residency.sync)
        if self.cache is None:
            self.cache, failed = await startup.start_cache(
                self.config, self.adapter_store, self.residency, self.installed_experts)
            for expert, exc in failed.items():
                self._mark_broken(expert, exc)
                self.notices.append(f"note: expert {expert} is not used: {exc}")
                log.info("expert %s is not used: %s", expert, exc)

    async def close(self) -> None:
        """Stop the engine and the cache, release the threads."""
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
        if self.cache is not None:
            await self.cache.close()
        self._stage_executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> InferencePipeline:
        await self.load_model()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ public API

    def routable_experts(self) -> list[str]:
        """Expert ids the router may choose (installed ones plus the fallback)."""
        if self.router is None:
            return []
        return list(self.router.registry.ids)

    async def run(self, query: str, force_experts: Sequence[Any] | None = None,
                  skip_rag: bool = False, *, vram_gb: float | None = None,
                  history: Sequence[Mapping[str, str]] | None = None,
                  rag_indices: Sequence[str] | None = None, on_text: Emit | None = None,
                  cancel: threading.Event | None = None, **generation: Any) -> PipelineResult:
        """Answer ``query``. Never raises for a bad request or a failing stage: the result
        has ``success=False`` and the error.

        ``force_experts`` skips routing: expert ids (equal weights; ``[]`` is the base model
        alone) or ``(id, weight)`` pairs used as given (an ingress that routed already).
        ``generation`` overrides sampling settings (``max_new_tokens``, ``temperature``,
        ``top_k``, ``top_p``, ``repetition_penalty``, ``stop``, ``seed``); ``history`` is
        earlier chat turns ``[{"role", "content"}]``. ``on_text(piece)`` receives the
        answer's text as it is generated (from the engine's thread); setting ``cancel``
        stops generation at the next token."""
        return await self._answer(query, force_experts, skip_rag, vram_gb, history,
                                  rag_indices, generation, on_text, cancel)

    async def run_streaming(self, query: str, force_experts: Sequence[Any] | None = None,
                            skip_rag: bool = False, *, vram_gb: float | None = None,
                            history: Sequence[Mapping[str, str]] | None = None,
                            rag_indices: Sequence[str] | None = None,
                            result_holder: list[PipelineResult] | None = None,
                            **generation: Any) -> AsyncIterator[str]:
        """Yield the answer's text as it is generated; the pieces join to exactly
        ``run(...).output``. Pass ``result_holder=[]`` to receive the
        :class:`PipelineResult` (metrics, sources) after the last piece. Raises
        :class:`PipelineError` (or :class:`InvalidRequestError`) when the query fails."""
        async def answer(emit: Emit, cancel: threading.Event) -> PipelineResult:
            return await self._answer(query, force_experts, skip_rag, vram_gb, history,
                                      rag_indices, generation, emit, cancel)

        result: PipelineResult | None = None
        async with contextlib.aclosing(stream_pieces(answer)) as items:
            async for item in items:
                if isinstance(item, PipelineResult):
                    result = item
                else:
                    yield item
        assert result is not None
        if result_holder is not None:
            result_holder.append(result)
        result.raise_if_failed()

    async def run_batch(self, queries: Sequence[str], force_experts: Sequence[Any] | None = None,
                        skip_rag: bool = False, **kwargs: Any) -> list[PipelineResult]:
        """Answer several queries; they share generation batches where the backend allows.
        Results are in the order of ``queries``."""
        return list(await asyncio.gather(*(self.run(q, force_experts, skip_rag, **kwargs)
                                           for q in queries)))

    def add_rag_document(self, doc_id: str, content: str,
                         metadata: Mapping[str, Any] | None = None,
                         index: str | None = None) -> dict[str, Any]:
        """Index a document and save the index as a new snapshot. The index is ``index``,
        else the one for ``metadata["domain"]``, else ``general``. Returns the counts and
        the snapshot digest. Raises :class:`r3mes.rag.RagError` for a bad document."""
        from r3mes.rag import Document
        from r3mes.rag.indices import route_domain

        if self.rag_store is None:
            from r3mes.rag import RagStore, Retriever

            self.rag_store = RagStore(self.config.home,
                                      embedding_model=self.config.rag_embedding_model)
            self.retriever = Retriever(self.rag_store, mode=self.config.rag_mode)
        meta = dict(metadata or {})
        target = index or route_domain(meta.get("domain"))[0]
        with self._rag_lock, self.rag_store.lock():
            counts = self.rag_store.index(target).add_documents(
                [Document(doc_id, content, meta)])
            snap = self.rag_store.save(target)
        return {"index": target, **counts, "snapshot": snap.digest}

    def get_stats(self) -> dict[str, Any]:
        """Router (fast-path rate, stage latencies), cache (tier utilisation, hit rates),
        RAG (indices), pipeline counters and the backend."""
        c = self._counters
        n = max(1, int(c["requests"]))
        out: dict[str, Any] = {
            "pipeline": {
                "requests": int(c["requests"]), "failures": int(c["failures"]),
                "tokens_generated": int(c["tokens_generated"]),
                "batched_jobs": self.engine.counters["completed"] if self.engine else 0,
                "mean_total_ms": c["total_ms"] / n, "mean_overhead_ms": c["overhead_ms"] / n,
                "mean_inference_ms": c["inference_ms"] / n,
            },
            "router": self.router.stats.to_dict() if self.router is not None else None,
            "cache": self.cache.stats() if self.cache is not None else None,
            "rag": None,
            "backend": {"name": self.engine.name if self.engine else None,
                        "capabilities": _capabilities(self.backend)},
            "engine": self.engine.stats() if self.engine is not None else None,
            "experts": {"installed": self.installed_experts,
                        "routable": self.routable_experts()},
            "model_path": str(self.model_path) if self.model_path else None,
        }
        if self.rag_store is not None:
            with self._rag_lock:
                out["rag"] = {"indices": {name: len(self.rag_store.index(name))
                                          for name in self.rag_store.existing()}}
        return out

    # ------------------------------------------------------------------ the stages

    def check_request(self, query: Any, generation: Mapping[str, Any],
                      force_experts: Sequence[Any] | None = None,
                      vram_gb: float | None = None) -> tuple[str, Sampling]:
        """Checks a request before any work is done for it: returns the query (undecodable
        characters replaced) and its generation options. Raises
        :class:`InvalidRequestError` (:class:`UnknownExpertError`) naming what is wrong."""
        query, sampling = self._check_query(query), check_sampling(generation, self.config)
        self._check_budget(vram_gb)
        self._check_forced(force_experts)
        return query, sampling

    async def route(self, query: str, force_experts: Sequence[Any] | None = None, *,
                    vram_gb: float | None = None,
                    result: PipelineResult | None = None) -> list[tuple[str, float]]:
        """``[(expert_id, weight)]`` for ``query``: ``force_experts`` as given (see
        :meth:`run`), else the router's decision with the general expert blended in where
        the budget allows. The decision and its timings go into ``result`` when given.
        Raises :class:`InvalidRequestError` (:class:`UnknownExpertError` for a forced
        expert that is not installed or does not fit the model)."""
        self._check_budget(vram_gb)
        forced = self._check_forced(force_experts)
        if forced is not None:
            return forced
        t0 = time.perf_counter()
        decision = await asyncio.get_running_loop().run_in_executor(
            self._stage_executor, self._route_sync, query, vram_gb)
        experts = self._fill_general(decision)
        if result is not None:
            m = result.metrics
            m.routing_time_ms = (time.perf_counter() - t0) * 1e3
            m.used_fast_path = bool(decision.fast_path)
            m.keyword_confidence = float(decision.keyword_confidence)
            m.routing_stages_ms = dict(decision.timings_ms)
            result.routing = decision.to_dict()
        return experts

    def retrieve(self, query: str, indices: Sequence[str] | None = None,
                 warnings: list[str] | None = None) -> list[Any]:
        """Retrieval hits for ``query`` (blocking: call it from a worker thread); an index
        that cannot be loaded is skipped with a line in ``warnings`` (the answer uses the
        others). Raises :class:`InvalidRequestError` for an unknown index."""
        from r3mes.rag import QueryError, UnknownIndexError

        targets = list(indices) if indices else self.config.rag_indices
        rag_query = query[-4096:]  # the retriever's limit; the question sits at the end
        skipped: list[str] = []
        with self._rag_lock:
            try:
                hits = self.retriever.search(rag_query, top_k=self.config.rag_top_k,
                                             indices=targets, skipped=skipped)
            except UnknownIndexError as exc:
                raise InvalidRequestError(str(exc)) from exc
            except QueryError:
                return []
        for line in skipped:
            log.warning("%s", line)
        if warnings is not None:
            warnings.extend(skipped)
        return hits

    # ------------------------------------------------------------------ one query

    async def _answer(self, query: Any, force_experts: Sequence[Any] | None, skip_rag: bool,
                      vram_gb: float | None, history: Sequence[Mapping[str, str]] | None,
                      rag_indices: Sequence[str] | None, generation: Mapping[str, Any],
                      emit: Emit | None, cancel: threading.Event | None) -> PipelineResult:
        """route -> retrieve -> prompt -> adapters -> generate -> postprocess."""
        started = time.perf_counter()
        result = PipelineResult(query=query if isinstance(query, str) else repr(query))
        m = result.metrics
        self._counters["requests"] += 1
        try:
            if self.engine is None:
                await self.load_model()
            assert self.engine is not None
            query, sampling = self.check_request(query, generation, force_experts, vram_gb)
            m.backend_used = self.engine.name
            experts, hits, _ = await asyncio.gather(
                self.route(query, force_experts, vram_gb=vram_gb, result=result),
                self._retrieval(query, skip_rag, rag_indices, result),
                self._prefetch(query, force_experts, m))
            result.experts_used = experts
            context, sources = self._context(query, hits, result)
            ids = prompt_ids(self.tokenizer, self.config.system_prompt, query, context, history)
            m.prompt_tokens = len(ids)
            async with contextlib.AsyncExitStack() as leases:
                mix = await self._adapters(experts, result, leases)
                await self._generate(ids, mix, sampling, sources, result, started, emit,
                                     cancel)
        except InvalidRequestError as exc:
            self._fail(result, exc, "unknown_expert" if isinstance(exc, UnknownExpertError)
                       else "invalid_request")
        except EngineOverloaded as exc:  # the queue is full: the caller retries later
            self._fail(result, exc, "overloaded")
            result.retry_after = exc.retry_after
        except Exception as exc:  # a failed request must never take the caller down
            log.exception("query failed")
            self._fail(result, exc, "internal")
        m.total_time_ms = (time.perf_counter() - started) * 1e3
        if result.success:
            self._counters["total_ms"] += m.total_time_ms
            self._counters["overhead_ms"] += m.overhead_ms
            self._counters["inference_ms"] += m.inference_time_ms
            self._counters["tokens_generated"] += m.tokens_generated
        return result

    def _fail(self, result: PipelineResult, exc: Exception, kind: str) -> None:
        self._counters["failures"] += 1
        result.fail(exc, kind)

    async def _retrieval(self, query: str, skip_rag: bool, indices: Sequence[str] | None,
                         result: PipelineResult) -> list[Any]:
        if skip_rag or not self.config.enable_rag or self.retriever is None:
            return []
        t0 = time.perf_counter()
        hits = await asyncio.get_running_loop().run_in_executor(
            self._stage_executor, self.retrieve, query, indices, result.warnings)
        result.metrics.rag_time_ms = (time.perf_counter() - t0) * 1e3
        return hits

    async def _prefetch(self, query: str, force_experts: Sequence[Any] | None,
                        m: PipelineMetrics) -> None:
        """Hands the keyword stage's likely experts to the cache while routing runs."""
        if force_experts is not None or not self.config.predictive_loading or self.cache is None:
            return
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):  # a prefetch is a hint, never an error
            scores, _conf, _lang = self.router.keyword.analyse(query)
            likely = [e for e, _ in scores if e in self.installed_experts][
                :self.config.experts_24gb]
            if likely:
                self.cache.predictive_load(likely)
        m.prefetch_time_ms = (time.perf_counter() - t0) * 1e3

    def _check_query(self, query: Any) -> str:
        if not isinstance(query, str):
            raise InvalidRequestError(f"query must be a string, got {type(query).__name__}")
        query = query.encode("utf-8", "replace").decode("utf-8")
        if not query.strip():
            raise InvalidRequestError("query is empty")
        if len(query) > self.config.max_query_chars:
            raise InvalidRequestError(
                f"query is {len(query)} characters, over the limit of "
                f"{self.config.max_query_chars}")
        return query

    @staticmethod
    def _check_budget(vram_gb: float | None) -> None:
        if vram_gb is not None and (not math.isfinite(vram_gb) or vram_gb < 0):
            raise InvalidRequestError(f"vram_gb must be a non-negative number, got {vram_gb!r}")

    def _check_forced(self, force_experts: Sequence[Any] | None) -> list[tuple[str, float]] | None:
        if force_experts is None:
            return None
        if isinstance(force_experts, str):
            force_experts = [force_experts]
        weighted = bool(force_experts) and all(
            isinstance(e, (tuple, list)) for e in force_experts)
        ids = list(dict.fromkeys(str(e[0] if weighted else e) for e in force_experts))
        if not ids:
            return []  # an empty list: the base model alone
        unknown = [e for e in ids if e not in self.installed_experts and e != GENERAL_EXPERT]
        unfit = [e for e in unknown if e in self.skipped_experts]
        if unfit:
            raise UnknownExpertError("; ".join(
                f"expert {e} is not used with this model: {self.skipped_experts[e]}"
                for e in unfit))
        if unknown:
            raise UnknownExpertError(
                f"unknown expert(s) {', '.join(unknown)}; installed: "
                f"{', '.join(self.installed_experts) or 'none'} (see `r3mes adapters list`)")
        if weighted:
            return [(str(e), float(w)) for e, w in force_experts]
        return [(e, 1.0 / len(ids)) for e in ids]

    def _route_sync(self, query: str, vram_gb: float | None) -> Any:
        budget_mb = None
        if vram_gb is None and self.config.vram_capacity_mb is not None:
            budget_mb = self.config.vram_capacity_mb
        from r3mes.router.hybrid_router import EmptyQueryError

        try:
            return self.router.route_decision(query, vram_gb, budget_mb=budget_mb,
                                              strategy=self.config.router_strategy)
        except (EmptyQueryError, TypeError) as exc:
            raise InvalidRequestError(str(exc)) from exc

    def _fill_general(self, decision: Any) -> list[tuple[str, float]]:
        """The seed's blend: when the budget allows more experts than scored, add the
        general expert at ``general_fill_score`` (before renormalising)."""
        experts = list(decision.experts)
        if (not self.config.fill_with_general or decision.fallback_used
                or len(experts) >= decision.top_k
                or any(e == GENERAL_EXPERT for e, _ in experts)
                or GENERAL_EXPERT not in self.installed_experts):
            return experts
        scores = dict(decision.scores)
        raw = [(e, scores.get(e, w)) for e, w in experts]
        raw.append((GENERAL_EXPERT, self.config.general_fill_score))
        total = sum(s for _, s in raw)
        weights = [(e, s / total) for e, s in raw]
        head = weights[:-1]
        return head + [(GENERAL_EXPERT, 1.0 - sum(w for _, w in head))]

    def _context(self, query: str, hits: Sequence[Any],
                 result: PipelineResult) -> tuple[str | None, dict[int, dict[str, Any]]]:
        """The context block for ``hits`` and the sources by number, recorded in ``result``."""
        if not hits:
            return None, {}
        context, sources = context_block(query, hits, self.config.rag_max_context_chars)
        result.rag_context = context
        result.sources = [{"number": n, **src, "score": round(float(src["score"]), 6),
                           "cited": False} for n, src in sources.items()]
        result.metrics.rag_docs_retrieved = len(hits)
        result.metrics.rag_context_length = len(context)
        return context, sources

    async def _adapters(self, experts: list[tuple[str, float]], result: PipelineResult,
                        leases: contextlib.AsyncExitStack) -> list[tuple[str, float]]:
        """Backend adapter names and weights for ``experts``, each leased from the cache
        (not evictable) until ``leases`` closes; experts without an adapter (the fallback
        on a bare model) are the base model, so their weight is dropped and the rest
        renormalised. An expert whose files are damaged (truncated, digest mismatch) is
        left out the same way, with a line in ``result.warnings``: one broken expert must
        not fail the queries routed to it."""
        m = result.metrics
        t0 = time.perf_counter()
        mix: list[tuple[str, float]] = []
        for expert, weight in experts:
            if expert not in self.installed_experts:
                continue
            broken = self._broken_reason(expert)
            if broken is not None:
                result.warnings.append(broken)
                continue
            if self.cache.tier_of(expert) == 1:
                m.cache_hits += 1
            else:
                m.cache_misses += 1
            try:
                slot = await leases.enter_async_context(self.cache.use(expert))
            except Exception as exc:
                log.warning("expert %s skipped: %s", expert, exc)
                self._mark_broken(expert, exc)
                result.warnings.append(self._broken_reason(expert) or f"expert {expert} skipped")
                continue
            m.adapters_loaded.append(expert)
            mix.append((slot.name, weight))
        m.loading_time_ms = (time.perf_counter() - t0) * 1e3
        if result.warnings:  # say which experts actually answered
            used = set(m.adapters_loaded)
            result.experts_used = [(e, w) for e, w in experts
                                   if e in used or e not in self.installed_experts]
        total = sum(w for _, w in mix)
        if mix and total > 0:
            mix = [(n, w / total) for n, w in mix]
        return mix

    def _mark_broken(self, expert: str, exc: BaseException) -> None:
        """Remember that ``expert``'s stored content failed to load, until it changes."""
        with contextlib.suppress(Exception):
            digest = self.adapter_store.get(expert).digest
            self._broken_experts[expert] = digest
            self.skipped_experts[expert] = f"damaged: {exc}"

    def _broken_reason(self, expert: str) -> str | None:
        """The warning for an expert known to be damaged, or ``None`` when it is not (or
        was re-added since: a new digest is tried again)."""
        digest = self._broken_experts.get(expert)
        if digest is None:
            return None
        try:
            current = self.adapter_store.get(expert).digest
        except Exception:
            current = None
        if current != digest:
            self._broken_experts.pop(expert, None)
            self.skipped_experts.pop(expert, None)
            return None
        return (f"expert {expert} skipped: {self.skipped_experts.get(expert, 'damaged')} "
                "(run `r3mes adapters verify`)")

    async def _generate(self, prompt_ids: list[int], mix: list[tuple[str, float]],
                        sampling: Sampling, sources: dict[int, dict[str, Any]],
                        result: PipelineResult, started: float, emit: Emit | None,
                        cancel: threading.Event | None) -> None:
        """Generation by the engine, post-processed as the tokens come."""
        m = result.metrics
        proc = Postprocessor(sources, safety=self.safety, citations=self.config.citations,
                             strip_whitespace=self.config.strip_whitespace)
        decoder = IncrementalDecoder(self.tokenizer, sampling.stop)
        first_token: list[float] = []
        post_s = 0.0

        def on_token(token: int) -> bool:
            nonlocal post_s
            if not first_token:
                first_token.append(time.perf_counter())
            piece = decoder.add(token)
            if piece:
                t0 = time.perf_counter()
                out = proc.feed(piece)
                post_s += time.perf_counter() - t0
                if out and emit is not None:
                    emit(out)
            return not decoder.stopped and not (cancel is not None and cancel.is_set())

        job = GenerationJob(prompt_ids, mix, sampling.params, on_token, cancel)
        assert self.engine is not None
        t0 = time.perf_counter()
        timing = await self.engine.run(job)
        m.inference_time_ms = (time.perf_counter() - t0) * 1e3 - timing.queue_ms
        m.queue_time_ms = timing.queue_ms
        m.batch_size = timing.batch_size
        t1 = time.perf_counter()
        tail = decoder.flush()
        out = (proc.feed(tail) if tail else "") + proc.finish()
        if out and emit is not None:
            emit(out)
        m.postprocess_time_ms = (post_s + time.perf_counter() - t1) * 1e3
        if first_token:
            m.time_to_first_token_ms = (first_token[0] - started) * 1e3
        result.tokens = list(job.tokens)
        m.tokens_generated = len(job.tokens)
        result.output = proc.text
        result.masked_terms = list(proc.outcome.masked_terms)
        result.finish_reason = "stop" if decoder.stopped else job.finish_reason
        cited = {c["number"] for c in proc.outcome.cited}
        for src in result.sources:
            src["cited"] = src["number"] in cited


# --------------------------------------------------------------------------- helpers


def _capabilities(backend: InferenceBackend | None) -> Any:
    if backend is None:
        return None
    try:
        caps = backend.get_capabilities()
    except Exception as exc:  # stats must not fail because a backend cannot describe itself
        return {"error": str(exc)}
    return json.loads(json.dumps(caps, default=str))


def create_pipeline(enable_rag: bool = True, config: PipelineConfig | None = None,
                    **kwargs: Any) -> InferencePipeline:
    """An :class:`InferencePipeline` with ``PipelineConfig(enable_rag=..., **kwargs)`` (or
    ``config``); components (``backend=``, ``router=``, ...) pass through."""
    # ``backend="pytorch"`` (a name) is a setting; a backend object is a component.
    components = {k: kwargs.pop(k) for k in ("backend", "tokenizer", "router", "rag_store",
                                              "adapter_store")
                  if k in kwargs and not (k == "backend" and isinstance(kwargs[k], str))}
    if config is None:
        config = PipelineConfig(enable_rag=enable_rag, **kwargs)
    elif kwargs:
        raise TypeError("pass either config or PipelineConfig fields, not both")
    return InferencePipeline(config, **components)
