"""Expert cache: the content-addressed adapter store (tier 3), the tiered cache, VRAM budget.

``TieredDoRACache`` (which needs torch) is imported lazily so that ``r3mes adapters ...``
starts without loading torch.
"""

from __future__ import annotations

from typing import Any

from r3mes.cache.adapter_store import (
    AdapterNotFoundError,
    AdapterRecord,
    AdapterStore,
    AdapterStoreError,
    AdapterValidationError,
    BaseModelMismatchError,
    DigestMismatchError,
    ManifestCorruptError,
    StoreFullError,
    adapter_digest,
    inspect_adapter_dir,
)
from r3mes.cache.fetchers import Fetcher, FetchError, HTTPFetcher, LocalDirectoryFetcher
from r3mes.cache.vram_manager import VRAMBudgetError, VRAMManager

__all__ = [
    "AdapterNotFoundError", "AdapterRecord", "AdapterStore", "AdapterStoreError",
    "AdapterValidationError", "BaseModelMismatchError", "CacheCapacityError",
    "DigestMismatchError", "FetchError", "Fetcher", "HTTPFetcher", "LoadedAdapter",
    "LocalDirectoryFetcher", "ManifestCorruptError", "StoreFullError", "TieredDoRACache",
    "VRAMBudgetError", "VRAMManager", "adapter_digest", "inspect_adapter_dir",
]


def __getattr__(name: str) -> Any:
    if name in ("TieredDoRACache", "CacheCapacityError", "LoadedAdapter"):
        from r3mes.cache import tiered_cache

        return getattr(tiered_cache, name)
    raise AttributeError(f"module 'r3mes.cache' has no attribute {name!r}")
