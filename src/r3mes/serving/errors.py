"""The pipeline's errors (importable without loading the pipeline)."""

from __future__ import annotations

from r3mes.errors import R3mesError


class PipelineError(R3mesError, RuntimeError):
    """Base class of the pipeline's own errors."""


class ModelNotFoundError(PipelineError, FileNotFoundError):
    """No model to load; the message says what to pass."""


class InvalidRequestError(PipelineError, ValueError):
    """A request the pipeline refuses (empty query, unknown expert, bad parameter)."""


class UnknownExpertError(InvalidRequestError):
    """A forced expert is not installed."""
