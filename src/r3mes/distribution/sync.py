"""A miner node's sync with the serving node: pull newer index snapshots on start and on an
interval, keep serving the last good snapshot when the network is gone.

The serving node records what it published (``r3mes index publish``) in
``<home>/ipfs/published.json`` (``{index: {"cid", "digest", "published_at"}}``) and serves it at
``GET /api/v1/ipfs/published``. A miner node with ``miner_node.sync_from_serving: true`` reads
that list from ``miner_node.serving_url`` and pulls, by CID through its own IPFS source
(``ipfs.api`` or ``ipfs.gateway``), every index whose published snapshot is not its current
one. A pull is verified block by block and installed atomically, so a failed sync (serving
node or network unreachable, a bad block) changes nothing: the current snapshot keeps serving
and the next round tries again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from r3mes.utils.atomic import atomic_write_json, file_lock
from r3mes.utils.paths import r3mes_home

__all__ = ["MinerSync", "published", "record_published"]

log = logging.getLogger(__name__)


def _published_path(home: Path) -> Path:
    return home / "ipfs" / "published.json"


def published(home: str | Path | None = None) -> dict[str, Any]:
    """What this node published: ``{index: {"cid", "digest", "published_at"}}``."""
    try:
        data = json.loads(_published_path(r3mes_home(home)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_published(home: str | Path | None, index: str, cid: str, digest: str) -> None:
    """Note that snapshot ``digest`` of ``index`` was published as ``cid``."""
    path = _published_path(r3mes_home(home))
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        data = published(home)
        data[index] = {"cid": cid, "digest": digest, "published_at": time.time()}
        atomic_write_json(path, data)


class MinerSync:
    """Pull the serving node's published snapshots into ``home``.

    ``open_source``: returns a block source (closed after each round). ``rag_store``: the
    store a running server reads (so it sees the new snapshot at its next query).
    """

    def __init__(self, home: str | Path | None, serving_url: str,
                 open_source: Callable[[], Any], indices: Sequence[str] | None = None,
                 interval_s: float = 21600.0, rag_store: Any = None,
                 timeout_s: float = 30.0) -> None:
        self.home = r3mes_home(home)
        self.serving_url = serving_url.rstrip("/")
        self.open_source = open_source
        self.indices = list(indices) if indices else None
        self.interval_s = interval_s
        self.rag_store = rag_store
        self.timeout_s = timeout_s
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _store(self) -> Any:
        if self.rag_store is None:
            from r3mes.rag.indices import RagStore

            self.rag_store = RagStore(self.home)
        return self.rag_store

    def sync_once(self) -> dict[str, Any]:
        """One round: ``{index: "pulled" | "current" | "failed: ..."}``; never raises."""
        from r3mes.distribution.pull import pull_index

        try:
            r = httpx.get(f"{self.serving_url}/api/v1/ipfs/published", timeout=self.timeout_s,
                          trust_env=False)
            r.raise_for_status()
            offered = r.json().get("indices", {})
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self.last_error = f"serving node {self.serving_url} unreachable ({exc})"
            log.warning("miner sync: %s; serving the current snapshots", self.last_error)
            return {}
        store = self._store()
        out: dict[str, Any] = {}
        for name, entry in sorted(offered.items()):
            if self.indices is not None and name not in self.indices:
                continue
            current = {s["name"]: s["snapshot"] for s in store.stats()}.get(name)
            if current == entry.get("digest"):
                out[name] = "current"
                continue
            try:
                source = self.open_source()
                try:
                    pull_index(entry["cid"], source, self.home, store)
                finally:
                    source.close()
                out[name] = "pulled"
            except Exception as exc:  # a failed round must never stop the node serving
                self.last_error = f"index '{name}' from {entry.get('cid')}: {exc}"
                log.warning("miner sync: %s; keeping the current snapshot", self.last_error)
                out[name] = f"failed: {exc}"
        return out

    def start(self) -> None:
        """Sync now and then every ``interval_s`` seconds, in a daemon thread."""

        def loop() -> None:
            while not self._stop.is_set():
                self.sync_once()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="r3mes-miner-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
