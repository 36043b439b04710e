"""``r3mes route`` and ``r3mes experts list|embed``.

JSON schemas (``--json``; keys are stable, new keys may be added):

``r3mes route``::

    {"query_chars": int, "strategy": "keyword|semantic|hybrid",
     "experts": [{"id": str, "weight": float}],        # weights sum to 1
     "scores": [{"id": str, "score": float}],          # ungated ranking, best first
     "fast_path": bool, "keyword_confidence": float,
     "language": str|null, "language_probability": float,
     "fallback_used": bool, "top_k": int, "vram_gb": float, "truncated": bool,
     "timings_ms": {"keyword": float, "semantic"?: float, "fusion"?: float, "gating": float},
     "total_ms": float,
     "topic_confidence": float|null,   # calibrated p of the best topical expert
     "general_decision": bool}         # the fallback went first: that p was too low

``r3mes experts list``::

    {"registry": str, "digest": str,
     "experts": [{"id", "kind", "language", "description", "queries": int,
                  "strong": int, "weak": int, "patterns": int}]}

``r3mes experts embed``::

    {"registry": str, "model": str, "rows": int, "dim": int, "source": "built",
     "npy": str, "metadata": str}

Errors (empty query, bad registry, unknown expert) print ``r3mes: error: ...`` on stderr
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _fail(message: str) -> int:
    print(f"r3mes: error: {message}", file=sys.stderr)
    return 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--home", default=None, help="data directory (default $R3MES_HOME or ~/.r3mes)"
    )
    parser.add_argument("--registry", default=None, help="expert registry YAML (default: packaged)")


def _cmd_route(args: argparse.Namespace) -> int:
    from r3mes.router.hybrid_router import EmptyQueryError, HybridRouter
    from r3mes.router.registry import RegistryError

    expert_ids = None
    if args.experts:
        expert_ids = [e.strip() for e in args.experts.split(",") if e.strip()]
    try:
        router = HybridRouter(
            args.registry, expert_ids=expert_ids, model_name=args.model, home=args.home
        )
        # Load what every route needs first so the stage timings show routing, not start-up
        # (the sentence model still loads inside the semantic stage of a full-path query).
        router.warm_up(semantic=args.strategy == "semantic")
        decision = router.route_decision(
            args.query,
            args.vram_gb,
            budget_mb=args.budget_mb,
            top_k=args.top_k,
            strategy=args.strategy,
        )
    except (EmptyQueryError, RegistryError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    data = decision.to_dict()
    data = {"query_chars": len(args.query), **data}
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    path = "fast path (keyword only)" if decision.fast_path else "full path"
    if args.strategy != "hybrid":
        path = f"{args.strategy} only"
    print(f"experts ({path}, top-{decision.top_k} for {decision.vram_gb:g} GB):")
    for expert_id, weight in decision.experts:
        print(f"  {expert_id:<20} {weight:.3f}")
    if decision.fallback_used:
        print("  (no expert was confident enough: fallback)")
    language = decision.language or "unknown"
    print(f"keyword confidence {decision.keyword_confidence:.3f}, language {language} "
          f"({decision.language_probability:.2f})")
    stages = ", ".join(f"{k} {v:.2f} ms" for k, v in decision.timings_ms.items())
    print(f"timings: {stages}; total {decision.total_ms:.2f} ms")
    if decision.truncated:
        print("note: the query was long; only its head was routed")
    return 0


def _cmd_experts_list(args: argparse.Namespace) -> int:
    from r3mes.router.registry import RegistryError, load_registry

    try:
        registry = load_registry(args.registry)
    except RegistryError as exc:
        return _fail(str(exc))
    rows: list[dict[str, Any]] = [
        {
            "id": e.id,
            "kind": e.kind,
            "language": e.language,
            "description": e.description,
            "queries": len(e.queries),
            "strong": len(e.strong),
            "weak": len(e.weak),
            "patterns": len(e.patterns),
        }
        for e in registry
    ]
    if args.json:
        out = {"registry": registry.source, "digest": registry.digest, "experts": rows}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(f"{len(rows)} experts in {registry.source}")
    for row in rows:
        kind = row["kind"] + (f":{row['language']}" if row["language"] else "")
        print(f"  {row['id']:<20} {kind:<12} {row['description']}")
    return 0


def _cmd_experts_embed(args: argparse.Namespace) -> int:
    from r3mes.router.registry import RegistryError, load_registry
    from r3mes.router.semantic_router import (
        build_embeddings,
        home_embeddings_dir,
        save_embeddings,
    )

    try:
        registry = load_registry(args.registry)
        embeddings = build_embeddings(registry, args.model)
    except (RegistryError, FileNotFoundError) as exc:
        return _fail(str(exc))
    directory = args.output or home_embeddings_dir(args.home)
    npy, meta = save_embeddings(embeddings, directory)
    out = {
        "registry": registry.source,
        "model": embeddings.model,
        "rows": int(embeddings.matrix.shape[0]),
        "dim": int(embeddings.matrix.shape[1]),
        "source": "built",
        "npy": str(npy),
        "metadata": str(meta),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"embedded {out['rows']} representative queries ({out['dim']}-d, {out['model']})")
        print(f"  {npy}\n  {meta}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``route`` and ``experts`` to the main ``r3mes`` parser."""
    route = subparsers.add_parser("route", help="pick the DoRA experts for a query")
    route.add_argument("query", help="the query text")
    route.add_argument("--vram-gb", type=float, default=None,
                       help="memory budget in GB (default: free CUDA memory, else 8)")
    route.add_argument("--budget-mb", type=float, default=None, help="memory budget in MB")
    route.add_argument("--top-k", type=int, default=None, help="override the budget's expert count")
    route.add_argument("--strategy", choices=("keyword", "semantic", "hybrid"), default="hybrid")
    route.add_argument("--experts", default=None,
                       help="comma-separated installed expert ids to route over (default: all)")
    route.add_argument("--model", default=None,
                       help="sentence encoder (default: the bundled multilingual-e5-small)")
    _common(route)
    route.set_defaults(func=_cmd_route)

    experts = subparsers.add_parser("experts", help="list the expert registry or embed it")
    sub = experts.add_subparsers(dest="experts_command", required=True)
    listing = sub.add_parser("list", help="list the experts of the registry")
    _common(listing)
    listing.set_defaults(func=_cmd_experts_list)
    embed = sub.add_parser("embed", help="(re)build the semantic router's expert embeddings")
    embed.add_argument("--model", default=None,
                       help="sentence encoder (default: the bundled multilingual-e5-small)")
    embed.add_argument("--output", default=None,
                       help="directory for the .npy/.json pair (default: <home>/router)")
    _common(embed)
    embed.set_defaults(func=_cmd_experts_embed)
