"""The HTTP server (``r3mes serve``): OpenAI-compatible completions over the pipeline.

Endpoints (JSON in and out; errors in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``):

- ``POST /v1/chat/completions`` and ``POST /v1/completions``, streaming with
  ``"stream": true`` (server-sent events, ``data: {...}`` chunks then ``data: [DONE]``).
  ``model`` is ``"auto"`` (or the base model's name) for routed experts, an expert id
  (``"medical_dora"``) or several joined by ``+`` to force them, or ``"base"`` for the base
  model alone: the convention multi-adapter servers use. r3mes extensions in the request:
  ``rag`` (bool), ``rag_indices``, ``vram_gb``, ``citations`` (bool: also list the sources
  at the end of the text; off by default); in the response: ``r3mes`` (experts and weights,
  fast path, sources with ``cited`` flags, per-stage timings, ``warnings`` naming a broken
  expert or index the answer did without). Fields have OpenAI's JSON types: ``true`` is not
  a number and ``"5"`` not an integer (400).
- ``GET /v1/models``: ``auto``, ``base``, the base model's name and every installed expert;
  ``GET /v1/models/{id}`` one of them (404 otherwise).
- ``GET /openapi.json``: the OpenAPI schema, request bodies included.
- ``POST /api/v1/rag/search`` ``{"query", "top_k", "indices", "filters", "mode"}``.
- ``POST /api/v1/rag/documents`` ``{"index", "documents": [{"doc_id", "text", "metadata"}]}``.
- ``GET /health`` (never needs the API key) and ``GET /metrics`` (Prometheus text format).

Limits, each a clear 4xx: a body over ``server.max_request_bytes`` -> 413; malformed JSON or
a bad field -> 400; ``max_tokens`` over ``server.max_tokens_limit`` or a prompt over
``server.max_prompt_chars`` -> 400; an unknown model -> 404; more than
``server.max_concurrent_requests`` in flight -> 429; a missing or wrong API key -> 401.
Unknown paths (404) and methods (405) answer in the same error shape; a client that hangs
up mid-body is a 400, not a server error. Every failure is caught per request: a failing
request never takes the server down.
Concurrent requests are batched by the pipeline (see :mod:`r3mes.serving.engine`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from r3mes.errors import R3mesError
from r3mes.serving.inference_pipeline import (
    GENERAL_EXPERT,
    SEED_MAX,
    SEED_MIN,
    InferencePipeline,
    InvalidRequestError,
    PipelineConfig,
    PipelineResult,
)

log = logging.getLogger(__name__)

ROUTED_MODELS = ("auto",)
BASE_MODEL_ALIAS = "base"


# --------------------------------------------------------------------------- errors


class APIError(R3mesError):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content={"error": {
            "message": self.message, "type": self.type, "param": self.param,
            "code": self.code}})


def _overloaded(message: str, retry_after: float) -> APIError:
    """429 with Retry-After: the engine's queue is full (see r3mes.serving.engine)."""
    return APIError(429, message, type_="rate_limit_error", code="engine_overloaded",
                    headers={"Retry-After": str(max(1, int(retry_after)))})


# --------------------------------------------------------------------------- schemas


class _Body(BaseModel):
    # OpenAI clients send fields r3mes does not use (user, logprobs, ...): accept them.
    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content
                           if p.get("type") == "text")
        return self.content or ""


# JSON types as OpenAI's API has them: no true for a number, no "5" for an integer.
class _Sampling(_Body):
    model: str = "auto"
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)
    repetition_penalty: StrictFloat | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)
    rag: StrictBool = True
    rag_indices: list[str] | None = None
    vram_gb: StrictFloat | None = Field(None, ge=0)
    # r3mes: also list the sources at the end of the text (they are always in r3mes.sources)
    citations: StrictBool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class RagSearchRequest(_Body):
    query: str = Field(min_length=1)
    top_k: StrictInt = Field(5, ge=1, le=100)
    indices: list[str] | None = None
    filters: dict[str, Any] | None = None
    mode: Literal["dense", "sparse", "hybrid"] | None = None


class RagDocument(_Body):
    doc_id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


class RagDocumentsRequest(_Body):
    index: str = "user"
    documents: list[RagDocument] = Field(min_length=1, max_length=1000)


# --------------------------------------------------------------------------- metrics


class ServerMetrics:
    """Counters for ``/metrics`` (Prometheus text exposition format 0.0.4)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency_sum: Counter[str] = Counter()
        self.latency_count: Counter[str] = Counter()
        self.in_flight = 0
        self.started = time.time()

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] += 1
            self.latency_sum[path] += seconds
            self.latency_count[path] += 1

    def render(self, pipeline: InferencePipeline | None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str,
                   samples: list[tuple[dict[str, Any], float]]) -> None:
            prometheus_metric(lines, name, kind, help_, samples)

        with self.lock:
            metric("r3mes_http_requests_total", "counter", "HTTP requests by path and status",
                   [({"path": p, "status": s}, n) for (p, s), n in sorted(self.requests.items())])
            metric("r3mes_http_request_seconds_sum", "counter", "Total request seconds by path",
                   [({"path": p}, round(v, 6)) for p, v in sorted(self.latency_sum.items())])
            metric("r3mes_http_request_seconds_count", "counter", "Requests timed by path",
                   [({"path": p}, n) for p, n in sorted(self.latency_count.items())])
            metric("r3mes_http_requests_in_flight", "gauge", "Requests being served",
                   [({}, self.in_flight)])
        metric("r3mes_uptime_seconds", "gauge", "Seconds since the server started",
               [({}, round(time.time() - self.started, 3))])
        if pipeline is not None:
            stats = pipeline.get_stats()
            p = stats["pipeline"]
            metric("r3mes_pipeline_requests_total", "counter", "Pipeline queries",
                   [({}, p["requests"])])
            metric("r3mes_pipeline_failures_total", "counter", "Failed pipeline queries",
                   [({}, p["failures"])])
            metric("r3mes_tokens_generated_total", "counter", "Tokens generated",
                   [({}, p["tokens_generated"])])
            metric("r3mes_generation_batched_jobs_total", "counter",
                   "Generations run by the engine", [({}, p["batched_jobs"])])
            engine = stats.get("engine") or {}
            if engine:
                metric("r3mes_engine_decode_steps_total", "counter",
                       "Decode steps run (one token for every running request)",
                       [({}, engine["steps"])])
                metric("r3mes_engine_running_requests", "gauge",
                       "Requests decoding in the batch", [({}, engine["running"])])
                metric("r3mes_engine_waiting_requests", "gauge",
                       "Requests waiting for a batch row", [({}, engine["waiting"])])
                metric("r3mes_engine_rejected_total", "counter",
                       "Requests refused with 429 (queue full)", [({}, engine["rejected"])])
                metric("r3mes_engine_packed_prefills_total", "counter",
                       "Prefills of several joining requests in one pass",
                       [({}, engine.get("packed_prefills", 0))])
                metric("r3mes_kv_cache_blocks", "gauge", "KV-cache blocks by state",
                       [({"state": "used"}, engine["kv_blocks_used"]),
                        ({"state": "total"}, engine["kv_blocks_total"])])
            metric("r3mes_pipeline_mean_overhead_ms", "gauge",
                   "Mean time per query outside token generation", [({}, p["mean_overhead_ms"])])
            router = stats.get("router") or {}
            if router:
                metric("r3mes_router_fast_path_rate", "gauge", "Share of routes on the fast path",
                       [({}, router["fast_path_rate"])])
                metric("r3mes_router_routes_total", "counter", "Queries routed",
                       [({}, router["routes"])])
            cache = stats.get("cache") or {}
            if cache:
                metric("r3mes_cache_hits_total", "counter", "Expert cache hits by tier",
                       [({"tier": t}, cache[f"tier{t}"]["hits"]) for t in (1, 2, 3)])
                metric("r3mes_cache_misses_total", "counter", "Expert cache misses by tier",
                       [({"tier": t}, cache[f"tier{t}"]["misses"]) for t in (1, 2, 3)])
                metric("r3mes_cache_utilisation", "gauge", "Expert cache tier utilisation",
                       [({"tier": t}, cache[f"tier{t}"]["utilisation"] or 0.0)
                        for t in (1, 2, 3)])
        return "\n".join(lines) + "\n"


def prometheus_metric(lines: list[str], name: str, kind: str, help_: str,
                      samples: list[tuple[dict[str, Any], float]]) -> None:
    """Appends one metric, its HELP and TYPE lines and a line a sample, in Prometheus' text
    format."""
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# --------------------------------------------------------------------------- the app


def _start_miner_sync(settings: Any, pipe: Any) -> Any:
    """With ``miner_node.sync_from_serving``, pull the serving node's snapshots now and on an
    interval (:class:`r3mes.distribution.sync.MinerSync`); None otherwise."""
    miner = getattr(settings, "miner_node", None)
    if miner is None or not miner.sync_from_serving:
        return None
    from r3mes.distribution import open_source
    from r3mes.distribution.sync import MinerSync

    ipfs = settings.ipfs
    sync = MinerSync(getattr(pipe.config, "home", None), miner.serving_url,
                     lambda: open_source(ipfs.api, ipfs.gateway), miner.indices,
                     miner.interval_s)  # its own store: the server's sees the new ref
    sync.start()
    return sync


def create_app(pipeline: InferencePipeline | None = None, *, settings: Any = None,
               pipeline_config: PipelineConfig | None = None) -> FastAPI:
    """The FastAPI application.

    ``pipeline``: a pipeline to serve (loaded at start-up if it is not yet);
    otherwise one is built from ``pipeline_config`` (or ``settings``) when the server
    starts, on the server's own event loop. ``settings`` is an
    :class:`r3mes.config.R3mesConfig` (its ``server`` section sets limits and the key).
    """
    if settings is None:
        from r3mes.config import R3mesConfig

        settings = R3mesConfig()
    server = settings.server
    metrics = ServerMetrics()
    state: dict[str, Any] = {"pipeline": pipeline, "error": None}
    slots = {"in_flight": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipe = state["pipeline"]
        if pipe is None:
            pipe = InferencePipeline(pipeline_config or PipelineConfig.from_settings(settings))
            state["pipeline"] = pipe
        # Over the API the sources go in the r3mes.sources field; the text lists them only
        # when a request asks ("citations": true), so "hi" is answered with just the answer.
        pipe.config.citations = False
        await pipe.load_model()
        for notice in pipe.notices:  # once, in the server's log (the demo model, ...)
            log.warning("%s", notice)
        sync = _start_miner_sync(settings, pipe)
        try:
            yield
        finally:
            if sync is not None:
                sync.stop()
            await pipe.close()

    app = FastAPI(title="r3mes", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    _describe_bodies(app)

    def pipe() -> InferencePipeline:
        return state["pipeline"]

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        path = request.url.path
        response: Response
        try:
            _check_auth(request, server.api_key, path)
            if request.method == "POST":
                await _check_size(request, server.max_request_bytes)
            if path.startswith(("/v1/", "/api/")):
                if slots["in_flight"] >= server.max_concurrent_requests:
                    raise APIError(429, f"more than {server.max_concurrent_requests} requests "
                                   "in flight; retry later", type_="rate_limit_error",
                                   code="too_many_requests")
                slots["in_flight"] += 1
                metrics.in_flight = slots["in_flight"]
                try:
                    response = await call_next(request)
                finally:
                    slots["in_flight"] -= 1
                    metrics.in_flight = slots["in_flight"]
            else:
                response = await call_next(request)
        except APIError as exc:
            response = exc.response()
        except Exception as exc:  # never let one request take the server down
            log.exception("request to %s failed", path)
            response = APIError(500, f"internal error: {exc}", type_="server_error").response()
        metrics.observe(path if path in _KNOWN_PATHS else "other", response.status_code,
                        time.perf_counter() - start)
        return response

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods answer in OpenAI's error shape too, not {"detail": ...}.
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = APIError(exc.status_code, str(exc.detail), code=kind).response()
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        p = pipe()
        return {"status": "ok" if p is not None and p.engine is not None else "starting",
                "model": str(p.model_path) if p is not None and p.model_path else None,
                "backend": p.engine.name if p is not None and p.engine else None,
                "experts": p.installed_experts if p is not None else []}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(pipe()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(metrics.started)
        ids = ["auto", server.model_name, BASE_MODEL_ALIAS] + [
            e for e in pipe().installed_experts]
        return {"object": "list", "data": [
            {"id": i, "object": "model", "created": created, "owned_by": "r3mes",
             "r3mes_kind": "routed" if i in ("auto", server.model_name) else
             "base" if i == BASE_MODEL_ALIAS else "expert"} for i in dict.fromkeys(ids)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        listed = {m["id"]: m for m in (await models())["data"]}
        if model_id not in listed:
            raise APIError(404, f"model '{model_id}' does not exist; see GET /v1/models",
                           param="model", code="model_not_found")
        return listed[model_id]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest, server.max_request_bytes)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must be from the user", param="messages")
        query = messages[-1]["content"]
        history = messages[:-1]
        chars = sum(len(m["content"]) for m in messages)
        return await _complete(body, query, history, chars, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest, server.max_request_bytes)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) > 1:
            if body.stream:
                raise APIError(400, "streaming takes a single prompt", param="prompt")
            return await _complete_many(body, prompts)
        return await _complete(body, prompts[0], [], len(prompts[0]), chat=False)

    @app.post("/api/v1/rag/search")
    async def rag_search(request: Request) -> dict[str, Any]:
        body = await _parse(request, RagSearchRequest, server.max_request_bytes)
        p = pipe()
        if p.retriever is None:
            raise APIError(409, "retrieval is disabled on this server (rag.enabled: false)")
        from r3mes.rag import RagError

        loop = asyncio.get_running_loop()

        def search() -> list[Any]:
            with p.rag_lock:
                return p.retriever.search(body.query, top_k=body.top_k, indices=body.indices,
                                          filters=body.filters, mode=body.mode)
        try:
            hits = await loop.run_in_executor(None, search)
        except RagError as exc:
            raise APIError(400, str(exc), param="query") from exc
        return {"query": body.query, "hits": [h.to_dict() for h in hits]}

    @app.get("/api/v1/ipfs/published")
    async def ipfs_published() -> dict[str, Any]:
        """The index snapshots this node published over IPFS (what miner nodes pull)."""
        from r3mes.distribution.sync import published

        return {"indices": published(getattr(pipe().config, "home", None))}

    @app.post("/api/v1/rag/documents")
    async def rag_documents(request: Request) -> dict[str, Any]:
        body = await _parse(request, RagDocumentsRequest, server.max_request_bytes)
        p = pipe()
        from r3mes.rag import Document, RagError

        loop = asyncio.get_running_loop()

        def add() -> dict[str, Any]:
            if p.rag_store is None:
                raise APIError(409, "retrieval is disabled on this server")
            docs = [Document(d.doc_id, d.text, d.metadata) for d in body.documents]
            p.rag_store.ensure_room_for(docs)
            with p.rag_lock, p.rag_store.lock():
                counts = p.rag_store.index(body.index).add_documents(docs)
                snap = p.rag_store.save(body.index)
            return {"index": body.index, **counts, "snapshot": snap.digest}
        try:
            return await loop.run_in_executor(None, add)
        except RagError as exc:
            raise APIError(400, str(exc), param="documents") from exc
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            from r3mes.utils.diskspace import disk_full_message

            raise APIError(507, disk_full_message(exc), type_="server_error",
                           code="insufficient_storage") from exc

    # -------------------------------------------------------------- completions

    def _experts_for(model: str) -> list[str] | None:
        if model in ROUTED_MODELS or model == server.model_name:
            return None
        if model == BASE_MODEL_ALIAS:
            return []
        ids = [m for m in model.split("+") if m]
        installed = set(pipe().installed_experts) | {GENERAL_EXPERT}
        unknown = [m for m in ids if m not in installed]
        if not ids or unknown:
            raise APIError(404, f"model '{model}' does not exist: use 'auto', "
                           f"'{BASE_MODEL_ALIAS}' or an installed expert "
                           f"({', '.join(sorted(pipe().installed_experts)) or 'none'}); see "
                           "GET /v1/models", param="model", code="model_not_found")
        return ids

    def _run_kwargs(body: _Sampling, chars: int) -> dict[str, Any]:
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > server.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of "
                           f"{server.max_tokens_limit}", param="max_tokens",
                           code="max_tokens_exceeded")
        if chars > server.max_prompt_chars:
            raise APIError(400, f"the prompt is {chars} characters, over this server's limit "
                           f"of {server.max_prompt_chars}", param="messages",
                           code="context_length_exceeded")
        return {
            "force_experts": _experts_for(body.model), "skip_rag": not body.rag,
            "vram_gb": body.vram_gb, "rag_indices": body.rag_indices,
            "max_new_tokens": max_tokens, "temperature": body.temperature,
            "top_p": body.top_p, "top_k": body.top_k,
            "repetition_penalty": body.repetition_penalty, "stop": body.stop,
            "seed": body.seed,
        }

    async def _complete(body: _Sampling, query: str, history: list[dict[str, str]],
                        chars: int, chat: bool) -> Response:
        kwargs = _run_kwargs(body, chars)
        if not query.strip():
            raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            # Refused before the stream starts: once it has, the status line is sent.
            engine = pipe().engine
            if engine is not None and not engine.accepting():
                raise _overloaded("the server is busy: the request queue is full",
                                  engine.retry_after())
            return StreamingResponse(_stream(body, query, history, kwargs, rid, created, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await pipe().run(query, history=history or None, **kwargs)
        _raise_for(result)
        if body.citations:
            result.output += _sources_block(result, bool(result.output))
        return JSONResponse(_completion_body(result, body.model, rid, created, chat))

    async def _complete_many(body: CompletionRequest, prompts: list[str]) -> Response:
        kwargs = _run_kwargs(body, max(len(p) for p in prompts))
        results = await pipe().run_batch(prompts, **kwargs)
        for r in results:
            _raise_for(r)
            if body.citations:
                r.output += _sources_block(r, bool(r.output))
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        out = _completion_body(results[0], body.model, rid, created, chat=False)
        out["choices"] = [_choice(r, i, chat=False) for i, r in enumerate(results)]
        out["usage"] = _usage(results)
        out["r3mes"] = [_extension(r) for r in results]
        return JSONResponse(out)

    async def _stream(body: _Sampling, query: str, history: list[dict[str, str]],
                      kwargs: dict[str, Any], rid: str, created: int,
                      chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        holder: list[PipelineResult] = []

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {}
                if first:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish,
                          "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                          "model": body.model, "choices": [choice]},
                                         ensure_ascii=False) + "\n\n"

        if chat:
            yield chunk(None, None, first=True)
        try:
            async for piece in pipe().run_streaming(query, history=history or None,
                                                    result_holder=holder, **kwargs):
                yield chunk(piece, None)
        except Exception as exc:  # headers are sent: report the error in the stream
            kind = "invalid_request_error" if isinstance(exc, InvalidRequestError) \
                else "server_error"
            yield "data: " + json.dumps({"error": {"message": str(exc), "type": kind,
                                                   "param": None, "code": None}}) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        result = holder[0]
        if body.citations and result.sources:
            yield chunk(_sources_block(result, bool(result.output)), None)
        final = json.loads(chunk(None, _finish(result))[len("data: "):])
        if chat:
            final["choices"][0]["delta"] = {}
        final["usage"] = _usage([result])
        final["r3mes"] = _extension(result)
        yield "data: " + json.dumps(final, ensure_ascii=False) + "\n\n"
        yield "data: [DONE]\n\n"

    return app


_KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                "/api/v1/rag/search", "/api/v1/rag/documents"}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("r3mes")
    except Exception:  # running from a source tree without metadata
        return "0"


def _check_auth(request: Request, api_key: str | None, path: str) -> None:
    if not api_key or path == "/health":
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.headers.get(
        "x-api-key", "")
    if not given or not secrets.compare_digest(given.encode(), api_key.encode()):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type_="authentication_error", code="invalid_api_key")


async def _check_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError as exc:
            raise APIError(400, "malformed Content-Length header") from exc
        if too_big:
            raise APIError(413, f"request body of {declared} bytes is over the limit of "
                           f"{limit} bytes", code="request_too_large")
        return


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read at most ``limit`` bytes far (a chunked upload declares no length)."""
    size, chunks = 0, []
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(part)
    except ClientDisconnect:
        # The client went away mid-body: its fault, nobody reads the answer, no traceback.
        raise APIError(400, "the request body ended before its declared length "
                       "(the client disconnected)", code="incomplete_body") from None
    return b"".join(chunks)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


async def _parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    raw = await _read_body(request, limit)
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})",
                       code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{field}: {err['msg']}", param=field or None) from exc


def _raise_for(result: PipelineResult) -> None:
    if result.success:
        return
    if result.error_type == "unknown_expert":
        raise APIError(404, result.error or "unknown model", param="model",
                       code="model_not_found")
    if result.error_type == "invalid_request":
        raise APIError(400, result.error or "invalid request")
    if result.error_type == "overloaded":
        raise _overloaded(f"the server is busy: {result.error}", result.retry_after or 1.0)
    raise APIError(500, f"the query failed: {result.error}", type_="server_error")


def _finish(result: PipelineResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(results: list[PipelineResult]) -> dict[str, int]:
    prompt = sum(r.metrics.prompt_tokens for r in results)
    completion = sum(r.metrics.tokens_generated for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _extension(result: PipelineResult) -> dict[str, Any]:
    data = result.to_dict()
    return {k: data[k] for k in ("experts_used", "fast_path", "sources", "metrics",
                                 "masked_terms", "warnings")}


def _sources_block(result: PipelineResult, after_text: bool) -> str:
    """The "Sources:" block for a request with ``"citations": true`` (the cited sources,
    or every retrieved one when the answer cites none); empty without sources."""
    from r3mes.serving.postprocess import format_sources

    if not result.sources:
        return ""
    listed = [s for s in result.sources if s.get("cited")] or result.sources
    return ("\n\n" if after_text else "") + format_sources(listed)


def _describe_bodies(app: FastAPI) -> None:
    """Publish the JSON bodies the POST endpoints take in ``/openapi.json`` (they are parsed
    by hand, with r3mes' own limits and error shape, so FastAPI cannot see them)."""
    bodies = {"/v1/chat/completions": ChatCompletionRequest,
              "/v1/completions": CompletionRequest,
              "/api/v1/rag/search": RagSearchRequest,
              "/api/v1/rag/documents": RagDocumentsRequest}
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        refs, defs = models_json_schema([(m, "validation") for m in bodies.values()],
                                        ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        for path, model in bodies.items():
            operation = schema["paths"][path]["post"]
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(model, "validation")]}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _choice(result: PipelineResult, index: int, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": result.output},
                "finish_reason": _finish(result), "logprobs": None}
    return {"index": index, "text": result.output, "finish_reason": _finish(result),
            "logprobs": None}


def _completion_body(result: PipelineResult, model: str, rid: str, created: int,
                     chat: bool) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [_choice(result, 0, chat)],
            "usage": _usage([result]), "r3mes": _extension(result)}


def serve(settings: Any, pipeline_config: PipelineConfig | None = None, *,
          log_level: str = "info") -> None:
    """Run the server in the foreground (``r3mes serve``) until interrupted."""
    import uvicorn

    app = create_app(settings=settings, pipeline_config=pipeline_config)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port,
                log_level=log_level, timeout_graceful_shutdown=5)
