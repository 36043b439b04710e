"""``r3mes rag ...``: add documents, search, list indices and snapshots, snapshot, restore,
purge.

Every sub-command takes ``--home`` (the data directory) and ``--json``. JSON schemas (stable):

- ``add``:      ``{"index", "files": [..], "documents", "replaced", "chunks",
  "expired": [doc ids already past their time-to-live], "snapshot": S}``
- ``search``:   ``{"query", "mode", "indices": [..], "hits": [H, ...]}`` with
  ``H = {"doc_id", "chunk_id", "text", "score", "index", "position", "metadata"}``
- ``list``:     ``{"indices": [{"name", "documents", "chunks", "kind", "active_kind",
  "ttl_s", "snapshot", "snapshots": [S, ...]}]}`` (only indices with a snapshot)
- ``snapshot``: ``{"snapshot": S}``
- ``restore``:  ``{"restored": S}``
- ``purge``:    ``{"index", "expired": [doc ids], "deleted": [doc ids], "snapshot": S}``

``S = {"digest", "index", "created", "documents", "chunks", "parent"}``. Errors print
``error: ...`` to stderr (or ``{"error": ...}`` with ``--json``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from r3mes.rag.errors import RagError
from r3mes.rag.indices import INDEX_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rag`` command group to the main parser."""
    rag = subparsers.add_parser("rag", help="retrieval: index documents and search them")
    sub = rag.add_subparsers(dest="rag_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--home", help="data directory (default $R3MES_HOME or ~/.r3mes)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = common(sub.add_parser("add", help="index text, Markdown or JSONL files"))
    p.add_argument("paths", nargs="+", help=".txt, .md or .jsonl files")
    p.add_argument("--index", default="general", choices=INDEX_NAMES)
    p.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"),
                   help="vector index type for a new index (default flat)")
    p.set_defaults(func=_cmd_add)

    p = common(sub.add_parser("search", help="search the indices"))
    p.add_argument("query")
    p.add_argument("--index", action="append", choices=INDEX_NAMES,
                   help="index to search (repeatable; default: every index with content)")
    p.add_argument("--domain", help="route by a router domain (medical, legal, code, news...)")
    p.add_argument("--mode", default="hybrid", choices=("dense", "sparse", "hybrid"))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep chunks whose metadata KEY equals VALUE (repeatable)")
    p.add_argument("--rerank-model", help="local cross-encoder directory: rerank the results")
    p.set_defaults(func=_cmd_search)

    p = common(sub.add_parser("list", help="indices, their sizes and snapshots"))
    p.set_defaults(func=_cmd_list)

    p = common(sub.add_parser("snapshot", help="write the current state as a new snapshot"))
    p.add_argument("--index", default="general", choices=INDEX_NAMES)
    p.set_defaults(func=_cmd_snapshot)

    p = common(sub.add_parser("restore", help="make an earlier snapshot current"))
    p.add_argument("digest", help="snapshot digest (a unique prefix of at least 6 digits)")
    p.add_argument("--index", default="general", choices=INDEX_NAMES)
    p.set_defaults(func=_cmd_restore)

    p = common(sub.add_parser("purge", help="drop expired documents (and named ones)"))
    p.add_argument("--index", default="news", choices=INDEX_NAMES)
    p.add_argument("--doc-id", action="append", default=[], help="also delete this document")
    p.set_defaults(func=_cmd_purge)


def _store(args: argparse.Namespace, configs: dict[str, Any] | None = None):
    from r3mes.rag.indices import RagStore

    return RagStore(args.home, configs=configs)


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
        from r3mes.rag.chunker import load_documents
        from r3mes.rag.indices import IndexConfig

        configs = {args.index: IndexConfig.for_index(args.index, kind=args.kind)} \
            if args.kind else None
        store = _store(args, configs)
        # Read and validate every file before touching the index.
        docs = [d for path in args.paths for d in load_documents(path)]
        with store.lock():
            index = store.index(args.index)
            counts = index.add_documents(docs)
            expired = index.purge_expired()  # e.g. news older than its time-to-live
            info = store.save(args.index)
        data = {"index": args.index, "files": list(args.paths), **counts, "expired": expired,
                "snapshot": info.to_dict()}
        text = (f"added {counts['documents']} document(s), {counts['chunks']} chunk(s) to "
                f"'{args.index}' (replaced {counts['replaced']}); snapshot {info.digest[:12]}")
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


def _cmd_search(args: argparse.Namespace) -> int:
    def body():
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
            rows.append(stats)
        lines = [] if rows else ["no indices yet (add documents with `r3mes rag add`)"]
        for r in rows:
            lines.append(f"{r['name']}: {r['documents']} document(s), {r['chunks']} chunk(s), "
                         f"{r['active_kind']}, current {str(r['snapshot'])[:12]}")
            for s in r["snapshots"]:
                lines.append(f"    {s['digest'][:12]}  {s['documents']} doc(s)  {s['chunks']} "
                             f"chunk(s)")
        return {"indices": rows}, "\n".join(lines)

    return _run(args, body)


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
