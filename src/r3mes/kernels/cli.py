"""``r3mes bench``: a quick measurement of the ternary kernels on this machine; with
``--model DIR``, prefill and decode tok/s of a model (:mod:`r3mes.core.speed_report`, whose
options and JSON schema :mod:`r3mes.core.cli` describes).

For the full suites (with pytest-benchmark statistics) see ``benchmarks/`` and
BENCHMARKS.md; this command answers "how fast is decode-shaped work here?" in seconds.
The ternary weights rotate over 256 MiB of copies so they stream from memory; the fp32
reference uses one weight (it may partly sit in a large last-level cache, which flatters
it).

``--json`` schema: ``{"read_bandwidth_gb_s": float, "threads": int, "simd_level": str,
"results": [{"op": "gemv"|"gemm", "shape": "OUTxIN", "tokens": int, "r3mes_us": float,
"torch_fp32_us": float, "speedup": float, "weight_gb_s": float,
"bandwidth_fraction": float}]}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable


def register(subparsers: argparse._SubParsersAction) -> None:
    from r3mes.core.cli import add_model_bench_options, int_list

    bench = subparsers.add_parser("bench", help="measure the ternary kernels on this machine "
                                  "(GEMV/GEMM vs torch fp32, fraction of read bandwidth); "
                                  "with --model, a model's prefill and decode tok/s")
    bench.add_argument("--shape", action="append", default=None, metavar="OUTxIN",
                       help="weight shape (repeatable; default 2560x6912 and 6912x2560)")
    bench.add_argument("--tokens", type=int, action="append", default=None,
                       help="tokens per call (repeatable; default 1 and 128)")
    bench.add_argument("--threads", type=int_list, default=None, metavar="N[,N...]",
                       help="kernel threads (default: all); with --model, each one given")
    bench.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    bench.add_argument("--home", default=None, help="data directory: a relative --model path "
                       "is tried under its models/ (default $R3MES_HOME or ~/.r3mes)")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    add_model_bench_options(bench)
    bench.set_defaults(func=_cmd_bench)


def _median_seconds(fn: Callable[[], object], budget: float) -> float:
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shape: expected OUTxIN such as 2560x6912, got {text!r}") from None
    if out_f <= 0 or in_f <= 0:
        raise ValueError(f"--shape: sizes must be positive, got {text!r}")
    return out_f, in_f


def _cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from r3mes import kernels
    from r3mes.core.cli import model_bench_options_misused, run_model_bench

    if args.model is not None:
        return run_model_bench(args)
    misused = model_bench_options_misused(args) or (
        "--threads: one value without --model" if len(args.threads or ()) > 1 else None)
    if misused:
        print(json.dumps({"error": misused}) if args.json else f"error: {misused}")
        return 2
    try:
        shapes = [_parse_shape(s) for s in (args.shape or ["2560x6912", "6912x2560"])]
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}) if args.json else f"error: {exc}")
        return 2
    token_counts = args.tokens or [1, 128]
    kernels.set_num_threads(args.threads[0] if args.threads else 0)
    threads = kernels.get_num_threads()
    torch.set_num_threads(threads)
    # Bandwidth: sum of a 512 MiB array, larger than the caches of common CPUs.
    big = torch.from_numpy(np.ones(128 * 1024 * 1024, dtype=np.float32))
    bandwidth = big.numel() * 4 / _median_seconds(big.sum, 0.5) / 1e9
    del big
    results = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f)
        tw = kernels.quantize_weight(w)
        # Enough weight copies to stream from memory rather than cache, as in decode.
        copies = [tw] + [kernels.TernaryWeight(tw.packed.clone(), tw.scale, out_f, in_f)
                         for _ in range(max(1, (256 << 20) // tw.packed.numel()))]
        for tokens in token_counts:
            x = torch.randn(tokens, in_f)
            index = iter(range(1 << 62))
            t_r3mes = _median_seconds(
                lambda x=x, ws=copies, it=index: kernels.ternary_linear(x, ws[next(it) % len(ws)]),
                args.seconds)
            t_torch = _median_seconds(lambda x=x, w=w: F.linear(x, w), args.seconds)
            gbs = tw.packed.numel() / t_r3mes / 1e9
            results.append({
                "op": "gemv" if tokens == 1 else "gemm", "shape": f"{out_f}x{in_f}",
                "tokens": tokens, "r3mes_us": round(t_r3mes * 1e6, 1),
                "torch_fp32_us": round(t_torch * 1e6, 1),
                "speedup": round(t_torch / t_r3mes, 2), "weight_gb_s": round(gbs, 2),
                "bandwidth_fraction": round(gbs / bandwidth, 3)})
    report = {"read_bandwidth_gb_s": round(bandwidth, 2), "threads": threads,
              "simd_level": kernels.simd_level(), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"SIMD {report['simd_level']}, {threads} thread(s), read bandwidth "
          f"{bandwidth:.1f} GB/s")
    print(f"{'op':5} {'shape':>11} {'tokens':>6} {'r3mes us':>10} {'fp32 us':>10} "
          f"{'speedup':>8} {'GB/s':>7} {'of BW':>6}")
    for r in results:
        print(f"{r['op']:5} {r['shape']:>11} {r['tokens']:>6} {r['r3mes_us']:>10.1f} "
              f"{r['torch_fp32_us']:>10.1f} {r['speedup']:>7.1f}x {r['weight_gb_s']:>7.1f} "
              f"{r['bandwidth_fraction']:>6.0%}")
    return 0
