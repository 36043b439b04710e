"""Exceptions of the RAG layer. Each message names the file, index or argument at fault."""

from __future__ import annotations

from r3mes.errors import R3mesError


class RagError(R3mesError):
    """Base class of every error this package raises on bad input or bad stored state."""


class DocumentError(RagError, ValueError):
    """A document or input file cannot be indexed (empty, binary, oversized, malformed)."""


class QueryError(RagError, ValueError):
    """A query is unusable (empty, too long) or names an unknown index."""


class UnknownIndexError(QueryError, KeyError):
    """An index name that is not one of the named indices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IndexCorruptedError(RagError):
    """A stored index, snapshot or manifest fails validation; nothing was changed."""


class StaleIndexError(RagError):
    """An index copy is older than its current snapshot: saving it would lose another
    writer's changes, so it is refused."""


class RerankerUnavailableError(RagError):
    """Reranking was asked for but no local cross-encoder model is available."""
