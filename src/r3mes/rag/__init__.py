"""Retrieval-augmented generation: chunking, embeddings, FAISS + BM25 hybrid search with
Reciprocal Rank Fusion, optional cross-encoder reranking, named indices with versioned
snapshots under ``<home>/rag``.

Typical use::

    from r3mes.rag import RagStore, Retriever, load_documents
    store = RagStore(home)
    store.index("general").add_documents(load_documents("notes.md"))
    store.save("general")          # a full snapshot, or a delta when the change is small
    hits = Retriever(store).search("how do I ...", top_k=5)

The command line is ``r3mes index add|search|stats|list|snapshot|restore|purge|export|import``
(``r3mes rag ...`` is the same).
"""

from r3mes.rag.chunker import Chunk, Chunker, Document, load_documents
from r3mes.rag.errors import (
    DocumentError,
    IndexCorruptedError,
    QueryError,
    RagError,
    RerankerUnavailableError,
    StaleIndexError,
    UnknownIndexError,
)
from r3mes.rag.indices import (
    INDEX_NAMES,
    IndexConfig,
    NamedIndex,
    RagStore,
    SnapshotInfo,
    route_domain,
)
from r3mes.rag.retriever import Hit, Retriever, build_prompt, cited_sources, rrf_fuse

__all__ = [
    "INDEX_NAMES", "Chunk", "Chunker", "Document", "DocumentError", "Hit", "IndexConfig",
    "IndexCorruptedError", "NamedIndex", "QueryError", "RagError", "RagStore",
    "RerankerUnavailableError", "Retriever", "SnapshotInfo", "StaleIndexError",
    "UnknownIndexError", "build_prompt",
    "cited_sources", "load_documents", "route_domain", "rrf_fuse",
]
