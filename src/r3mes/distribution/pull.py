"""Pull an adapter or an index snapshot by CID: fetch only missing blocks, verify, install.

The DAG under the CID is walked from its root. A block that the local data directory already
holds (any file or directory of a stored adapter or snapshot has a CID computed locally, see
:class:`~r3mes.distribution.unixfs.LocalDag`) is taken from disk; every other block is fetched
from the source (a kubo node's RPC API or a trustless gateway) and hashed against its CID
before it is decoded or written. The files land in a staging directory under ``<home>/ipfs``;
only after the whole tree is there is it handed to the adapter store or the RAG store, which
verify the r3mes sha256 digests again and make it current atomically. A bad block raises
:class:`~r3mes.distribution.cid.BlockVerificationError` and nothing is stored.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from r3mes.distribution.cid import CID, parse_cid, verify_block
from r3mes.distribution.unixfs import TYPE_DIRECTORY, LocalDag, UnixFSError, decode_node
from r3mes.utils.paths import r3mes_home

__all__ = ["BlockSource", "PullStats", "fetch_tree", "pull_adapter", "pull_index"]

ADAPTER_PACKAGE = "r3mes-adapter.json"


class BlockSource(Protocol):
    """Where blocks come from (:class:`KuboRPC`, :class:`TrustlessGateway`)."""

    def get_block(self, cid: CID) -> bytes: ...

    def describe(self) -> str: ...


@dataclass
class PullStats:
    """What a pull moved: blocks and bytes fetched from the source, taken from local disk."""

    cid: str
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_local: int = 0
    bytes_local: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Walker:
    def __init__(self, source: BlockSource, have: LocalDag, stats: PullStats,
                 prefetched: dict[str, bytes] | None = None) -> None:
        self.source, self.have, self.stats = source, have, stats
        self.prefetched = prefetched or {}

    def block(self, cid: CID) -> bytes:
        local = self.have.block(cid)
        if local is not None:
            self.stats.blocks_local += 1
            self.stats.bytes_local += len(local)
            return local
        data = self.prefetched.get(str(cid))
        if data is None:
            data = self.source.get_block(cid)
        data = verify_block(cid, data)
        self.stats.blocks_fetched += 1
        self.stats.bytes_fetched += len(data)
        return data

    def tree(self, cid: CID, dest: Path) -> None:
        local = self.have.roots.get(str(cid))
        if local is not None and local.exists():
            # a whole file or directory we hold with this CID: copy it, fetch nothing
            if local.is_dir():
                shutil.copytree(local, dest)
            else:
                shutil.copyfile(local, dest)
            size = sum(p.stat().st_size for p in ([local] if local.is_file()
                                                   else local.rglob("*")) if p.is_file())
            self.stats.bytes_local += size
            return
        if cid.codec.name == "raw":
            dest.write_bytes(self.block(cid))
            return
        node = decode_node(self.block(cid))
        if node.type == TYPE_DIRECTORY:
            dest.mkdir()
            for link in node.links:
                if not link.name or "/" in link.name or link.name in (".", ".."):
                    raise UnixFSError(f"directory {cid}: unsafe entry name {link.name!r}")
                self.tree(parse_cid(link.cid), dest / link.name)
            return
        with open(dest, "wb") as fh:
            self._file(node, fh, cid)

    def _file(self, node: Any, fh: Any, cid: CID) -> None:
        if not node.links:
            fh.write(node.data)
            return
        for link in node.links:
            child = parse_cid(link.cid)
            if child.codec.name == "raw":
                fh.write(self.block(child))
                continue
            sub = decode_node(self.block(child))
            if sub.type != 2:
                raise UnixFSError(f"file {cid}: child {child} is not file data")
            self._file(sub, fh, child)


def fetch_tree(cid: str | CID, source: BlockSource, dest: Path, have: LocalDag | None = None,
               prefetched: dict[str, bytes] | None = None) -> PullStats:
    """Write the UnixFS tree under ``cid`` to ``dest`` (must not exist), block by verified
    block; blocks ``have`` serves are not fetched. Returns what moved."""
    root = parse_cid(cid)
    stats = PullStats(cid=str(root))
    start = time.perf_counter()
    _Walker(source, have or LocalDag(), stats, prefetched).tree(root, dest)
    stats.seconds = time.perf_counter() - start
    return stats


def _staging(home: Path) -> Path:
    base = home / "ipfs" / "staging"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="pull-", dir=base))


def pull_index(cid: str | CID, source: BlockSource, home: str | Path | None = None,
               rag_store: Any = None) -> dict[str, Any]:
    """Fetch the index export published as ``cid`` and import it as the current snapshot of
    its index (verified by :meth:`RagStore.import_snapshot`). Blocks of snapshots already
    stored locally are not fetched. Returns ``{"imported", "replaced", "snapshots", "pull"}``.
    """
    from r3mes.rag.indices import RagStore

    root = r3mes_home(home)
    store = rag_store if rag_store is not None else RagStore(root)
    have = LocalDag()
    snaps = store.snapshots_dir
    if snaps.is_dir():
        for d in sorted(snaps.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                have.add(d)
    stage = _staging(root)
    try:
        stats = fetch_tree(cid, source, stage / "export", have)
        with store.lock():  # the fetch ran unlocked; only the install excludes other writers
            result = store.import_snapshot(stage / "export")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result["pull"] = stats.to_dict()
    return result


def pull_adapter(cid: str | CID, source: BlockSource, adapter_id: str,
                 home: str | Path | None = None, adapter_store: Any = None, **add_kw: Any
                 ) -> dict[str, Any]:
    """Fetch the adapter package published as ``cid`` and add it to the store as
    ``adapter_id``, refused unless its files hash to the r3mes digest the package names.
    Returns ``{"added": record, "pull": stats}``."""
    from r3mes.cache.adapter_store import AdapterStore, AdapterValidationError

    root = r3mes_home(home)
    store = adapter_store if adapter_store is not None else AdapterStore(root)
    have = LocalDag()
    if store.objects.is_dir():
        for d in sorted(store.objects.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                have.add(d)
    stage = _staging(root)
    try:
        stats = fetch_tree(cid, source, stage / "adapter", have)
        try:
            package = json.loads((stage / "adapter" / ADAPTER_PACKAGE).read_text("utf-8"))
            digest = package["digest"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdapterValidationError(
                f"ipfs://{stats.cid}: not an r3mes adapter package ({ADAPTER_PACKAGE}: {exc})"
            ) from exc
        record = store.add(stage / "adapter", adapter_id, expected_digest=digest,
                           source=f"ipfs://{stats.cid}", **add_kw)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"added": record.to_json(), "pull": stats.to_dict()}
