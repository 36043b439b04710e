"""Serving past one machine: r3mes as a Ray Serve application (``r3mes serve --ray``).

Three deployments::

    HTTP ──► R3mesIngress  (the FastAPI app of r3mes serve, unchanged; the router runs here)
                 │  routes the query, then calls the engine with
                 │  multiplexed_model_id = the routed expert set ("coding_dora@1a2b..+...")
                 ▼
             R3mesEngine × N  (one r3mes engine a replica: model loaded once, its own
                 │             tiered expert cache, continuous batching, RAG)
                 ▼
             R3mesRegistry    (the data directory: adapter store + RAG snapshots, served by
                               content digest; per-replica statistics for /metrics)

- **Placement by expert mix.** The ingress routes every query (keyword -> semantic -> fusion ->
  gating, exactly as ``r3mes serve``) and sends it to the engine through Ray Serve's model
  multiplexing keyed by the routed expert set: Ray prefers a replica that already holds that
  set, else one holding the fewest sets, so each replica's hot set stays small. The replica
  receives the routed experts *with their weights*, so its answer is the single-process
  server's answer for the same seed.
- **Content addresses.** Replicas do not share the data directory. At start each replica asks
  the registry for the manifest (expert id -> adapter digest, index -> snapshot digest),
  fetches the bytes by digest and installs them into its own store through the store's own
  checks (``expected_digest``: content that does not hash to the manifest's digest is refused
  and that expert is not served there). Every request carries the digests the ingress routed
  with; a replica whose adapter has another digest refuses the request instead of answering
  with other weights. A RAG snapshot the ingress names that a replica lacks (a document was
  added through the API) is fetched and verified before the request is answered.
- **Failures.** A replica that dies mid-request fails that call at the ingress; a non-streamed
  request (and a stream that has sent nothing yet) is retried once on another replica, any
  other is answered with a clean error. Ray Serve replaces the replica.

Nothing here is imported by the single-machine path; Ray is the optional extra
``pip install "r3mes[ray]"``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError

from r3mes.serving.inference_pipeline import (
    GENERAL_EXPERT,
    InferencePipeline,
    InvalidRequestError,
    PipelineConfig,
    PipelineError,
    PipelineResult,
    UnknownExpertError,
)
from r3mes.serving.streaming import stream_pieces

log = logging.getLogger(__name__)

APP_NAME = "r3mes"
BASE_SET = "base"  # the multiplexed id of a request that uses no adapter
PLACEMENTS = ("experts", "any")

try:  # Ray Serve's "replica unavailable" error (a replica that is shutting down)
    from ray.exceptions import ActorUnavailableError
    _REPLICA_GONE: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover - older Ray
    _REPLICA_GONE = (RayActorError,)


def expert_set_key(experts: Sequence[tuple[str, float]], digests: Mapping[str, str]) -> str:
    """The multiplexed model id of a routed mix: its adapters' ids with a digest prefix,
    sorted (``"coding_dora@1a2b3c4d5e6f+general_dora@..."``); ``"base"`` without adapters.
    The weights are not part of it: the same adapters serve every weighting."""
    ids = sorted({e for e, _ in experts if e in digests})
    return "+".join(f"{e}@{digests[e][:12]}" for e in ids) or BASE_SET


# --------------------------------------------------------------------------- registry


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class R3mesRegistry:
    """The data directory's contents by digest, and the replicas' statistics.

    It prepares the data directory as ``r3mes serve`` does (bundled or configured experts and
    knowledge imported into an empty one) and then only reads it. It runs where that
    directory is: on the head node in a cluster (see the README)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        # Keyword routing: this process never routes; it only needs the stores prepared.
        self._pipe = InferencePipeline(dataclasses.replace(config, router_strategy="keyword"))
        self._ready: asyncio.Task[None] | None = None
        self._fleet: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    async def _prepared(self) -> InferencePipeline:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._pipe.initialize())
        await asyncio.shield(self._ready)
        return self._pipe

    async def manifest(self) -> dict[str, Any]:
        """``{"experts": {id: {"digest", "fingerprint"}}, "rag": {index: digest},
        "skipped": {id: why}}`` for the experts that fit the served model."""
        pipe = await self._prepared()
        return await asyncio.get_running_loop().run_in_executor(None, self._manifest, pipe)

    @staticmethod
    def _manifest(pipe: InferencePipeline) -> dict[str, Any]:
        records = {r.id: r for r in pipe.adapter_store.list()}
        experts = {e: {"digest": records[e].digest,
                       "fingerprint": records[e].base_model_fingerprint}
                   for e in pipe.installed_experts if e in records}
        rag = pipe.rag_store.current_digests() if pipe.rag_store is not None else {}
        return {"experts": experts, "rag": rag, "skipped": dict(pipe.skipped_experts)}

    async def adapter_files(self, digest: str) -> dict[str, bytes]:
        """The files of the stored adapter object ``digest`` (unchecked: the receiver checks
        them against the digest it asked for)."""
        from r3mes.cache.adapter_store import _DIGEST_RE, ADAPTER_FILES

        pipe = await self._prepared()
        if not _DIGEST_RE.match(digest):
            raise ValueError(f"not an adapter digest: {digest!r}")
        root = pipe.adapter_store.objects / digest
        return {name: (root / name).read_bytes() for name in ADAPTER_FILES}

    async def rag_snapshot(self, index: str, digest: str) -> dict[str, bytes]:
        """Snapshot ``digest`` of ``index`` as an export (``export.json`` and every snapshot
        it builds on), file by file; the receiver's import verifies every digest."""
        pipe = await self._prepared()

        def export() -> dict[str, bytes]:
            with tempfile.TemporaryDirectory(prefix="r3mes-export-") as tmp:
                out = Path(tmp) / "export"
                pipe.rag_store.export(index, out, digest)
                return {str(p.relative_to(out)): p.read_bytes()
                        for p in sorted(out.rglob("*")) if p.is_file()}
        return await asyncio.get_running_loop().run_in_executor(None, export)

    def report(self, replica: str, seq: int, stats: dict[str, Any]) -> None:
        """A replica's latest statistics (a later ``seq`` wins)."""
        with self._lock:
            old = self._fleet.get(replica)
            if old is None or old["seq"] < seq:
                self._fleet[replica] = {"seq": seq, "at": time.time(), **stats}

    def fleet(self) -> dict[str, dict[str, Any]]:
        """Every replica's latest statistics, with ``age_s`` since its last report."""
        now = time.time()
        with self._lock:
            return {r: {**s, "age_s": round(now - s["at"], 3)} for r, s in self._fleet.items()}


# --------------------------------------------------------------------------- engine replica


class AdapterRefused(PipelineError):
    """An adapter whose content or digest is not the one the request was routed with."""


def install_adapter(store: Any, expert: str, digest: str, fingerprint: str | None,
                    files: Mapping[str, bytes]) -> Any:
    """Install fetched adapter ``files`` as ``expert`` into ``store``, refusing them
    (:class:`~r3mes.cache.adapter_store.DigestMismatchError`) unless they hash to ``digest``."""
    from r3mes.cache.adapter_store import ADAPTER_FILES

    with tempfile.TemporaryDirectory(prefix=".ray-fetch-", dir=store.root) as tmp:
        for name in ADAPTER_FILES:
            (Path(tmp) / name).write_bytes(files[name])
        return store.add(tmp, expert, expected_digest=digest, replace=True,
                         base_model_fingerprint=fingerprint, source=f"ray:{digest}")


def install_rag_snapshot(rag_store: Any, index: str, digest: str,
                         files: Mapping[str, bytes]) -> None:
    """Import a fetched snapshot export; it must be snapshot ``digest`` of ``index`` and
    every file must match its manifest (the import checks them all)."""
    import json

    from r3mes.rag import RagError

    header = json.loads(files["export.json"])
    if header.get("index") != index or header.get("digest") != digest:
        raise RagError(f"snapshot for {index}@{digest[:12]} refused: the export is "
                       f"{header.get('index')}@{str(header.get('digest'))[:12]}")
    with tempfile.TemporaryDirectory(prefix=".ray-fetch-", dir=rag_store.root) as tmp:
        for rel, data in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise RagError(f"snapshot for {index} refused: bad member {rel!r}")
            target = Path(tmp) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        rag_store.import_snapshot(tmp)


async def _within(response: Any, what: str, seconds: float = 120.0) -> Any:
    """Await a call to the registry with a deadline. A handle call to a deployment with no
    live replica waits until one is back; a replica that cannot reach the registry for
    ``seconds`` raises instead (at start-up Serve then starts it again rather than keeping
    it STARTING; during a request the request fails cleanly)."""
    async def wait() -> Any:
        return await response
    try:
        return await asyncio.wait_for(wait(), seconds)
    except asyncio.TimeoutError:
        raise RuntimeError(f"no answer for {what} within {seconds:.0f} s") from None


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class R3mesEngine:
    """One r3mes engine: the model loaded once, its own tiered expert cache and RAG copy.

    Args:
        config: the pipeline configuration (``home`` is replaced by a private directory).
        registry: the :class:`R3mesRegistry` handle.
        max_sets: expert sets kept warm on this replica (Ray's multiplexing LRU).
        placement: ``"experts"`` (multiplexed by expert set) or ``"any"`` (Ray's default
            placement; the statistics are kept the same way, for comparison).
    """

    async def __init__(self, config: PipelineConfig, registry: Any, max_sets: int = 4,
                       placement: str = "experts") -> None:
        from r3mes.cache import AdapterStore, AdapterStoreError

        t_start = time.time()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (never in practice)
            self.replica = f"pid{os.getpid()}"
        self.registry = registry
        self.placement = placement
        self.max_sets = max_sets
        self.home = Path(tempfile.mkdtemp(prefix=f"r3mes-replica-{self.replica}-"))
        manifest = await _within(registry.manifest.remote(), "the registry's manifest")
        store = AdapterStore(self.home)
        refused: dict[str, str] = {}
        for expert, info in sorted(manifest["experts"].items()):
            files = await _within(registry.adapter_files.remote(info["digest"]),
                                  f"the files of {expert}")
            try:
                install_adapter(store, expert, info["digest"], info["fingerprint"], files)
            except (AdapterStoreError, OSError, KeyError) as exc:
                refused[expert] = f"refused on replica {self.replica}: {exc}"
                log.warning("expert %s %s", expert, refused[expert])
        rag_store = None
        if config.enable_rag:
            from r3mes.rag import RagStore

            rag_store = RagStore(self.home, embedding_model=config.rag_embedding_model)
        self.config = dataclasses.replace(
            config, home=str(self.home), router_strategy="keyword", experts_dir=None,
            knowledge_dir=None, preload_experts=[])
        # The ingress routes: each request comes with the routed (expert, weight) pairs,
        # which the pipeline takes as forced experts with their weights.
        self.pipe = InferencePipeline(self.config, adapter_store=store, rag_store=rag_store)
        for index, digest in sorted(manifest["rag"].items()):
            await self._sync_index(index, digest)
        await self.pipe.load_model()
        self._use_assigned_cpus()
        if self.pipe.retriever is not None:
            # The embedder loads on first use: here, not inside the first request.
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(
                    None, self.pipe.retrieve, "warm up the retriever")
        log.info("engine replica %s ready in %.1f s", self.replica, time.time() - t_start)
        self.pipe.config.citations = False  # as the server: sources go in r3mes.sources
        self.pipe.skipped_experts.update(refused)
        self.refused = refused
        # Held expert sets, least recently used first: the multiplexing hit accounting.
        self._sets: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._served: collections.Counter[str] = collections.Counter()
        self._counts = {"requests": 0, "set_hits": 0, "set_misses": 0, "failures": 0,
                        "refused": 0}
        self._seq = 0
        self._rag_sync = asyncio.Lock()

        async def load_expert_set(key: str) -> str:
            return await self._load_expert_set(key)

        # Made here, not with a decorator, so that max_sets is a deployment argument.
        self.load_expert_set = serve.multiplexed(max_num_models_per_replica=max_sets)(
            load_expert_set)
        self._report()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            shutil.rmtree(self.home, ignore_errors=True)

    @staticmethod
    def _use_assigned_cpus() -> None:
        """Kernel threads = the CPUs Ray gave this replica (the kernels default to every
        core of the node, and N replicas would each take them all)."""
        import ray

        with contextlib.suppress(Exception):
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                from r3mes import kernels

                kernels.set_num_threads(max(1, round(cpus)))

    # ------------------------------------------------------------------ requests

    async def generate(self, request: dict[str, Any]) -> PipelineResult:
        """Answer one routed request (see :class:`_Request`)."""
        pieces: list[str] = []
        return await self._run(request, pieces.append, None)

    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        """Yield the answer's text pieces, then the :class:`PipelineResult`."""
        async def answer(emit: Any, cancel: threading.Event) -> PipelineResult:
            return await self._run(request, emit, cancel)

        async with contextlib.aclosing(stream_pieces(answer)) as items:
            async for item in items:
                yield item

    async def _run(self, request: dict[str, Any], emit: Any,
                   cancel: threading.Event | None) -> PipelineResult:
        self._counts["requests"] += 1
        key = request["set"]
        self._served[key] += 1
        try:
            self._check_digests(request["digests"])
            await self._sync_rag(request.get("rag") or {})
            if key in self._sets:
                self._counts["set_hits"] += 1
                self._sets.move_to_end(key)
            else:
                self._counts["set_misses"] += 1
                self._sets[key] = None
                while len(self._sets) > self.max_sets:
                    self._sets.popitem(last=False)
            if self.placement == "experts":
                await self.load_expert_set(key)  # Ray learns this replica holds the set
            else:
                await self._load_expert_set(key)
        except Exception as exc:
            self._counts["refused"] += 1
            result = PipelineResult(query=request["query"])
            result.success, result.error, result.finish_reason = False, str(exc), "error"
            result.error_type = "internal"
            self._report()
            return result
        if request["experts"] is not None:
            result = await self._stream_or_run(request, emit, cancel)
        else:  # pragma: no cover - the ingress always routes
            raise InvalidRequestError("the ingress sends routed experts")
        if not result.success:
            self._counts["failures"] += 1
        self._report()
        return result

    async def _stream_or_run(self, request: dict[str, Any], emit: Any,
                             cancel: threading.Event | None) -> PipelineResult:
        return await self.pipe.run(
            request["query"], request["experts"], request["skip_rag"],
            history=request["history"], rag_indices=request["rag_indices"], on_text=emit,
            cancel=cancel, **request["generation"])

    def _check_digests(self, digests: Mapping[str, str]) -> None:
        """Refuse a request routed with adapter content this replica does not hold."""
        for expert, digest in digests.items():
            if expert in self.refused:
                raise AdapterRefused(f"expert {expert} {self.refused[expert]}")
            try:
                mine = self.pipe.adapter_store.get(expert).digest
            except Exception:
                mine = None
            if mine != digest:
                raise AdapterRefused(
                    f"expert {expert}: replica {self.replica} holds digest {mine}, the request "
                    f"was routed with {digest}; not answered with other weights")

    async def _sync_rag(self, wanted: Mapping[str, str]) -> None:
        store = self.pipe.rag_store
        if store is None or not wanted:
            return
        async with self._rag_sync:
            for index, digest in wanted.items():
                if store.current_digest(index) != digest:
                    await self._sync_index(index, digest)

    async def _sync_index(self, index: str, digest: str) -> None:
        store = self.pipe.rag_store
        if store is None:
            return
        files = await _within(self.registry.rag_snapshot.remote(index, digest),
                              f"snapshot {digest[:12]} of index {index}")

        def install() -> None:
            with self.pipe.rag_lock:  # no retrieval reads the index while it changes
                install_rag_snapshot(store, index, digest, files)
        await asyncio.get_running_loop().run_in_executor(None, install)

    async def _load_expert_set(self, key: str) -> str:
        """Multiplexing loader: bring the set's adapters into tier 1 of this replica's
        cache (Ray then routes this set's requests here while it stays in the LRU)."""
        if key == BASE_SET:
            return key
        for part in key.split("+"):
            expert = part.split("@", 1)[0]
            if expert in self.pipe.installed_experts:
                async with self.pipe.cache.use(expert):
                    pass
        return key

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict[str, Any]:
        """This replica's counters, cache and engine statistics."""
        stats = self.pipe.get_stats()
        return {"replica": self.replica, "pid": os.getpid(), "placement": self.placement,
                **self._counts, "sets_held": list(self._sets), "served": dict(self._served),
                "cache": stats.get("cache"), "engine": stats.get("engine"),
                "pipeline": stats["pipeline"], "refused_experts": sorted(self.refused)}

    def _report(self) -> None:
        self._seq += 1
        with contextlib.suppress(Exception):  # statistics never fail a request
            self.registry.report.remote(self.replica, self._seq, self.stats())

    async def check_health(self) -> None:
        """Serve's health check: the engine thread must be alive."""
        engine = self.pipe.engine
        if engine is None or engine.closed:
            raise RuntimeError("the engine is closed")


# --------------------------------------------------------------------------- ingress


class _RemoteEngineView:
    """What the server reads of ``pipeline.engine``: the fleet as one engine."""

    def __init__(self, proxy: RayPipeline) -> None:
        self.proxy = proxy
        self.name = "ray-serve"

    def accepting(self) -> bool:
        return True  # each replica answers 429 itself when its queue is full

    def retry_after(self) -> float:
        return 1.0

    def stats(self) -> dict[str, Any]:
        keys = ("steps", "running", "waiting", "rejected", "kv_blocks_used", "kv_blocks_total",
                "jobs", "tokens")
        out = dict.fromkeys(keys, 0)
        for s in self.proxy.live_replicas().values():
            for k in keys:
                out[k] += int((s.get("engine") or {}).get(k, 0))
        return out


class RayPipeline:
    """The ingress's stand-in for :class:`InferencePipeline`: the same methods the server
    calls, with routing done here and generation on an engine replica.

    A local :class:`InferencePipeline` (initialised, no model loaded) routes, lists the
    experts and serves the RAG endpoints from the registry's data directory."""

    def __init__(self, config: PipelineConfig, engine: Any, registry: Any,
                 placement: str = "experts", retries: int = 1) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.config = config
        self.engine_handle = engine
        self.registry = registry
        self.placement = placement
        self.retries = retries
        self.local = InferencePipeline(config)
        self.engine: _RemoteEngineView | None = None
        self.model_path: Path | None = None
        self.notices: list[str] = []
        self.digests: dict[str, str] = {}
        self.fleet: dict[str, dict[str, Any]] = {}
        self.counters = {"requests": 0, "failures": 0, "retries": 0, "tokens_generated": 0,
                         "replica_lost": 0}

    # -- what the server reads
    @property
    def installed_experts(self) -> list[str]:
        return self.local.installed_experts

    @property
    def retriever(self) -> Any:
        return self.local.retriever

    @property
    def rag_store(self) -> Any:
        return self.local.rag_store

    @property
    def rag_lock(self) -> Any:
        return self.local.rag_lock

    async def load_model(self, path: str | Path | None = None) -> None:
        """Wait for the registry's data directory, then prepare routing (no model here)."""
        from r3mes.serving.inference_pipeline import resolve_model_path

        manifest = await self.registry.manifest.remote()
        await self.local.initialize()
        self.notices = list(self.local.notices)
        # Only experts the registry will hand out are routed to.
        self.local.installed_experts = [e for e in self.local.installed_experts
                                        if e in manifest["experts"]]
        self.digests = {e: i["digest"] for e, i in manifest["experts"].items()}
        self.model_path = resolve_model_path(path or self.config.model_path)
        self.engine = _RemoteEngineView(self)

    async def close(self) -> None:
        await self.local.close()

    async def refresh_fleet(self) -> dict[str, dict[str, Any]]:
        with contextlib.suppress(Exception):
            self.fleet = await self.registry.fleet.remote()
        return self.fleet

    def live_replicas(self, max_age_s: float = 3600.0) -> dict[str, dict[str, Any]]:
        return {r: s for r, s in self.fleet.items() if s.get("age_s", 0) <= max_age_s}

    def get_stats(self) -> dict[str, Any]:
        c = self.counters
        pipeline = {"requests": c["requests"], "failures": c["failures"],
                    "tokens_generated": c["tokens_generated"], "batched_jobs": 0,
                    "mean_overhead_ms": 0.0}
        cache: dict[str, Any] | None = None
        for s in self.live_replicas().values():
            p = s.get("pipeline") or {}
            pipeline["batched_jobs"] += int(p.get("batched_jobs", 0))
            rc = s.get("cache")
            if rc:
                if cache is None:
                    cache = {f"tier{t}": {"hits": 0, "misses": 0, "utilisation": 0.0}
                             for t in (1, 2, 3)}
                for t in (1, 2, 3):
                    tier = rc.get(f"tier{t}") or {}
                    cache[f"tier{t}"]["hits"] += int(tier.get("hits", 0))
                    cache[f"tier{t}"]["misses"] += int(tier.get("misses", 0))
        return {"pipeline": pipeline, "engine": self.engine.stats() if self.engine else None,
                "router": self.local.router.stats.to_dict() if self.local.router else None,
                "cache": cache, "fleet": self.live_replicas()}

    # -- requests
    async def run(self, query: str, force_experts: Sequence[str] | None = None,
                  skip_rag: bool = False, *, vram_gb: float | None = None,
                  history: Sequence[Mapping[str, str]] | None = None,
                  rag_indices: Sequence[str] | None = None, **generation: Any) -> PipelineResult:
        started = time.perf_counter()
        result, request = await self._route(query, force_experts, skip_rag, vram_gb, history,
                                            rag_indices, generation)
        if request is not None:
            result = await self._call(request, result)
        return self._finish(result, started)

    async def run_batch(self, queries: Sequence[str], force_experts: Sequence[str] | None = None,
                        skip_rag: bool = False, **kwargs: Any) -> list[PipelineResult]:
        return list(await asyncio.gather(*(self.run(q, force_experts, skip_rag, **kwargs)
                                           for q in queries)))

    async def run_streaming(self, query: str, force_experts: Sequence[str] | None = None,
                            skip_rag: bool = False, *, vram_gb: float | None = None,
                            history: Sequence[Mapping[str, str]] | None = None,
                            rag_indices: Sequence[str] | None = None,
                            result_holder: list[PipelineResult] | None = None,
                            **generation: Any) -> AsyncIterator[str]:
        started = time.perf_counter()
        routed, request = await self._route(query, force_experts, skip_rag, vram_gb, history,
                                            rag_indices, generation)
        result = routed
        if request is not None:
            for attempt in range(self.retries + 1):
                sent = False
                try:
                    gen = self._handle(request, stream=True).generate_stream.remote(request)
                    async for item in gen:
                        if isinstance(item, PipelineResult):
                            result = self._merge(item, routed)
                        else:
                            sent = True
                            yield item
                    break
                except _REPLICA_GONE as exc:
                    self.counters["replica_lost"] += 1
                    if sent or attempt == self.retries:
                        result = self._lost(routed, exc)
                        break
                    self.counters["retries"] += 1
        result = self._finish(result, started)
        if result_holder is not None:
            result_holder.append(result)
        result.raise_if_failed()

    # -- internals
    async def _route(self, query: str, force_experts: Sequence[str] | None, skip_rag: bool,
                     vram_gb: float | None, history: Sequence[Mapping[str, str]] | None,
                     rag_indices: Sequence[str] | None, generation: Mapping[str, Any],
                     ) -> tuple[PipelineResult, dict[str, Any] | None]:
        """Route as the single-process pipeline does; returns the partial result (routing
        fields filled, or the failure) and the request for a replica (``None`` on failure)."""
        local = self.local
        result = PipelineResult(query=query if isinstance(query, str) else repr(query))
        self.counters["requests"] += 1
        try:
            # Bad options are refused before a replica is involved.
            query, _ = local.check_request(query, generation, force_experts, vram_gb)
            experts = await local.route(query, force_experts, vram_gb=vram_gb, result=result)
        except InvalidRequestError as exc:
            self._fail(result, exc, "unknown_expert" if isinstance(exc, UnknownExpertError)
                       else "invalid_request")
            return result, None
        result.experts_used = experts
        digests = {e: self.digests[e] for e, _ in experts if e in self.digests}
        rag: dict[str, str] = {}
        if not skip_rag and local.rag_store is not None:
            with contextlib.suppress(Exception):
                rag = local.rag_store.current_digests()
        request = {"query": query, "experts": [(e, w) for e, w in experts], "digests": digests,
                   "set": expert_set_key(experts, digests), "skip_rag": skip_rag,
                   "history": [dict(t) for t in history] if history else None,
                   "rag_indices": list(rag_indices) if rag_indices else None,
                   "generation": dict(generation), "rag": rag}
        return result, request

    def _handle(self, request: dict[str, Any], stream: bool = False) -> Any:
        options: dict[str, Any] = {"stream": stream}
        if self.placement == "experts":
            options["multiplexed_model_id"] = request["set"]
        return self.engine_handle.options(**options)

    async def _call(self, request: dict[str, Any], routed: PipelineResult) -> PipelineResult:
        for attempt in range(self.retries + 1):
            try:
                item = await self._handle(request).generate.remote(request)
                return self._merge(item, routed)
            except _REPLICA_GONE as exc:
                self.counters["replica_lost"] += 1
                if attempt == self.retries:
                    return self._lost(routed, exc)
                self.counters["retries"] += 1
        raise AssertionError("unreachable")

    def _lost(self, routed: PipelineResult, exc: BaseException) -> PipelineResult:
        log.warning("engine replica lost: %s", exc)
        self._fail(routed, PipelineError(
            "the engine replica serving this request stopped; retry the request"), "internal")
        return routed

    @staticmethod
    def _merge(remote: PipelineResult, routed: PipelineResult) -> PipelineResult:
        """The replica's answer with the ingress's routing fields."""
        m, r = remote.metrics, routed.metrics
        m.routing_time_ms, m.used_fast_path = r.routing_time_ms, r.used_fast_path
        m.keyword_confidence, m.routing_stages_ms = r.keyword_confidence, r.routing_stages_ms
        remote.routing = routed.routing
        remote.query = routed.query
        return remote

    @staticmethod
    def _fail(result: PipelineResult, exc: Exception, kind: str) -> None:
        result.fail(exc, kind)

    def _finish(self, result: PipelineResult, started: float) -> PipelineResult:
        result.metrics.total_time_ms = (time.perf_counter() - started) * 1e3
        if result.success:
            self.counters["tokens_generated"] += result.metrics.tokens_generated
        else:
            self.counters["failures"] += 1
        return result


def render_fleet_metrics(fleet: Mapping[str, Mapping[str, Any]], proxy: RayPipeline) -> str:
    """Prometheus lines for every engine replica: requests, expert-set (multiplexing) hits,
    tier-1 cache hits and misses, hit rates, the sets held and served."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str,
               samples: list[tuple[dict[str, Any], float]]) -> None:
        from r3mes.serving.server import prometheus_metric

        prometheus_metric(lines, name, kind, help_, samples)

    reps = sorted(fleet.items())
    metric("r3mes_replica_requests_total", "counter", "Requests answered by each engine replica",
           [({"replica": r}, s["requests"]) for r, s in reps])
    metric("r3mes_replica_expert_set_hits_total", "counter",
           "Requests that found their expert set already held by the replica",
           [({"replica": r}, s["set_hits"]) for r, s in reps])
    metric("r3mes_replica_expert_set_misses_total", "counter",
           "Requests whose expert set the replica had to load",
           [({"replica": r}, s["set_misses"]) for r, s in reps])
    metric("r3mes_replica_expert_set_hit_rate", "gauge",
           "Share of a replica's requests whose expert set it already held",
           [({"replica": r}, round(s["set_hits"] / max(1, s["set_hits"] + s["set_misses"]), 6))
            for r, s in reps])
    tier1 = [(r, (s.get("cache") or {}).get("tier1") or {}) for r, s in reps]
    metric("r3mes_replica_cache_hits_total", "counter", "Tier-1 expert cache hits by replica",
           [({"replica": r, "tier": 1}, t.get("hits", 0)) for r, t in tier1])
    metric("r3mes_replica_cache_misses_total", "counter", "Tier-1 expert cache misses by replica",
           [({"replica": r, "tier": 1}, t.get("misses", 0)) for r, t in tier1])
    metric("r3mes_replica_cache_hit_rate", "gauge", "Tier-1 expert cache hit rate by replica",
           [({"replica": r, "tier": 1}, round(t.get("hit_rate") or 0.0, 6)) for r, t in tier1])
    metric("r3mes_replica_expert_set_requests_total", "counter",
           "Requests by replica and expert set (the multiplexed model id)",
           [({"replica": r, "expert_set": k}, n) for r, s in reps
            for k, n in sorted(s["served"].items())])
    metric("r3mes_replica_expert_set_held", "gauge", "Expert sets a replica holds now",
           [({"replica": r, "expert_set": k}, 1) for r, s in reps for k in s["sets_held"]])
    metric("r3mes_replica_report_age_seconds", "gauge", "Seconds since a replica last reported",
           [({"replica": r}, s.get("age_s", 0.0)) for r, s in reps])
    c = proxy.counters
    metric("r3mes_ingress_replica_lost_total", "counter",
           "Engine calls that failed because their replica stopped", [({}, c["replica_lost"])])
    metric("r3mes_ingress_retries_total", "counter",
           "Requests retried on another replica after one stopped", [({}, c["retries"])])
    return "\n".join(lines) + "\n"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class R3mesIngress:
    """The HTTP entry: :func:`r3mes.serving.server.create_app` over a :class:`RayPipeline`,
    with the engine replicas' statistics added to ``/metrics``."""

    def __init__(self, settings: Any, config: PipelineConfig, engine: Any, registry: Any,
                 placement: str = "experts") -> None:
        self.settings = settings
        self.proxy = RayPipeline(config, engine, registry, placement=placement)

    def __serve_build_asgi_app__(self) -> Any:
        from starlette.requests import Request
        from starlette.responses import Response

        from r3mes.serving.server import create_app

        app = create_app(pipeline=self.proxy, settings=self.settings)  # type: ignore[arg-type]
        proxy = self.proxy

        @app.middleware("http")
        async def fleet_metrics(request: Request, call_next: Any) -> Response:
            if request.url.path != "/metrics" or request.method != "GET":
                return await call_next(request)
            fleet = await proxy.refresh_fleet()
            response = await call_next(request)
            if response.status_code != 200:
                return response
            body = b"".join([chunk async for chunk in response.body_iterator])
            body += render_fleet_metrics(fleet, proxy).encode()
            headers = {k: v for k, v in response.headers.items() if k != "content-length"}
            return Response(body, status_code=200, headers=headers)

        return app


# --------------------------------------------------------------------------- building


def build_app(settings: Any, config: PipelineConfig | None = None, *, replicas: int = 2,
              replica_cpus: float = 1.0, max_sets_per_replica: int = 4,
              placement: str = "experts", max_ongoing_requests: int | None = None,
              autoscaling: Mapping[str, Any] | None = None) -> Any:
    """The Ray Serve application (``serve.run(build_app(settings))``).

    ``replicas`` engine replicas of ``replica_cpus`` CPUs each (or ``autoscaling``, Ray
    Serve's ``autoscaling_config``), each keeping ``max_sets_per_replica`` expert sets warm.
    ``placement="any"`` turns expert-aware placement off (for comparison)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    config = config or PipelineConfig.from_settings(settings)
    ongoing = max_ongoing_requests or max(8, config.max_batch_size + config.max_queue // 2)
    registry = R3mesRegistry.bind(config)
    engine_opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": replica_cpus},
                                   "max_ongoing_requests": ongoing}
    if autoscaling:
        engine_opts["autoscaling_config"] = dict(autoscaling)
    else:
        engine_opts["num_replicas"] = replicas
    engine = R3mesEngine.options(**engine_opts).bind(config, registry, max_sets_per_replica,
                                                     placement)
    return R3mesIngress.bind(settings, config, engine, registry, placement)


def app_builder(args: Mapping[str, Any]) -> Any:
    """Entry point for ``serve deploy`` / ``serve run`` configs
    (``import_path: r3mes.serving.ray_app:app_builder``). ``args``: ``home``, ``config``
    (a YAML file), ``overrides`` (dotted keys as ``r3mes --set``), ``replicas``,
    ``replica_cpus``, ``max_sets_per_replica``, ``placement``, ``autoscaling``."""
    from r3mes.config import load_config

    args = dict(args or {})
    settings = load_config(args.get("config"), home=args.get("home"),
                           overrides=dict(args.get("overrides") or {}))
    config = PipelineConfig.from_settings(settings, home=args.get("home"))
    return build_app(settings, config, replicas=int(args.get("replicas", 2)),
                     replica_cpus=float(args.get("replica_cpus", 1.0)),
                     max_sets_per_replica=int(args.get("max_sets_per_replica", 4)),
                     placement=str(args.get("placement", "experts")),
                     autoscaling=args.get("autoscaling"))


def serve_on_ray(settings: Any, config: PipelineConfig, *, replicas: int = 2,
                 address: str | None = None, replica_cpus: float = 1.0,
                 max_sets_per_replica: int = 4, placement: str = "experts",
                 block: bool = True) -> None:
    """``r3mes serve --ray``: start (or join, with ``address``) a Ray cluster, run the
    application on ``settings.server.host:port`` and block until interrupted; the Serve
    application and a cluster started here are shut down on the way out."""
    import ray

    started_here = address is None
    if started_here:
        # Enough logical CPUs for the replicas (ingress and registry take none).
        ray.init(address="local", num_cpus=max(1, int(round(replicas * replica_cpus))),
                 include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
        serve.run(build_app(settings, config, replicas=replicas, replica_cpus=replica_cpus,
                            max_sets_per_replica=max_sets_per_replica, placement=placement),
                  name=APP_NAME, route_prefix="/")
        if block:
            while True:
                time.sleep(3600)
    finally:
        if block:
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            if started_here:
                with contextlib.suppress(Exception):
                    serve.shutdown()
                ray.shutdown()


__all__ = ["APP_NAME", "GENERAL_EXPERT", "R3mesEngine", "R3mesIngress", "R3mesRegistry",
           "RayPipeline", "app_builder", "build_app", "expert_set_key", "install_adapter",
           "install_rag_snapshot", "render_fleet_metrics", "serve_on_ray"]
