"""What one query returns: :class:`PipelineResult` and its :class:`PipelineMetrics`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from r3mes.serving.errors import InvalidRequestError, PipelineError


@dataclass
class PipelineMetrics:
    """Per-query measurements (the seed's fields, then r3mes' additions). Times in ms."""

    total_time_ms: float = 0.0
    rag_time_ms: float = 0.0
    routing_time_ms: float = 0.0
    loading_time_ms: float = 0.0
    inference_time_ms: float = 0.0
    rag_docs_retrieved: int = 0
    rag_context_length: int = 0
    used_fast_path: bool = False
    keyword_confidence: float = 0.0
    adapters_loaded: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    tokens_generated: int = 0
    backend_used: str = ""
    # additions
    prefetch_time_ms: float = 0.0
    postprocess_time_ms: float = 0.0
    queue_time_ms: float = 0.0
    time_to_first_token_ms: float | None = None
    prompt_tokens: int = 0
    batch_size: int = 1
    routing_stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def overhead_ms(self) -> float:
        """Everything but token generation (what the pipeline adds around the model)."""
        return max(0.0, self.total_time_ms - self.inference_time_ms)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = round(value, 4)
        data["routing_stages_ms"] = {k: round(v, 4) for k, v in self.routing_stages_ms.items()}
        data["overhead_ms"] = round(self.overhead_ms, 4)
        return data


@dataclass
class PipelineResult:
    """The answer to one query and how it was produced.

    ``output`` is the post-processed text; ``tokens`` the generated ids; ``experts_used``
    ``[(expert_id, weight)]`` as routed (or forced); ``sources`` the retrieved chunks
    (``{"number", "doc_id", "chunk_id", "index", "title", "source", "score", "cited"}``);
    ``success=False`` carries ``error`` and ``error_type`` (``"invalid_request"``,
    ``"unknown_expert"``, ``"overloaded"`` with ``retry_after`` seconds, ``"internal"``)
    instead of raising. ``warnings`` says which broken
    expert or index the answer was given without (the rest still answered).
    """

    query: str
    output: str = ""
    tokens: list[int] = field(default_factory=list)
    experts_used: list[tuple[str, float]] = field(default_factory=list)
    rag_context: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    metrics: PipelineMetrics = field(default_factory=PipelineMetrics)
    success: bool = True
    error: str | None = None
    error_type: str | None = None
    retry_after: float | None = None  # with error_type "overloaded"
    finish_reason: str | None = None
    routing: dict[str, Any] | None = None
    masked_terms: list[str] = field(default_factory=list)
    #: parts this query had to do without (a broken expert or index), one line each
    warnings: list[str] = field(default_factory=list)

    def raise_if_failed(self) -> None:
        """Raises the failure as an exception: InvalidRequestError for the caller's mistakes
        (``invalid_request``, ``unknown_expert``), PipelineError otherwise."""
        if self.success:
            return
        cls = InvalidRequestError if self.error_type in (
            "invalid_request", "unknown_expert") else PipelineError
        raise cls(self.error or "the query failed")

    def fail(self, exc: BaseException, kind: str) -> None:
        """Record ``exc`` as this query's failure of type ``kind`` (see the class notes)."""
        self.success = False
        self.error = str(exc) or type(exc).__name__
        self.error_type = kind
        self.finish_reason = "error"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the ``r3mes ask --json`` schema)."""
        return {
            "query": self.query, "output": self.output, "success": self.success,
            "error": self.error, "error_type": self.error_type,
            "finish_reason": self.finish_reason,
            "experts_used": [{"id": e, "weight": round(w, 6)} for e, w in self.experts_used],
            "fast_path": self.metrics.used_fast_path,
            "sources": self.sources, "rag_context": self.rag_context,
            "tokens": list(self.tokens), "metrics": self.metrics.to_dict(),
            "routing": self.routing, "masked_terms": self.masked_terms,
            "warnings": list(self.warnings),
        }
