"""Serving: the inference pipeline (router + RAG + expert cache + backend), post-processing,
the OpenAI-compatible HTTP server and the ``ask``/``chat``/``serve``/``config`` commands.

The pipeline is imported lazily so that ``import r3mes.serving`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "InferencePipeline", "InvalidRequestError", "ModelNotFoundError", "PipelineConfig",
    "PipelineError", "PipelineMetrics", "PipelineResult", "UnknownExpertError",
    "create_pipeline", "resolve_model_path",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from r3mes.serving import inference_pipeline

        return getattr(inference_pipeline, name)
    raise AttributeError(f"module 'r3mes.serving' has no attribute {name!r}")
