"""Ternary GEMV / GEMM versus torch F.linear at the BitNet-b1.58-2B-4T shapes.

Weights rotate over a working set larger than the last-level cache, so every call streams
its weights from memory, as in real decoding. Each result reports the time per call, the
weight bytes moved per second, and that as a fraction of the read bandwidth measured right
before and right after it (see conftest.py: the shared VM's bandwidth drifts).

``r3mes`` goes through ``r3mes.kernels.ternary_linear`` (torch tensors in and out);
``r3mes-native`` calls the binding ``r3mes._native.ternary_linear`` on numpy buffers, the
entry the native decode layer uses. The difference is not the wrapper's few Python
operations themselves (~6 us with cached weights) but that they run with cold caches: the
weight stream evicts Python's working set.

    python -m pytest benchmarks/bench_ternary.py --benchmark-only -q --table-out bench.md
    python benchmarks/bench_ternary.py      # decode GEMV and read bandwidth side by side
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from warmup import warm_up

from r3mes import kernels

# out_features x in_features, as the 2B-4T model's projections.
SHAPES = {"2560x2560": (2560, 2560), "2560x6912": (2560, 6912), "6912x2560": (6912, 2560)}
HEAD = (128256, 2560)
WORKING_SET_BYTES = 640 * 1024 * 1024  # beyond this VM's 480 MiB L3
MIN_COPIES = 16


def _copies(nbytes: int) -> int:
    return max(MIN_COPIES, -(-WORKING_SET_BYTES // nbytes))


def _ternary_weights(out_f: int, in_f: int) -> list[kernels.TernaryWeight]:
    base = kernels.quantize_weight(torch.randn(out_f, in_f))
    return [
        kernels.TernaryWeight(kernels.weight_copy(base.packed), base.scale, out_f, in_f)
        for _ in range(_copies(base.packed.numel()))
    ]


def _float_weights(out_f: int, in_f: int, dtype: torch.dtype) -> list[torch.Tensor]:
    w = torch.randn(out_f, in_f, dtype=dtype)
    return [w.clone() for _ in range(_copies(w.numel() * w.element_size()))]


def _run(benchmark, record_row, bandwidth_probe, *, op, label, impl, tokens, threads,
         weights, call, weight_bytes, rounds):
    cycle = itertools.cycle(weights)
    before = bandwidth_probe(threads)
    torch.set_num_threads(threads)
    if kernels.available():
        kernels.set_num_threads(threads)
    warm_up(lambda: call(next(cycle)))
    benchmark.pedantic(lambda: call(next(cycle)), rounds=rounds, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    gbs = weight_bytes / seconds / 1e9
    bw = (before + bandwidth_probe(threads)) / 2
    benchmark.extra_info.update(gb_per_s=round(gbs, 2), bandwidth_fraction=round(gbs / bw, 3))
    record_row({
        "op": op, "shape": label, "impl": impl, "tokens": tokens, "threads": threads,
        "median us": f"{seconds * 1e6:.0f}", "weight GB/s": f"{gbs:.1f}",
        "of read BW": f"{gbs / bw:.0%}", "read BW GB/s": f"{bw:.1f}",
    })
    return seconds


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", ["r3mes", "r3mes-native", "torch-fp32", "torch-bf16"])
@pytest.mark.parametrize("label", list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 128])
def test_ternary_linear(benchmark, record_row, bandwidth_probe, tokens, label, impl, threads):
    out_f, in_f = SHAPES[label]
    g = torch.Generator().manual_seed(0)
    if impl.startswith("r3mes"):
        weights = _ternary_weights(out_f, in_f)
        x = torch.randn(tokens, in_f, generator=g)
        if impl == "r3mes":
            call = lambda w: kernels.ternary_linear(x, w)  # noqa: E731
        else:
            xn = x.numpy()
            call = lambda w: kernels._native.ternary_linear(  # noqa: E731
                xn, w._packed_np, in_f, w.scale)
        weight_bytes = weights[0].packed.numel()
    else:
        dtype = torch.float32 if impl == "torch-fp32" else torch.bfloat16
        weights = _float_weights(out_f, in_f, dtype)
        x = torch.randn(tokens, in_f, generator=g, dtype=dtype)
        call = lambda w: F.linear(x, w)  # noqa: E731
        weight_bytes = weights[0].numel() * weights[0].element_size()
    _run(benchmark, record_row, bandwidth_probe, op="GEMV" if tokens == 1 else "GEMM",
         label=label, impl=impl, tokens=tokens, threads=threads, weights=weights, call=call,
         weight_bytes=weight_bytes, rounds=60 if tokens == 1 else 10)


def _amx_switch(kernel: str):
    """Turns the AMX kernels on for "amx", off for "vnni"; skips where AMX is not there."""
    if kernel == "amx" and not (kernels.available() and kernels.info()["amx"]):
        pytest.skip("no AMX-INT8 on this CPU (or the OS withholds the tile state)")
    kernels._native.set_amx_enabled(kernel == "amx")


@pytest.mark.parametrize("kernel", ["vnni", "amx"])
@pytest.mark.parametrize("label", ["6912x2560", "2560x6912"])
@pytest.mark.parametrize("tokens", [1, 4, 8, 16])
def test_decode_batch_gemm(benchmark, record_row, bandwidth_probe, tokens, label, kernel):
    """A decode step of a batch: one ternary product for 1-16 rows, on VNNI or on the tile
    unit (AMX: from 3 tokens; see csrc/ternary/amx.h), 2 threads, weights from memory."""
    _amx_switch(kernel)
    try:
        out_f, in_f = SHAPES[label]
        weights = _ternary_weights(out_f, in_f)
        x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(0))
        _run(benchmark, record_row, bandwidth_probe, op=f"GEMM ({kernel})", label=label,
             impl="r3mes", tokens=tokens, threads=2, weights=weights,
             call=lambda w: kernels.ternary_linear(x, w), weight_bytes=weights[0].packed.numel(),
             rounds=40)
    finally:
        kernels._native.set_amx_enabled(True)


@pytest.mark.parametrize("kernel", ["vnni", "amx"])
@pytest.mark.parametrize("tokens", [1, 8, 16])
def test_lm_head_decode_batch(benchmark, record_row, bandwidth_probe, tokens, kernel):
    """The int8 LM head for a decode batch (AMX from 8 tokens), 2 threads, from memory."""
    _amx_switch(kernel)
    try:
        iw = kernels.quantize_int8_weight(torch.randn(*HEAD))
        weights = [iw, kernels.Int8Weight(kernels.weight_copy(iw.data), iw.scale, iw.row_sums,
                                          *HEAD)]
        x = torch.randn(tokens, HEAD[1])
        _run(benchmark, record_row, bandwidth_probe, op=f"LM head ({kernel})",
             label="128256x2560", impl="r3mes-int8", tokens=tokens, threads=2,
             weights=weights, call=lambda w: kernels.int8_linear(x, w),
             weight_bytes=iw.data.numel(), rounds=10)
    finally:
        kernels._native.set_amx_enabled(True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", ["r3mes-int8", "torch-fp16", "torch-bf16", "torch-fp32"])
def test_lm_head(benchmark, record_row, bandwidth_probe, impl, threads):
    out_f, in_f = HEAD
    x32 = torch.randn(1, in_f)
    w = torch.randn(out_f, in_f)
    if impl == "r3mes-int8":
        iw = kernels.quantize_int8_weight(w)
        weights = [iw] + [
            kernels.Int8Weight(kernels.weight_copy(iw.data), iw.scale, iw.row_sums, out_f, in_f)
            for _ in range(_copies(iw.data.numel()) - MIN_COPIES + 1)
        ]
        call = lambda wt: kernels.int8_linear(x32, wt)  # noqa: E731
        weight_bytes = iw.data.numel()
    else:
        dtype = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16,
                 "torch-fp32": torch.float32}[impl]
        wd = w.to(dtype)
        weights = [wd] + ([wd.clone()] if wd.numel() * wd.element_size() < WORKING_SET_BYTES
                          else [])
        x = x32.to(dtype)
        call = lambda wt: F.linear(x, wt)  # noqa: E731
        weight_bytes = wd.numel() * wd.element_size()
    del w
    _run(benchmark, record_row, bandwidth_probe, op="LM head", label="128256x2560", impl=impl,
         tokens=1, threads=threads, weights=weights, call=call, weight_bytes=weight_bytes,
         rounds=10)


def _side_by_side(out_f: int = 6912, in_f: int = 2560, threads: int = 2, blocks: int = 8,
                  seconds: float = 1.0) -> None:
    """Script mode: the decode GEMV and a read-only sum alternated in blocks, so both see
    the same machine state (the shared VM's bandwidth drifts); each block runs its
    operation for ``seconds`` and keeps the second half (see warmup.py). Weights and the
    summed array are both numpy allocations (huge pages where the kernel grants them: a
    4 KiB-page sum reaches ~20% less here, which would flatter the ratio)."""
    import statistics

    import numpy as np

    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    base = kernels.quantize_weight(torch.randn(out_f, in_f))
    weights = [kernels.TernaryWeight(kernels.weight_copy(base.packed), base.scale,
                                     out_f, in_f) for _ in range(_copies(base.packed.numel()))]
    array = torch.from_numpy(np.ones(256 * 1024 * 1024, dtype=np.float32))  # 1 GiB > L3
    x = torch.randn(1, in_f)
    xn = x.numpy()
    cycle = itertools.cycle(weights)

    def timed_block(fn) -> list[float]:
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times[len(times) // 2:]

    nbytes = base.packed.numel()
    sums, api, native = [], [], []
    for _ in range(blocks):
        sums += [array.numel() * 4 / t / 1e9 for t in timed_block(array.sum)]
        native += timed_block(
            lambda: kernels._native.ternary_linear(xn, (w := next(cycle))._packed_np, in_f,
                                                   w.scale))
        api += timed_block(lambda: kernels.ternary_linear(x, next(cycle)))
    bw = statistics.median(sums)
    print(f"GEMV {out_f}x{in_f}, {threads} threads; read bandwidth (median) {bw:.1f} GB/s")
    for name, ts in (("native binding", native), ("r3mes.kernels API", api)):
        s = statistics.median(ts)
        print(f"  {name:18s} {s * 1e6:6.0f} us  {nbytes / s / 1e9:5.1f} GB/s  "
              f"{nbytes / s / 1e9 / bw:4.0%} of read bandwidth")


if __name__ == "__main__":
    for shape in SHAPES.values():
        _side_by_side(*shape)
