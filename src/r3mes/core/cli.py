"""``r3mes convert`` and ``r3mes generate``: the model runner on the command line.

Both take ``--home`` (the data directory; relative model paths are tried there under
``models/`` when they do not exist as given) and ``--json``. JSON schemas (stable; keys
may be added, never removed or renamed)::

    convert:  {"src": str, "dst": str, "format": "r3mes-bitnet", "format_version": int,
               "head": str, "weights_sha256": str, "weights_bytes": int, "seconds": float}
    generate: {"model": str, "backend": str, "load_seconds": float,
               "results": [{"prompt": str, "prompt_tokens": int, "tokens": [int],
                            "text": str | null, "finish_reason": str}],
               "prefill_tokens": int, "generated_tokens": int, "seconds": float,
               "tokens_per_second": float}
    errors:   {"error": str} on stdout with --json (else "error: ..." on stderr), exit 2.

``generate`` streams text to stdout as it comes unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=None, help="data directory (default $R3MES_HOME or "
                   "~/.r3mes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert``, ``generate`` and ``train-adapter`` to the main ``r3mes`` parser."""
    conv = subparsers.add_parser("convert", help="convert an HF BitNet directory to the r3mes "
                                 "packed format")
    conv.add_argument("src", help="HF model directory (config.json + safetensors)")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--head", choices=("int8", "float"), default="int8",
                      help="LM head precision (default int8 with per-row scales)")
    _common(conv)
    conv.set_defaults(func=_cmd_convert)

    gen = subparsers.add_parser("generate", help="generate text with a BitNet model")
    gen.add_argument("prompt", nargs="+", help="one or more prompts (batched)")
    gen.add_argument("--model", required=True, help="model directory (HF or r3mes packed)")
    gen.add_argument("--backend", choices=("auto", "bitnet_cpp", "pytorch"), default="auto")
    gen.add_argument("--threads", type=int, default=None, help="native kernel threads")
    gen.add_argument("--device", default="cpu",
                     help="native backend device: cpu (default), cuda, cuda:N or auto "
                          "(the CUDA path has not been run on a GPU yet)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                     help="check the r3mes weights file's sha256 before running (default; "
                          "--no-verify skips it, ~0.6 s a GB)")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--adapter", action="append", default=[], metavar="ID=DIR",
                     help="load a PEFT DoRA adapter and mix it in (repeatable)")
    gen.add_argument("--adapter-weight", action="append", type=float, default=[],
                     help="weight of each --adapter, in order (default equal)")
    _common(gen)
    gen.set_defaults(func=_cmd_generate)

    train = subparsers.add_parser("train-adapter", help="train a DoRA expert on a text file "
                                  "against a frozen BitNet model (PEFT-format output)")
    train.add_argument("--model", required=True, help="model directory (HF or r3mes packed)")
    train.add_argument("--data", required=True, help="training text (.txt or .jsonl)")
    train.add_argument("--name", required=True, help="adapter id, e.g. medical_dora")
    train.add_argument("--out", required=True, help="output PEFT adapter directory")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--alpha", type=float, default=32.0)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--targets", default=None,
                       help="comma-separated projection names (default: all seven)")
    train.add_argument("--no-resume", action="store_true",
                       help="start over instead of continuing from OUT/checkpoint")
    _common(train)
    train.set_defaults(func=_cmd_train_adapter)


def _fail(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"error": message}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return 2


def _resolve(path: str, home: str | None) -> Path:
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    from r3mes.utils.paths import r3mes_home

    candidate = r3mes_home(home) / "models" / path
    return candidate if candidate.exists() else p


def _cmd_convert(args: argparse.Namespace) -> int:
    from r3mes.core.checkpoint import CheckpointError, convert

    src, dst = _resolve(args.src, args.home), Path(args.dst)
    t0 = time.perf_counter()
    try:
        manifest = convert(src, dst, head=args.head)
    except (CheckpointError, ValueError, OSError) as exc:
        return _fail(args, str(exc))
    out = {"src": str(src), "dst": str(dst), "format": manifest["format"],
           "format_version": manifest["format_version"], "head": manifest["head"],
           "weights_sha256": manifest["weights_sha256"],
           "weights_bytes": manifest["weights_bytes"],
           "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"converted {src} -> {dst} ({out['weights_bytes'] / 1e6:.1f} MB, head "
              f"{out['head']}, sha256 {out['weights_sha256'][:16]}..., {out['seconds']} s)")
    return 0


def _cmd_train_adapter(args: argparse.Namespace) -> int:
    from r3mes.core.checkpoint import CheckpointError, load_model
    from r3mes.core.tokenizer import Tokenizer, TokenizerError
    from r3mes.core.trainer import load_texts, train_adapter

    model_dir = _resolve(args.model, args.home)
    for flag, value, low in (("--steps", args.steps, 1), ("--rank", args.rank, 1),
                             ("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            return _fail(args, f"{flag} must be at least {low}, got {value}")
    if not args.lr > 0 or not args.alpha > 0:
        return _fail(args, "--lr and --alpha must be positive")
    t0 = time.perf_counter()
    try:
        load_texts(args.data)  # a wrong file fails before the model loads
        model, _ = load_model(model_dir)
        tokenizer = Tokenizer(model_dir)
        result = train_adapter(
            model, Path(args.data), tokenizer=tokenizer, output_dir=Path(args.out),
            resume=not args.no_resume, progress=not args.json, adapter_name=args.name,
            steps=args.steps, rank=args.rank, alpha=args.alpha, seq_len=args.seq_len,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            target_modules=args.targets.split(",") if args.targets else None)
    except (CheckpointError, TokenizerError, ValueError, OSError) as exc:
        return _fail(args, str(exc))
    out = {"adapter": args.name, "output_dir": str(result.output_dir), "steps": result.steps,
           "resumed_from": result.resumed_from,
           "first_loss": result.losses[0] if result.losses else None,
           "last_loss": result.losses[-1] if result.losses else None,
           "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"trained {args.name}: {out['steps']} steps, loss {out['first_loss']} -> "
              f"{out['last_loss']}, saved to {out['output_dir']}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from r3mes.core.backends import BitNetCppBackend, PyTorchBackend, get_best_backend
    from r3mes.core.checkpoint import CheckpointError
    from r3mes.core.generation import GenerationConfig

    try:
        config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty,
                                  stop=tuple(args.stop), seed=args.seed)
        if args.backend == "pytorch":
            backend = PyTorchBackend()
        elif args.backend == "bitnet_cpp" or args.device != "cpu":
            backend = BitNetCppBackend(num_threads=args.threads, device=args.device)
        else:
            backend = get_best_backend(num_threads=args.threads)
        info = backend.load_base_model(_resolve(args.model, args.home), verify=args.verify)
        ids, weights = [], list(args.adapter_weight)
        for spec in args.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                return _fail(args, f"--adapter {spec!r}: expected ID=DIR")
            backend.load_dora_adapter(name, _resolve(path, args.home))
            ids.append(name)
        if weights and len(weights) != len(ids):
            return _fail(args, f"--adapter-weight: {len(weights)} weights for {len(ids)} "
                         "adapters")
        prompts: list[Any] = ([[{"role": "user", "content": p}] for p in args.prompt]
                              if args.chat else list(args.prompt))
        t0 = time.perf_counter()
        if args.json or len(prompts) > 1:
            results = backend.generate(prompts, config, ids, weights)
        else:
            results = None
            tokens: list[int] = []
            reason = None
            for ev in backend.stream(prompts, config, ids, weights):
                tokens.append(ev.token_id)
                if ev.text:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                reason = ev.finish_reason or reason
            sys.stdout.write("\n")
        seconds = time.perf_counter() - t0
    except (CheckpointError, ValueError, KeyError, OSError, RuntimeError) as exc:
        return _fail(args, str(exc))
    if results is None:
        return 0
    generated = sum(len(r.tokens) for r in results)
    if args.json:
        out = {"model": str(args.model), "backend": backend.name,
               "load_seconds": round(info.seconds, 4),
               "results": [{"prompt": p, "prompt_tokens": r.prompt_tokens, "tokens": r.tokens,
                            "text": r.text, "finish_reason": r.finish_reason}
                           for p, r in zip(args.prompt, results, strict=True)],
               "prefill_tokens": sum(r.prompt_tokens for r in results),
               "generated_tokens": generated, "seconds": round(seconds, 4),
               "tokens_per_second": round(generated / seconds, 3) if seconds > 0 else 0.0}
        print(json.dumps(out, indent=2))
    else:
        for p, r in zip(args.prompt, results, strict=True):
            print(f"--- {p}\n{r.text if r.text is not None else r.tokens}")
    return 0
