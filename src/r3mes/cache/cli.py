"""``r3mes adapters``: manage the content-addressed DoRA adapter store.

Sub-commands (all take ``--home`` and ``--json``)::

    r3mes adapters list                      adapters in the store
    r3mes adapters add PATH --id ID [--pin] [--digest SHA256] [--replace]
    r3mes adapters add ipfs://CID --id ID [--api URL | --gateway URL]   fetch, verify, add
    r3mes adapters publish ID [--api URL]    add to an IPFS node, print the CID
    r3mes adapters remove ID
    r3mes adapters verify [ID]               re-hash files, re-validate structure
    r3mes adapters stats                     counts, bytes, size limit
    r3mes adapters pin ID / unpin ID         exempt from / return to LRU eviction
    r3mes adapters limit GIB|none            set the store's size limit in GiB (evicts LRU
                                             unpinned); every size is in binary units

``--json`` schemas (stable; new keys may be added, none removed or renamed):

- ``list``: ``{"adapters": [RECORD, ...]}`` where RECORD is ``{"id", "digest", "files":
  {name: sha256}, "size_bytes", "rank", "lora_alpha", "use_rslora", "target_modules",
  "num_modules", "base_model", "base_model_fingerprint", "shape_fingerprint", "added_at",
  "last_used", "pinned", "source", "cid"}`` (times are Unix seconds; ``cid`` the IPFS CIDv1
  that ``publish`` gives the adapter).
- ``add ipfs://`` and ``publish``: see :mod:`r3mes.distribution.cli`.
- ``add``: ``{"added": RECORD, "evicted": [id, ...]}``; ``remove``: ``{"removed": RECORD}``;
  ``pin``/``unpin``: ``{"adapter": RECORD}``; ``limit``: ``{"max_size_bytes": int|null,
  "evicted": [id, ...]}``.
- ``verify``: ``{"ok": bool, "results": [{"id", "digest", "ok", "problems": [str]}]}``.
- ``stats``: ``{"root", "adapters", "objects", "pinned", "total_bytes", "max_size_bytes",
  "utilisation"}``.
- errors: ``{"error": message, "type": exception class}`` with exit status 1 (2 for usage).

Exit status: 0 on success, 1 on a refused operation or a failed verification.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from typing import Any

from r3mes.cache.adapter_store import AdapterStore, AdapterStoreError
from r3mes.utils.diskspace import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``adapters`` and its sub-commands to the main ``r3mes`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=None, help="data directory (default $R3MES_HOME or "
                        "~/.r3mes)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    adapters = subparsers.add_parser("adapters", help="manage the DoRA adapter store; publish "
                                  "and pull adapters over IPFS by CID")
    sub = adapters.add_subparsers(dest="adapters_command", required=True)

    p = sub.add_parser("list", parents=[common], help="list stored adapters")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("add", parents=[common], help="import a PEFT DoRA adapter directory")
    p.add_argument("path", help="directory with adapter_config.json and "
                   "adapter_model.safetensors, or ipfs://CID from 'r3mes adapters publish'")
    p.add_argument("--id", required=True, dest="adapter_id", help="adapter id, e.g. medical_dora")
    p.add_argument("--pin", action="store_true", help="exempt from size-limit eviction")
    p.add_argument("--digest", default=None, help="refuse unless the content has this sha256")
    p.add_argument("--base-model", default=None,
                   help="refuse unless base_model_name_or_path matches this")
    p.add_argument("--base-fingerprint", default=None,
                   help="fingerprint of the base model the adapter was trained on")
    p.add_argument("--replace", action="store_true", help="re-point an existing id")
    from r3mes.distribution.cli import add_source_flags

    add_source_flags(p)  # for ipfs:// paths
    p.set_defaults(func=_cmd_add)

    p = sub.add_parser("publish", parents=[common], help="add a stored adapter to an IPFS "
                       "node and print its CID")
    p.add_argument("adapter_id", metavar="ID")
    add_source_flags(p, gateway=False)
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("remove", parents=[common], help="remove an adapter")
    p.add_argument("adapter_id", metavar="ID")
    p.set_defaults(func=_cmd_remove)

    p = sub.add_parser("verify", parents=[common], help="re-hash and re-validate adapters")
    p.add_argument("adapter_id", metavar="ID", nargs="?", default=None)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("stats", parents=[common], help="store size and counts")
    p.set_defaults(func=_cmd_stats)

    for name, pinned in (("pin", True), ("unpin", False)):
        p = sub.add_parser(name, parents=[common], help=f"{name} an adapter (LRU eviction)")
        p.add_argument("adapter_id", metavar="ID")
        p.set_defaults(func=_cmd_pin, pinned=pinned)

    p = sub.add_parser("limit", parents=[common], help="set the store size limit")
    p.add_argument("gigabytes", metavar="GIB|none", help="limit in GiB (2**30 bytes)")
    p.set_defaults(func=_cmd_limit)


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def _guard(func: Any) -> Any:
    """Turn store errors into one clear line (or a JSON error object) and exit status 1."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(func(args) or 0)
        except (AdapterStoreError, ValueError, KeyError) as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            if args.json:
                print(json.dumps({"error": message, "type": type(exc).__name__}))
            else:
                print(f"error: {message}", file=sys.stderr)
            return 1

    wrapper.__name__ = func.__name__
    return wrapper


def _when(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


@_guard
def _cmd_list(args: argparse.Namespace) -> int:
    from r3mes.distribution.publish import adapter_cid

    records = AdapterStore(args.home).list()
    cids = {r.id: adapter_cid(r.id, args.home, r.digest) for r in records}
    lines = [f"{'id':<24} {'rank':>4} {'MiB':>8} {'modules':>7}  {'digest':<12}  last used"]
    for r in records:
        lines.append(f"{r.id:<24} {r.rank:>4} {r.size_bytes / 2**20:>8.2f} {r.num_modules:>7}  "
                     f"{r.digest[:12]}  {_when(r.last_used)}{'  pinned' if r.pinned else ''}"
                     f"\n{'':<24} ipfs://{cids[r.id]}")
    if not records:
        lines = ["no adapters (add one with `r3mes adapters add PATH --id NAME`)"]
    _emit(args, {"adapters": [{**r.to_json(), "cid": cids[r.id]} for r in records]},
          "\n".join(lines))
    return 0


@_guard
def _cmd_add(args: argparse.Namespace) -> int:
    from r3mes.distribution.cli import adapters_pull, is_ipfs_uri

    if is_ipfs_uri(args.path):
        data, text = adapters_pull(args, pinned=args.pin, replace=args.replace,
                                   base_model_fingerprint=args.base_fingerprint)
        _emit(args, data, text)
        return 0
    store = AdapterStore(args.home, base_model=args.base_model)
    record = store.add(args.path, args.adapter_id, pinned=args.pin,
                       expected_digest=args.digest, base_model_fingerprint=args.base_fingerprint,
                       replace=args.replace)
    evicted = store.last_evicted
    text = (f"added {record.id}: rank {record.rank}, {record.num_modules} modules, "
            f"{format_bytes(record.size_bytes)}, sha256 {record.digest}")
    if evicted:
        text += f"\nevicted (size limit): {', '.join(evicted)}"
    _emit(args, {"added": record.to_json(), "evicted": evicted}, text)
    return 0


@_guard
def _cmd_publish(args: argparse.Namespace) -> int:
    from r3mes.distribution.cli import adapters_publish

    data, text = adapters_publish(args)
    _emit(args, data, text)
    return 0


@_guard
def _cmd_remove(args: argparse.Namespace) -> int:
    record = AdapterStore(args.home).remove(args.adapter_id)
    _emit(args, {"removed": record.to_json()}, f"removed {record.id}")
    return 0


@_guard
def _cmd_verify(args: argparse.Namespace) -> int:
    results = AdapterStore(args.home).verify(args.adapter_id)
    ok = all(r.ok for r in results)
    lines = []
    for r in results:
        lines.append(f"{'ok  ' if r.ok else 'FAIL'} {r.id}")
        lines.extend(f"     {problem}" for problem in r.problems)
    _emit(args, {"ok": ok, "results": [r.to_json() for r in results]},
          "\n".join(lines) or "no adapters to verify")
    return 0 if ok else 1


@_guard
def _cmd_stats(args: argparse.Namespace) -> int:
    stats = AdapterStore(args.home).stats()
    limit = stats["max_size_bytes"]
    text = (f"store:    {stats['root']}\n"
            f"adapters: {stats['adapters']} ({stats['objects']} distinct, "
            f"{stats['pinned']} pinned)\n"
            f"size:     {format_bytes(stats['total_bytes'])}"
            + (f" of {format_bytes(limit)} ({stats['utilisation']:.0%})" if limit else
               " (no limit)"))
    _emit(args, stats, text)
    return 0


@_guard
def _cmd_pin(args: argparse.Namespace) -> int:
    record = AdapterStore(args.home).set_pinned(args.adapter_id, args.pinned)
    _emit(args, {"adapter": record.to_json()},
          f"{'pinned' if record.pinned else 'unpinned'} {record.id}")
    return 0


@_guard
def _cmd_limit(args: argparse.Namespace) -> int:
    value = None if args.gigabytes.lower() in ("none", "off", "0") else float(args.gigabytes)
    store = AdapterStore(args.home)
    evicted = store.set_max_size_gb(value)
    limit = store.max_size_bytes
    text = f"size limit: {'none' if limit is None else format_bytes(limit)}"
    if evicted:
        text += f"\nevicted: {', '.join(evicted)}"
    _emit(args, {"max_size_bytes": limit, "evicted": evicted}, text)
    return 0
