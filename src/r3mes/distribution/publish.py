"""Publish a stored adapter or an index snapshot to IPFS, and the CIDs ``list`` shows.

What is published is a plain directory, so any IPFS tool can browse it:

- an adapter: ``adapter_config.json``, ``adapter_model.safetensors`` and ``r3mes-adapter.json``
  (``{"format": 1, "type": "r3mes-adapter", "digest", "files": {name: sha256}}``; no id or time,
  so the same content always has the same CID);
- an index snapshot: exactly what ``r3mes index export`` writes (``export.json`` and
  ``snapshots/<digest>/`` for the snapshot and every snapshot it builds on), so a delta
  snapshot's directory shares its base's blocks and a node that has the base fetches only the
  delta.

The CID is computed locally (:mod:`r3mes.distribution.unixfs`) and must equal the one the node
returns for the upload; a node that disagrees is reported and the publication refused.
CIDs are cached in ``<home>/ipfs/cids.json`` by r3mes digest, so listing does not re-hash.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from r3mes.distribution.cid import CID, parse_cid
from r3mes.distribution.kubo import IpfsError, KuboRPC
from r3mes.distribution.pull import ADAPTER_PACKAGE
from r3mes.distribution.unixfs import build_dag
from r3mes.utils.atomic import atomic_write_json, file_lock
from r3mes.utils.paths import r3mes_home

__all__ = ["adapter_cid", "index_cid", "publish_adapter", "publish_index",
           "write_adapter_package"]


def write_adapter_package(record: Any, object_dir: Path, dest: Path) -> Path:
    """Lay out the publishable directory of stored adapter ``record`` at ``dest``."""
    dest.mkdir(parents=True)
    for name in record.files:
        shutil.copyfile(object_dir / name, dest / name)
    package = {"format": 1, "type": "r3mes-adapter", "digest": record.digest,
               "files": dict(sorted(record.files.items()))}
    (dest / ADAPTER_PACKAGE).write_text(json.dumps(package, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    return dest


class _CidCache:
    """``<home>/ipfs/cids.json``: ``{"adapter:<digest>" | "index:<digest>": CID}``."""

    def __init__(self, home: Path) -> None:
        self.path = home / "ipfs" / "cids.json"

    def get(self, key: str) -> str | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a missing or damaged cache only costs a re-hash
        value = data.get(key) if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    def put(self, key: str, cid: CID) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_suffix(".lock")):
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    data = {}
            except (OSError, ValueError):
                data = {}
            data[key] = str(cid)
            atomic_write_json(self.path, data)


def _with_staged(home: Path, build: Any) -> Any:
    base = home / "ipfs" / "staging"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="publish-", dir=base))
    try:
        return build(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _adapter(home: Path, adapter_id: str, client: KuboRPC | None) -> tuple[CID, Any]:
    from r3mes.cache.adapter_store import AdapterStore

    store = AdapterStore(home)
    record = store.get(adapter_id)

    def build(tmp: Path) -> CID:
        pkg = write_adapter_package(record, store.path(adapter_id), tmp / adapter_id)
        local, _ = build_dag(pkg)
        if client is not None:
            _check(client, client.add(pkg), local, f"adapter '{adapter_id}'")
        return local

    cid = _with_staged(home, build)
    _CidCache(home).put(f"adapter:{record.digest}", cid)
    return cid, record


def adapter_cid(adapter_id: str, home: str | Path | None = None, digest: str | None = None
                ) -> str:
    """The CIDv1 of stored adapter ``adapter_id`` (cached by its digest)."""
    root = r3mes_home(home)
    if digest is not None:
        cached = _CidCache(root).get(f"adapter:{digest}")
        if cached:
            return cached
    return str(_adapter(root, adapter_id, None)[0])


def publish_adapter(adapter_id: str, client: KuboRPC, home: str | Path | None = None
                    ) -> dict[str, Any]:
    """Add stored adapter ``adapter_id`` to the IPFS node; ``{"id", "digest", "cid", "uri"}``."""
    cid, record = _adapter(r3mes_home(home), adapter_id, client)
    return {"id": adapter_id, "digest": record.digest, "cid": str(cid), "uri": f"ipfs://{cid}"}


def _index(home: Path, name: str, client: KuboRPC | None, store: Any = None
           ) -> tuple[CID, dict[str, Any]]:
    from r3mes.rag.indices import RagStore

    store = store if store is not None else RagStore(home)

    def build(tmp: Path) -> tuple[CID, dict[str, Any]]:
        with store.lock():
            info = store.export(name, tmp / "export")
        local, _ = build_dag(tmp / "export")
        if client is not None:
            _check(client, client.add(tmp / "export"), local, f"index '{name}'")
        return local, info

    cid, info = _with_staged(home, build)
    _CidCache(home).put(f"index:{info['digest']}", cid)
    return cid, info


def index_cid(name: str, digest: str, home: str | Path | None = None, store: Any = None
              ) -> str:
    """The CIDv1 of the current snapshot ``digest`` of index ``name`` (cached by digest)."""
    root = r3mes_home(home)
    cached = _CidCache(root).get(f"index:{digest}")
    if cached:
        return cached
    return str(_index(root, name, None, store)[0])


def publish_index(name: str, client: KuboRPC, home: str | Path | None = None, store: Any = None
                  ) -> dict[str, Any]:
    """Add the current snapshot of index ``name`` (with what it builds on) to the IPFS node;
    ``{"index", "digest", "snapshots", "bytes", "cid", "uri"}``."""
    from r3mes.distribution.sync import record_published

    cid, info = _index(r3mes_home(home), name, client, store)
    record_published(home, name, str(cid), info["digest"])
    return {"index": name, "digest": info["digest"], "snapshots": info["snapshots"],
            "bytes": info["bytes"], "cid": str(cid), "uri": f"ipfs://{cid}"}


def _check(client: KuboRPC, remote: CID, local: CID, what: str) -> None:
    if parse_cid(remote) != local:
        raise IpfsError(f"{client.describe()} computed {remote} for {what}, r3mes computed "
                        f"{local}: the node's import settings differ from kubo's defaults "
                        "(cid-version 0, size-262144 chunks, balanced layout); not published")
