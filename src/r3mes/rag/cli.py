"""``r3mes index ...`` (also spelled ``r3mes rag ...``): add documents, search, stats, list
snapshots, snapshot, restore, purge, export, import.

Both names are registered on the same implementation. Every sub-command takes ``--home`` (the
data directory) and ``--json``. JSON schemas (stable):

- ``add``:      ``{"index", "files": [..], "documents", "replaced", "chunks",
  "expired": [doc ids already past their time-to-live], "snapshot": S,
  "skipped": [{"path", "reason"}, ...]}`` (files read are in ``files``; unsupported or
  unreadable ones are listed in ``skipped`` and do not stop the others)
- ``search``:   ``{"query", "mode", "indices": [..], "hits": [H, ...]}`` with
  ``H = {"doc_id", "chunk_id", "text", "score", "index", "position", "metadata"}``; with
  ``--server`` also ``"server": URL`` (``indices`` is then what was asked, ``[]`` for all)
- ``stats``:    ``{"indices": [T, ...], "totals": {"documents", "chunks", "disk_bytes"}}`` with
  ``T = {"name", "snapshot", "snapshot_kind", "deltas", "base", "documents", "chunks", "kind",
  "ttl_s", "created", "disk_bytes", "embedding_model", "error"}`` (only indices with a
  snapshot; read from the manifests; ``--verify`` also checks every digest and puts a failure
  in ``error``, then exits 1)
- ``list``:     ``{"indices": [{"name", "documents", "chunks", "kind", "active_kind",
  "ttl_s", "snapshot", "snapshots": [S, ...]}]}`` (only indices with a snapshot)
- ``snapshot``: ``{"snapshot": S}``
- ``restore``:  ``{"restored": S}``
- ``purge``:    ``{"index", "expired": [doc ids], "deleted": [doc ids], "snapshot": S}``
- ``export``:   ``{"index", "digest", "snapshots": [digests, base first], "path",
  "format": "directory" | "tar" | "tar.gz", "bytes"}``
- ``import``:   ``{"imported": S, "replaced": digest | null, "snapshots": [digests]}``

``S = {"digest", "index", "created", "documents", "chunks", "parent", "kind": "full" |
"delta", "base", "deltas"}``. Errors print ``error: ...`` to stderr (or ``{"error": ...}`` with
``--json``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from r3mes.rag.embedder import BUNDLED_MODELS
from r3mes.rag.errors import RagError
from r3mes.rag.indices import INDEX_NAMES, check_index_name

# The name first; ``rag`` stays as an alias of the same commands.
GROUP_NAMES = ("index", "rag")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index`` command group, and ``rag`` as a second name for it."""
    for name in GROUP_NAMES:
        group = subparsers.add_parser(
            name, help="retrieval: index documents, search them, publish and pull snapshots "
            "over IPFS" if name == "index"
            else "same as 'r3mes index'")
        _add_commands(group.add_subparsers(dest="rag_command", required=True))


def _add_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--home", help="data directory (default $R3MES_HOME or ~/.r3mes)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = common(sub.add_parser(
        "add", help="index files and directories (text, Markdown, JSONL, PDF, HTML, DOCX)"))
    p.add_argument("paths", nargs="+",
                   help="files, or directories (walked recursively; hidden entries skipped)")
    p.add_argument("--glob", help="in directories, only files matching this pattern "
                   "(e.g. '*.pdf'; default: every supported type)")
    p.add_argument("--index", default="general", type=_index_name, help=_INDEX_HELP)
    p.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"),
                   help="vector index type for a new index (default flat)")
    p.add_argument("--embedding-model", choices=BUNDLED_MODELS,
                   help="embedding model of a new index (default $R3MES_EMBED_MODEL, else "
                   "all-MiniLM-L6-v2; multilingual-e5-small ranks non-English text better "
                   "and indexes slower); an existing index keeps the model it was built with")
    p.set_defaults(func=_cmd_add)

    p = common(sub.add_parser("search", help="search the indices"))
    p.add_argument("query")
    p.add_argument("--index", action="append", type=_index_name,
                   help="index to search (repeatable; default: every index with content)")
    p.add_argument("--domain", help="route by a router domain (medical, legal, code, news...)")
    p.add_argument("--mode", default="hybrid", choices=("dense", "sparse", "hybrid"))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep chunks whose metadata KEY equals VALUE (repeatable)")
    p.add_argument("--rerank-model", help="local cross-encoder directory: rerank the results")
    p.add_argument("--server", default=os.environ.get("R3MES_SERVER_URL"),
                   help="search through a running 'r3mes serve' at this URL (e.g. "
                   "http://127.0.0.1:8000; default $R3MES_SERVER_URL): its model and indices "
                   "are loaded already, so a search takes milliseconds, not seconds")
    p.add_argument("--api-key", default=os.environ.get("R3MES_API_KEY"),
                   help="the server's API key (default $R3MES_API_KEY)")
    p.set_defaults(func=_cmd_search)

    p = common(sub.add_parser("stats", help="sizes of the indices and their current snapshots"))
    p.add_argument("--verify", action="store_true",
                   help="also load every index, checking each digest (exit 1 on a failure)")
    p.set_defaults(func=_cmd_stats)

    p = common(sub.add_parser("list", help="indices, their sizes and snapshots"))
    p.set_defaults(func=_cmd_list)

    p = common(sub.add_parser("snapshot", help="write the current state as a new snapshot"))
    p.add_argument("--index", default="general", type=_index_name, help=_INDEX_HELP)
    p.set_defaults(func=_cmd_snapshot)

    p = common(sub.add_parser("restore", help="make an earlier snapshot current"))
    p.add_argument("digest", help="snapshot digest (a unique prefix of at least 6 digits)")
    p.add_argument("--index", default="general", type=_index_name, help=_INDEX_HELP)
    p.set_defaults(func=_cmd_restore)

    p = common(sub.add_parser("purge", help="drop expired documents (and named ones)"))
    p.add_argument("--index", default="news", type=_index_name, help=_INDEX_HELP)
    p.add_argument("--doc-id", action="append", default=[], help="also delete this document")
    p.set_defaults(func=_cmd_purge)

    p = common(sub.add_parser(
        "export", help="write a verified snapshot to a directory or .tar/.tar.gz archive"))
    p.add_argument("out", help="new directory, or a path ending in .tar, .tar.gz or .tgz")
    p.add_argument("--index", default="general", type=_index_name, help=_INDEX_HELP)
    p.add_argument("--snapshot", help="digest (prefix) to export (default: the current one)")
    p.set_defaults(func=_cmd_export)

    p = common(sub.add_parser(
        "import", help="verify an exported snapshot and make it current for its index"))
    p.add_argument("path", help="a directory or archive written by 'r3mes index export'")
    p.set_defaults(func=_cmd_import)

    from r3mes.distribution.cli import add_source_flags

    p = common(sub.add_parser("publish", help="add the current snapshot to an IPFS node and "
                              "print its CID"))
    p.add_argument("--index", default="general", type=_index_name, help=_INDEX_HELP)
    add_source_flags(p, gateway=False)
    p.set_defaults(func=_cmd_publish)

    p = common(sub.add_parser("pull", help="fetch a snapshot by CID (only missing blocks), "
                              "verify every block and make it current"))
    p.add_argument("cid", help="ipfs://CID printed by 'r3mes index publish'")
    add_source_flags(p)
    p.set_defaults(func=_cmd_pull)


_INDEX_HELP = (f"index name: letters, digits, '-', '_' (defaults: {', '.join(INDEX_NAMES)}; "
               "a new name makes a new index)")


def _index_name(value: str) -> str:
    try:
        return check_index_name(value)
    except RagError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _store(args: argparse.Namespace, configs: dict[str, Any] | None = None):
    from r3mes.rag.indices import RagStore

    return RagStore(args.home, configs=configs,
                    embedding_model=getattr(args, "embedding_model", None))


def _run(args: argparse.Namespace, body) -> int:
    try:
        data, text = body()
    except (RagError, OSError) as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}, ensure_ascii=False))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True))
    else:
        print(text)
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    def body():
        from r3mes.rag.errors import DocumentError
        from r3mes.rag.indices import IndexConfig
        from r3mes.rag.ingest import ingest

        configs = {args.index: IndexConfig.for_index(args.index, kind=args.kind)} \
            if args.kind else None
        store = _store(args, configs)
        # Read and validate every file before touching the index; files that cannot be
        # read are listed and skipped, not fatal.
        found = ingest(args.paths, args.glob, progress=sys.stderr.isatty())
        if not found.documents:
            detail = "; ".join(f"{s['path']}: {s['reason']}" for s in found.skipped[:10])
            raise DocumentError("no documents to index" + (f" ({detail})" if detail else ""))
        docs = found.documents
        store.ensure_room_for(docs)  # a full disk is refused before the embedding
        with store.lock():
            index = store.index(args.index)
            counts = index.add_documents(docs)
            expired = index.purge_expired()  # e.g. news older than its time-to-live
            info = store.save(args.index)
        data = {"index": args.index, "files": found.files, **counts, "expired": expired,
                "snapshot": info.to_dict(), "skipped": found.skipped}
        text = (f"added {counts['documents']} document(s) from {len(found.files)} file(s), "
                f"{counts['chunks']} chunk(s) to '{args.index}' (replaced "
                f"{counts['replaced']}); snapshot {info.digest[:12]}")
        if found.skipped:
            text += f"\nskipped {len(found.skipped)} file(s):" + "".join(
                f"\n  {s['path']}: {s['reason']}" for s in found.skipped)
        if expired:
            text += f"\n{len(expired)} document(s) were already expired and were not kept"
        return data, text

    return _run(args, body)


def _parse_filters(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from r3mes.rag.errors import QueryError

            raise QueryError(f"--filter '{item}': expected KEY=VALUE")
        out[key] = value
    return out


def _search_remote(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Hits from a running server's ``POST /api/v1/rag/search`` (same schema as local)."""
    import httpx

    from r3mes.rag.errors import QueryError

    if args.domain is not None or args.rerank_model:
        raise QueryError("--domain and --rerank-model are not available with --server")
    url = args.server.rstrip("/") + "/api/v1/rag/search"
    payload = {"query": args.query, "top_k": args.top_k, "mode": args.mode,
               "indices": list(dict.fromkeys(args.index)) if args.index else None,
               "filters": _parse_filters(args.filter) or None}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.post(url, json=payload, headers=headers, timeout=60.0)
    except httpx.HTTPError as exc:
        raise RagError(f"server {args.server} is not reachable ({exc})") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise RagError(f"server {args.server} answered {response.status_code}: {message}")
    return list(response.json()["hits"])


def _cmd_search(args: argparse.Namespace) -> int:
    def body():
        if args.server:
            hits = _search_remote(args)
            data = {"query": args.query, "mode": args.mode, "server": args.server,
                    "indices": list(dict.fromkeys(args.index)) if args.index else [],
                    "hits": hits}
            lines = [f"{len(hits)} hit(s) for {args.query!r} ({args.mode}, via {args.server})"]
            for n, h in enumerate(hits, start=1):
                snippet = " ".join(h["text"].split())[:160]
                lines.append(f"[{n}] {h['score']:.4f}  {h['index']}:{h['chunk_id']}\n"
                             f"    {snippet}")
            return data, "\n".join(lines)
        from r3mes.rag.indices import route_domain
        from r3mes.rag.retriever import Retriever

        store = _store(args)
        retriever = Retriever(store, mode=args.mode, rerank=bool(args.rerank_model),
                              reranker_model=args.rerank_model)
        hits = retriever.search(args.query, top_k=args.top_k, indices=args.index,
                                filters=_parse_filters(args.filter) or None, domain=args.domain)
        if args.index:
            searched = list(dict.fromkeys(args.index))
        elif args.domain is not None:
            searched = route_domain(args.domain)
        else:
            searched = store.existing()
        data = {"query": args.query, "mode": args.mode, "indices": list(searched),
                "hits": [h.to_dict() for h in hits]}
        lines = [f"{len(hits)} hit(s) for {args.query!r} ({args.mode})"]
        for n, h in enumerate(hits, start=1):
            snippet = " ".join(h.text.split())[:160]
            lines.append(f"[{n}] {h.score:.4f}  {h.index}:{h.chunk_id}\n    {snippet}")
        return data, "\n".join(lines)

    return _run(args, body)


def _cmd_list(args: argparse.Namespace) -> int:
    def body():
        store = _store(args)
        rows = []
        for name in store.existing():
            stats = store.index(name).stats()
            stats["snapshots"] = [s.to_dict() for s in store.snapshots(name)]
            stats["cid"] = _snapshot_cid(store, name, stats["snapshot"])
            rows.append(stats)
        lines = [] if rows else ["no indices yet (add documents with `r3mes index add`)"]
        for r in rows:
            lines.append(f"{r['name']}: {r['documents']} document(s), {r['chunks']} chunk(s), "
                         f"{r['active_kind']}, current {str(r['snapshot'])[:12]}"
                         + (f", ipfs://{r['cid']}" if r["cid"] else ""))
            for s in r["snapshots"]:
                lines.append(f"    {s['digest'][:12]}  {s['documents']} doc(s)  {s['chunks']} "
                             f"chunk(s)")
        return {"indices": rows}, "\n".join(lines)

    return _run(args, body)


def _snapshot_cid(store, name: str, digest: str | None) -> str | None:
    """The IPFS CID of the current snapshot (computed once, then cached by digest)."""
    if digest is None:
        return None
    from r3mes.distribution.publish import index_cid

    return index_cid(name, digest, store.root.parent, store)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    def body():
        store = _store(args)
        with store.lock():
            info = store.save(args.index)
        return {"snapshot": info.to_dict()}, f"snapshot {info.digest} of '{args.index}'"

    return _run(args, body)


def _cmd_restore(args: argparse.Namespace) -> int:
    def body():
        store = _store(args)
        with store.lock():
            info = store.restore(args.index, args.digest)
        return {"restored": info.to_dict()}, \
            f"'{args.index}' is now at snapshot {info.digest} ({info.chunks} chunk(s))"

    return _run(args, body)


def _cmd_purge(args: argparse.Namespace) -> int:
    def body():
        store = _store(args)
        with store.lock():
            index = store.index(args.index)
            expired = index.purge_expired()
            present = [d for d in args.doc_id if d in index.docs]
            index.delete_documents(present)
            info = store.save(args.index)
        data = {"index": args.index, "expired": expired, "deleted": present,
                "snapshot": info.to_dict()}
        return data, (f"purged {len(expired)} expired and deleted {len(present)} document(s) "
                      f"from '{args.index}'; snapshot {info.digest[:12]}")

    return _run(args, body)


def _cmd_stats(args: argparse.Namespace) -> int:
    failed = False

    def body():
        nonlocal failed
        rows = _store(args).stats(verify=args.verify)
        failed = any(r["error"] for r in rows)
        totals = {k: sum(r[k] or 0 for r in rows) for k in ("documents", "chunks", "disk_bytes")}
        lines = [] if rows else ["no indices yet (add documents with `r3mes index add`)"]
        for r in rows:
            if r["error"] and r["documents"] is None:
                lines.append(f"{r['name']}: ERROR {r['error']}")
                continue
            lines.append(
                f"{r['name']}: {r['documents']} document(s), {r['chunks']} chunk(s), "
                f"{r['kind']}, {r['disk_bytes'] / 2**20:.2f} MiB, snapshot "
                f"{str(r['snapshot'])[:12]} ({r['snapshot_kind']}"
                + (f", {r['deltas']} delta(s)" if r["deltas"] else "") + ")"
                + (f"\n    ERROR {r['error']}" if r["error"] else ""))
        if rows:
            lines.append(f"total: {totals['documents']} document(s), {totals['chunks']} "
                         f"chunk(s), {totals['disk_bytes'] / 2**20:.2f} MiB")
        return {"indices": rows, "totals": totals}, "\n".join(lines)

    code = _run(args, body)
    return 1 if code == 0 and failed else code


def _cmd_export(args: argparse.Namespace) -> int:
    def body():
        store = _store(args)
        with store.lock():
            data = store.export(args.index, args.out, args.snapshot)
        return data, (f"exported '{args.index}' snapshot {data['digest'][:12]} "
                      f"({len(data['snapshots'])} snapshot dir(s), {data['bytes']} bytes) to "
                      f"{data['path']}")

    return _run(args, body)


def _cmd_publish(args: argparse.Namespace) -> int:
    from r3mes.distribution.cli import index_publish

    return _run(args, lambda: index_publish(args))


def _cmd_pull(args: argparse.Namespace) -> int:
    from r3mes.distribution.cli import index_pull

    return _run(args, lambda: index_pull(args))


def _cmd_import(args: argparse.Namespace) -> int:
    def body():
        store = _store(args)
        with store.lock():
            data = store.import_snapshot(args.path)
        s = data["imported"]
        data["imported"] = s.to_dict()
        text = (f"imported snapshot {s.digest[:12]} as the current '{s.index}' "
                f"({s.documents} document(s), {s.chunks} chunk(s))")
        if data["replaced"]:
            text += f"; the previous one ({data['replaced'][:12]}) can be restored"
        return data, text

    return _run(args, body)
