"""Named indices and their versioned, content-addressed snapshots: the public names.

The parts live in three modules: :mod:`r3mes.rag.named_index` (one index: chunks, vectors,
BM25 terms, time-to-live), :mod:`r3mes.rag.snapshots` (:class:`RagStore`: snapshots, refs,
deltas, restore, verify, the on-disk layout) and :mod:`r3mes.rag.transfer` (export and import
between data directories). Importing these names from here keeps working.
"""

from __future__ import annotations

from r3mes.rag.named_index import (
    DAY_S,
    DEFAULT_TTL_S,
    DOMAIN_TO_INDEX,
    INDEX_NAMES,
    ChunkRecord,
    IndexConfig,
    NamedIndex,
    check_index_name,
    parse_timestamp,
    route_domain,
)
from r3mes.rag.snapshots import (
    DEFAULT_COMPACT_FRACTION,
    DEFAULT_KEEP_SNAPSHOTS,
    DEFAULT_MAX_DELTAS,
    DELTA_FORMAT,
    SNAPSHOT_FORMAT,
    RagStore,
    SnapshotInfo,
)
from r3mes.rag.transfer import EXPORT_FORMAT, EXPORT_TYPE, export_index, import_index

__all__ = [
    "DAY_S", "DEFAULT_COMPACT_FRACTION", "DEFAULT_KEEP_SNAPSHOTS", "DEFAULT_MAX_DELTAS",
    "DEFAULT_TTL_S", "DELTA_FORMAT", "DOMAIN_TO_INDEX", "EXPORT_FORMAT", "EXPORT_TYPE",
    "INDEX_NAMES", "SNAPSHOT_FORMAT", "ChunkRecord", "IndexConfig", "NamedIndex", "RagStore",
    "SnapshotInfo", "check_index_name", "export_index", "import_index", "parse_timestamp",
    "route_domain",
]
