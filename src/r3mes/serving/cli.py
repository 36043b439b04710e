"""``r3mes ask``, ``r3mes chat``, ``r3mes serve`` and ``r3mes config show``.

Every command takes ``--home`` (the data directory) and ``--config`` (a YAML file, see
:mod:`r3mes.config`); flags override the file and the environment.

``ask --json`` prints one object, :meth:`PipelineResult.to_dict`::

    {"query", "output", "success", "error", "error_type", "finish_reason",
     "experts_used": [{"id", "weight"}], "fast_path", "sources": [{"number", "doc_id",
     "chunk_id", "index", "title", "source", "score", "cited"}], "rag_context", "tokens",
     "metrics": {total_time_ms, rag_time_ms, routing_time_ms, loading_time_ms,
                 inference_time_ms, rag_docs_retrieved, rag_context_length, used_fast_path,
                 keyword_confidence, adapters_loaded, cache_hits, cache_misses,
                 tokens_generated, backend_used, prefetch_time_ms, postprocess_time_ms,
                 queue_time_ms, time_to_first_token_ms, prompt_tokens, batch_size,
                 routing_stages_ms, overhead_ms},
     "routing", "masked_terms", "warnings": [str], "notices": [str]}

``warnings`` names a broken expert or index the answer was given without; ``notices`` are
the pipeline's one-line notes (the demo model, stored experts that do not fit the model),
printed once on stderr without ``--json``.

``config show --json`` prints ``{"config": <the YAML's shape>, "sources": {"defaults",
"file", "environment": [variable names]}}``. Errors print ``error: ...`` on stderr (or
``{"error": ...}`` with ``--json``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ask``, ``chat``, ``serve`` and ``config`` to the main parser."""

    def common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
        p.add_argument("--home", help="data directory (default $R3MES_HOME or ~/.r3mes)")
        p.add_argument("--config", help="configuration YAML (default $R3MES_CONFIG or "
                       "<home>/config.yaml, over the packaged defaults)")
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="base model directory (HF BitNet or r3mes packed); "
                       "default: the bundled demo model")
        p.add_argument("--backend", choices=("auto", "pytorch", "bitnet_cpp"),
                       help="inference backend (default: auto, the fastest available)")
        p.add_argument("--vram-gb", type=float, help="memory budget for expert gating "
                       "(<= 8: 1 expert, <= 16: 2, more: 3)")
        p.add_argument("--no-rag", action="store_true", help="answer without retrieval")
        p.add_argument("--force-experts", help="comma-separated expert ids instead of routing "
                       "(an empty string: the base model alone)")
        p.add_argument("--index", action="append", dest="indices",
                       help="RAG index to search (repeatable; default: all with content)")
        p.add_argument("--max-tokens", type=int, help="tokens to generate at most")
        p.add_argument("--temperature", type=float,
                       help="sampling temperature (0 is greedy; default from the config, 0.7)")
        p.add_argument("--seed", type=int, help="sampling seed")

    ask = subparsers.add_parser("ask", help="answer one question (router + RAG + experts)")
    ask.add_argument("query", help="the question")
    common(ask)
    model_flags(ask)
    ask.set_defaults(func=_cmd_ask)

    chat = subparsers.add_parser("chat", help="interactive chat with history "
                                 "(/reset clears it, /exit or Ctrl-D quits)")
    common(chat)
    model_flags(chat)
    chat.set_defaults(func=_cmd_chat)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    common(serve, json_flag=False)
    serve.add_argument("--model", help="base model directory (default: the demo model)")
    serve.add_argument("--backend", choices=("auto", "pytorch", "bitnet_cpp"))
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' "
                       "(or set R3MES_API_KEY)")
    serve.add_argument("--vram-gb", type=float, help="memory budget for expert gating")
    serve.add_argument("--no-rag", action="store_true", help="serve without retrieval")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))
    ray = serve.add_argument_group("Ray Serve (pip install \"r3mes[ray]\")")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve: engine replicas chosen by expert mix")
    ray.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2)")
    ray.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs of one engine replica (default 1)")
    serve.set_defaults(func=_cmd_serve)

    config = subparsers.add_parser("config", help="configuration")
    csub = config.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective configuration")
    common(show)
    show.set_defaults(func=_cmd_config_show)


# --------------------------------------------------------------------------- helpers


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        "model.path": getattr(args, "model", None),
        "inference.backend": getattr(args, "backend", None),
        "router.gating.vram_gb": getattr(args, "vram_gb", None),
        "generation.max_new_tokens": getattr(args, "max_tokens", None),
        "generation.temperature": getattr(args, "temperature", None),
        "generation.seed": getattr(args, "seed", None),
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.api_key": getattr(args, "api_key", None),
    }
    if getattr(args, "no_rag", False):
        flags["rag.enabled"] = False
    return flags


def _settings(args: argparse.Namespace) -> Any:
    from r3mes.config import load_config

    return load_config(args.config, home=args.home, overrides=_overrides(args))


def _fail(args: argparse.Namespace, message: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": message}, ensure_ascii=False))
    else:
        print(f"error: {message}", file=sys.stderr)
    return 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from r3mes.config import ConfigError
    from r3mes.serving.inference_pipeline import PipelineError

    errors: list[type[BaseException]] = [ConfigError, PipelineError]
    for module, name in (("r3mes.core.checkpoint", "CheckpointError"),
                         ("r3mes.cache", "AdapterStoreError"), ("r3mes.rag", "RagError"),
                         ("r3mes.router.registry", "RegistryError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _forced(args: argparse.Namespace) -> list[str] | None:
    if args.force_experts is None:
        return None
    return [e.strip() for e in args.force_experts.split(",") if e.strip()]


async def _start(args: argparse.Namespace, quiet: bool) -> Any:
    """Build and load the pipeline, with a progress bar on stderr."""
    from tqdm import tqdm

    from r3mes.serving.inference_pipeline import (
        InferencePipeline,
        PipelineConfig,
        resolve_model_path,
    )

    settings = _settings(args)
    resolve_model_path(settings.model.path)  # a missing model fails before the slow start
    pipeline = InferencePipeline(PipelineConfig.from_settings(settings, home=args.home))
    with tqdm(total=2, desc="starting r3mes", unit="step", file=sys.stderr,
              disable=quiet or None, leave=False) as bar:
        bar.set_postfix_str("router, retrieval, experts")
        await pipeline.initialize()
        bar.update()
        bar.set_postfix_str("base model")
        await pipeline.load_model()
        bar.update()
    if not getattr(args, "json", False):
        # Said once, before the answer: the demo model, experts that do not fit the model.
        for notice in pipeline.notices:
            print(notice, file=sys.stderr)
    return pipeline


def _summary(result: Any) -> str:
    m = result.metrics
    lines = ["", "---"]
    experts = ", ".join(f"{e} ({w:.2f})" for e, w in result.experts_used) or "base model only"
    lines.append(f"experts:   {experts}")
    if result.routing is not None:
        lines.append(f"routing:   {'fast path' if m.used_fast_path else 'full path'} "
                     f"(keyword confidence {m.keyword_confidence:.2f})")
    else:
        lines.append("routing:   forced")
    if result.sources:
        lines.append("sources:")
        for s in result.sources:
            label = s.get("title") or s.get("doc_id")
            mark = " (cited)" if s.get("cited") else ""
            lines.append(f"  [{s['number']}] {label} - {s['doc_id']} in {s['index']}{mark}")
    else:
        lines.append("sources:   none")
    ttft = (f", first token {m.time_to_first_token_ms:.0f} ms"
            if m.time_to_first_token_ms is not None else "")
    lines.append(
        f"timings:   routing {m.routing_time_ms:.1f} ms, rag {m.rag_time_ms:.1f} ms, "
        f"loading {m.loading_time_ms:.1f} ms, inference {m.inference_time_ms:.0f} ms "
        f"({m.tokens_generated} tokens), total {m.total_time_ms:.0f} ms{ttft}")
    lines.append(f"cache:     {m.cache_hits} hit(s), {m.cache_misses} miss(es); "
                 f"backend {m.backend_used}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def _cmd_ask(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_ask(args))
    except _expected_errors() as exc:
        return _fail(args, str(exc))


async def _ask(args: argparse.Namespace) -> int:
    pipeline = await _start(args, quiet=args.json)
    try:
        kwargs = {"force_experts": _forced(args), "skip_rag": args.no_rag,
                  "rag_indices": args.indices}
        if args.json:
            result = await pipeline.run(args.query, **kwargs)
            print(json.dumps({**result.to_dict(), "notices": list(pipeline.notices)},
                             ensure_ascii=False, indent=2))
            return 0 if result.success else 2
        holder: list[Any] = []
        try:
            async for piece in pipeline.run_streaming(args.query, result_holder=holder,
                                                      **kwargs):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except _expected_errors() as exc:
            return _fail(args, str(exc))
        print(_summary(holder[0]))
        for warning in holder[0].warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    finally:
        await pipeline.close()


def _cmd_chat(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_chat(args))
    except _expected_errors() as exc:
        return _fail(args, str(exc))


async def _chat(args: argparse.Namespace) -> int:
    pipeline = await _start(args, quiet=args.json)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    loop = asyncio.get_running_loop()
    try:
        if interactive:
            print("r3mes chat: type a message; /reset clears the history, /exit quits.")
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history.clear()
                continue
            result = await pipeline.run(line, force_experts=_forced(args),
                                        skip_rag=args.no_rag, history=history,
                                        rag_indices=args.indices)
            if args.json:
                print(json.dumps(result.to_dict(), ensure_ascii=False))
            elif result.success:
                experts = ", ".join(f"{e} {w:.2f}" for e, w in result.experts_used)
                print(result.output)
                print(f"  [{experts or 'base'}; {result.metrics.total_time_ms:.0f} ms]")
                for warning in result.warnings:
                    print(f"warning: {warning}", file=sys.stderr)
            else:
                print(f"error: {result.error}", file=sys.stderr)
            if result.success:
                history.extend([{"role": "user", "content": line},
                                {"role": "assistant", "content": result.output}])
        return 0
    finally:
        await pipeline.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    from r3mes.serving.inference_pipeline import PipelineConfig, resolve_model_path
    from r3mes.serving.server import serve

    try:
        settings = _settings(args)
        resolve_model_path(settings.model.path)  # fail before binding the port
        config = PipelineConfig.from_settings(settings, home=args.home)
    except _expected_errors() as exc:
        return _fail(args, str(exc))
    if getattr(args, "ray", False):
        return _serve_on_ray(args, settings, config)
    print(f"r3mes serving on http://{settings.server.host}:{settings.server.port} "
          f"(OpenAI API at /v1; API key {'required' if settings.server.api_key else 'off'})",
          file=sys.stderr)
    serve(settings, config, log_level=args.log_level)
    return 0


def _serve_on_ray(args: argparse.Namespace, settings: Any, config: Any) -> int:
    if args.replicas < 1 or args.replica_cpus <= 0:
        return _fail(args, "--replicas must be at least 1 and --replica-cpus above 0")
    try:
        from r3mes.serving.ray_app import serve_on_ray
    except ImportError as exc:
        return _fail(args, f"--ray needs Ray Serve ({exc}): pip install \"r3mes[ray]\"")
    where = args.address or "a local Ray cluster"
    print(f"r3mes serving on Ray Serve ({args.replicas} engine replica(s) on {where}) at "
          f"http://{settings.server.host}:{settings.server.port} (OpenAI API at /v1; API key "
          f"{'required' if settings.server.api_key else 'off'})", file=sys.stderr)
    try:
        serve_on_ray(settings, config, replicas=args.replicas, address=args.address,
                     replica_cpus=args.replica_cpus)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from r3mes.config import config_sources

    try:
        settings = _settings(args)
    except _expected_errors() as exc:
        return _fail(args, str(exc))
    data = settings.to_dict()
    if data["server"]["api_key"]:
        data["server"]["api_key"] = "***"  # set, but never printed
    if args.json:
        print(json.dumps({"config": data,
                          "sources": config_sources(args.config, args.home)},
                         indent=2, ensure_ascii=False))
        return 0
    src = config_sources(args.config, args.home)
    print(f"# defaults: {src['defaults']}")
    print(f"# file:     {src['file'] or '(none)'}")
    print(f"# env:      {', '.join(src['environment']) or '(none)'}")
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return 0
