"""``r3mes convert``, ``r3mes generate`` and ``r3mes bench --model``: the model runner on the
command line.

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
    bench --model: (the ``bench`` command is registered by r3mes.kernels.cli)
              {"model": {"path": str, "format": str, "head": str, "head_kind": str,
                         "load_seconds": float, "layers": int, "hidden_size": int,
                         "vocab_size": int, "parameters": {"ternary": int, "embedding": int,
                         "lm_head": int, "total": int}, "weight_bytes": {str: int},
                         "bytes_per_token": int, "adapter_bytes_per_token": {str: int}},
               "cpu": {"name": str, "cores": int, "simd_level": str, "features": [str],
                       "amx": bool, "weight_layout": str},
               "settings": {"backend": str, "threads": [int], "experts": [int],
                            "prompt_tokens": int, "gen_tokens": int, "warmup_tokens": int,
                            "repetitions": int, "adapters": [str] | str | null,
                            "adapter_storage": str, "torch": str},
               "results": [{"test": "pp128" | "tg64" ..., "kind": "pp" | "tg",
                            "tokens": int, "threads": int, "experts": int,
                            "tok_s_mean": float, "tok_s_stdev": float,
                            "ms_per_token": float, "samples_tok_s": [float]}]}
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
                                 "packed format (or an r3mes one to another --head)")
    conv.add_argument("src", help="HF model directory (config.json + safetensors)")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--head", choices=("int8", "int4", "float"), default="int8",
                      help="LM head precision: int8 with per-row scales (default), int4 in "
                      "groups of 64 (half the bytes, see MODEL_CARD.md for its cost), float32")
    conv.add_argument("--calibration", metavar="TEXT_FILE",
                      help="with --head int4: UTF-8 text run through the model to weigh each "
                      "hidden feature's rounding error (its first --calibration-tokens tokens)")
    conv.add_argument("--calibration-tokens", type=int, default=4096)
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
        text = None
        if args.calibration is not None:
            text = Path(args.calibration).read_text(encoding="utf-8")
        manifest = convert(src, dst, head=args.head, calibration_text=text,
                           calibration_tokens=args.calibration_tokens)
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
    from r3mes.core.backends import create_backend
    from r3mes.core.checkpoint import CheckpointError
    from r3mes.core.generation import GenerationConfig

    try:
        config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty,
                                  stop=tuple(args.stop), seed=args.seed)
        backend = create_backend(args.backend, device=args.device, num_threads=args.threads)
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


# --------------------------------------------------------------------------- bench
#: ``r3mes bench --model`` options (the ``bench`` parser is the kernels' one, which adds
#: these: without ``--model`` it measures the bare kernels), with their defaults.
MODEL_BENCH_DEFAULTS: dict[str, Any] = {"experts": [0], "adapters": [], "prompt_tokens": 128,
                                        "gen_tokens": 64, "warmup_tokens": 16,
                                        "repetitions": 5, "head": "int8"}


def int_list(text: str) -> list[int]:
    """argparse type: ``"1,2"`` -> ``[1, 2]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got "
                                         f"{text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_model_bench_options(bench: argparse.ArgumentParser) -> None:
    """The ``--model`` mode of ``r3mes bench``: prefill and decode tok/s of a model."""
    from r3mes.core.checkpoint import HEAD_KINDS

    d = MODEL_BENCH_DEFAULTS
    g = bench.add_argument_group(
        "model (--model DIR)",
        "Prefill (pp: a random prompt into an empty cache) and decode (tg: tokens one at a "
        "time after a warm-up) tok/s of a model directory on the native CPU backend, run "
        "as the pipeline runs them, for every --threads and --experts value, cases "
        "interleaved across repetitions: mean and stdev, like llama-bench.")
    g.add_argument("--model", default=None, help="model directory (HF or r3mes packed)")
    g.add_argument("--experts", type=int_list, default=None, metavar="K[,K...]",
                   help=f"DoRA experts mixed with equal weights (default {d['experts'][0]})")
    g.add_argument("--adapters", nargs="+", default=None, metavar="DIR",
                   help="PEFT DoRA directories to mix (K experts: the first K); default "
                   "random rank-16 adapters built in memory")
    g.add_argument("--prompt-tokens", type=int, default=None,
                   help=f"pp prompt length (default {d['prompt_tokens']}; 0: no pp test)")
    g.add_argument("--gen-tokens", type=int, default=None,
                   help=f"timed decode tokens (default {d['gen_tokens']}; 0: no tg test)")
    g.add_argument("--warmup-tokens", type=int, default=None,
                   help=f"untimed decode tokens before them (default {d['warmup_tokens']})")
    g.add_argument("--repetitions", "-r", type=int, default=None,
                   help=f"repetitions of every case (default {d['repetitions']})")
    g.add_argument("--head", choices=sorted(HEAD_KINDS), default=None,
                   help="LM head of an HF directory (default int8; an r3mes directory has "
                   "its own)")


def model_bench_options_misused(args: argparse.Namespace) -> str | None:
    """The error for ``--model``-only options given without ``--model`` (else None)."""
    given = [k for k in MODEL_BENCH_DEFAULTS if getattr(args, k, None) is not None]
    if args.model is None and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        return f"{flags}: only with --model DIR"
    return None


def run_model_bench(args: argparse.Namespace) -> int:
    """``r3mes bench --model DIR``: run the speed report and print it (table or JSON)."""
    from r3mes import kernels
    from r3mes.core.checkpoint import CheckpointError
    from r3mes.core.speed_report import run_speed_report

    opts = {k: d if getattr(args, k, None) is None else getattr(args, k)
            for k, d in MODEL_BENCH_DEFAULTS.items()}
    threads = args.threads or [kernels.get_num_threads()]
    try:
        report = run_speed_report(
            _resolve(args.model, args.home), threads=threads, experts=opts["experts"],
            prompt_tokens=opts["prompt_tokens"], gen_tokens=opts["gen_tokens"],
            warmup_tokens=opts["warmup_tokens"], repetitions=opts["repetitions"],
            adapters=[_resolve(a, args.home) for a in opts["adapters"]], head=opts["head"])
    except (CheckpointError, ValueError, KeyError, OSError, RuntimeError) as exc:
        return _fail(args, str(exc))
    data = report.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    m, cpu, st = data["model"], data["cpu"], data["settings"]
    print(f"model {m['path']} ({m['format']}): {m['parameters']['total'] / 1e9:.2f} B "
          f"parameters, {m['layers']} layers, head {m['head']}")
    print(f"read per token: {m['bytes_per_token'] / 1e6:.0f} MB (ternary "
          f"{m['weight_bytes']['ternary'] / 1e6:.0f} MB + head "
          f"{m['weight_bytes']['lm_head'] / 1e6:.0f} MB)")
    print(f"CPU: {cpu['name']}, {cpu['cores']} cores, SIMD {cpu['simd_level']}, "
          f"AMX {'yes' if cpu['amx'] else 'no'}; adapters: {st['adapters'] or 'none'} "
          f"({st['adapter_storage']}); {st['repetitions']} repetitions")
    print()
    print("| threads | experts | test | t/s | ms/token | MB read/token |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in data["results"]:
        read = m["bytes_per_token"] + m["adapter_bytes_per_token"][str(r["experts"])]
        print(f"| {r['threads']} | {r['experts']} | {r['test']} | {r['tok_s_mean']:.2f} ± "
              f"{r['tok_s_stdev']:.2f} | {r['ms_per_token']:.2f} | {read / 1e6:.0f} |")
    return 0
