"""The IPFS sub-commands of ``r3mes adapters`` and ``r3mes index``.

    r3mes adapters publish ID [--api URL]            add to the IPFS node, print the CID
    r3mes adapters add ipfs://CID --id NAME [--api URL | --gateway URL]
    r3mes index publish --index NAME [--api URL]
    r3mes index pull ipfs://CID [--api URL | --gateway URL]

Without ``--api`` / ``--gateway`` the configuration's ``ipfs.api`` / ``ipfs.gateway`` is used.

``--json`` schemas (stable; keys may be added):

- ``adapters publish``: ``{"id", "digest", "cid", "uri"}``
- ``adapters add ipfs://``: ``{"added": RECORD, "evicted": [], "pull": PULL}``
- ``index publish``: ``{"index", "digest", "snapshots", "bytes", "cid", "uri"}``
- ``index pull``: ``{"imported": SNAPSHOT, "replaced", "snapshots", "pull": PULL}``

where PULL is ``{"cid", "blocks_fetched", "bytes_fetched", "blocks_local", "bytes_local",
"seconds"}``: what came over the network and what was taken from local disk.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from r3mes.distribution import IpfsError, open_source
from r3mes.distribution.publish import publish_adapter, publish_index
from r3mes.distribution.pull import pull_adapter, pull_index
from r3mes.utils.diskspace import format_bytes

__all__ = ["add_source_flags", "adapters_publish", "adapters_pull", "index_publish",
           "index_pull", "is_ipfs_uri"]


def _as(error: Callable[[str], Exception]) -> Callable[[Any], Any]:
    """Report IPFS and verification failures as the command group's own error type, so its
    error handling (one line, or ``{"error": ...}`` with ``--json``, exit status) applies."""

    def wrap(func: Any) -> Any:
        @functools.wraps(func)
        def inner(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except (IpfsError, ValueError) as exc:
                if isinstance(exc, _passthrough()):
                    raise
                raise error(str(exc)) from exc

        return inner

    return wrap


def _passthrough() -> tuple[type[Exception], ...]:
    from r3mes.cache.adapter_store import AdapterStoreError
    from r3mes.rag.errors import RagError

    return (AdapterStoreError, RagError)


def _adapter_error(message: str) -> Exception:
    from r3mes.cache.adapter_store import AdapterStoreError

    return AdapterStoreError(message)


def _index_error(message: str) -> Exception:
    from r3mes.rag.errors import RagError

    return RagError(message)


def is_ipfs_uri(text: str) -> bool:
    return text.startswith(("ipfs://", "/ipfs/"))


def add_source_flags(p: argparse.ArgumentParser, gateway: bool = True) -> None:
    """``--api`` (and ``--gateway``) on a publish or pull command."""
    p.add_argument("--api", default=None,
                   help="kubo RPC API, e.g. http://127.0.0.1:5001 (default: config ipfs.api)")
    if gateway:
        p.add_argument("--gateway", default=None, help="trustless HTTP gateway URL, for nodes "
                       "that run no IPFS daemon (default: config ipfs.gateway)")


def _pull_text(pull: dict[str, Any]) -> str:
    return (f"moved {format_bytes(pull['bytes_fetched'])} in {pull['blocks_fetched']} "
            f"verified block(s); {format_bytes(pull['bytes_local'])} taken from local disk; "
            f"{pull['seconds']:.2f} s")


def _with_source(args: argparse.Namespace, func: Any, first: Any, *rest: Any,
                 gateway: bool = True, **kw: Any) -> dict[str, Any]:
    """``func(first, source, *rest, home=...)`` with the source the flags or config name."""
    source = open_source(args.api, args.gateway if gateway else None, args.home)
    try:
        return func(first, source, *rest, home=args.home, **kw)
    finally:
        source.close()


@_as(_adapter_error)
def adapters_publish(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    data = _with_source(args, publish_adapter, args.adapter_id, gateway=False)
    return data, f"published {data['id']} (sha256 {data['digest'][:12]}): {data['uri']}"


@_as(_adapter_error)
def adapters_pull(args: argparse.Namespace, **add_kw: Any) -> tuple[dict[str, Any], str]:
    data = _with_source(args, pull_adapter, args.path, args.adapter_id, **add_kw)
    data.setdefault("evicted", [])
    rec = data["added"]
    return data, (f"added {rec['id']} from {data['pull']['cid']}: sha256 {rec['digest']}\n"
                  + _pull_text(data["pull"]))


@_as(_index_error)
def index_publish(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    data = _with_source(args, publish_index, args.index, gateway=False)
    return data, (f"published '{data['index']}' snapshot {data['digest'][:12]} "
                  f"({len(data['snapshots'])} snapshot dir(s)): {data['uri']}")


@_as(_index_error)
def index_pull(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    data = _with_source(args, pull_index, args.cid)
    s = data["imported"]
    data["imported"] = s.to_dict()
    text = (f"pulled snapshot {s.digest[:12]} as the current '{s.index}' ({s.documents} "
            f"document(s), {s.chunks} chunk(s))\n" + _pull_text(data["pull"]))
    return data, text
