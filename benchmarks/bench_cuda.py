"""CUDA ternary GEMV and fused DoRA versus cuBLAS bf16 (``torch.nn.functional.linear``).

Decode shapes (out_features x in_features, one token): the BitNet-b1.58-2B-4T projections
and two larger ones. Each case is captured as a CUDA graph of many calls (launch gaps
would otherwise hide a few-microsecond kernel) and timed with CUDA events; the calls
rotate over enough weight copies (>= 16, and > 4x the L2 cache) that every call streams
its weights from device memory. Device-to-device bandwidth is measured in the same run
(a large ``copy_``, bytes read + written), and every result reports the time per call,
the weight bytes moved per second, and their fraction of that bandwidth.

    python -m pytest benchmarks/bench_cuda.py --benchmark-only -q --table-out cuda.md

Skips without a CUDA device.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from r3mes import kernels
from r3mes.kernels import cuda

pytestmark = pytest.mark.skipif(not cuda.available(), reason="needs a CUDA device")

SHAPES = {  # label: (out_features, in_features)
    "2560x2560": (2560, 2560),
    "2560x6912": (2560, 6912),
    "6912x2560": (6912, 2560),
    "13824x2560": (13824, 2560),
    "20480x3200": (20480, 3200),
}
MIN_COPIES = 16
CALLS_PER_GRAPH = 200
REPEATS = 15
RANK = 16


def _copies(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(MIN_COPIES, -(-4 * l2 // nbytes))


def _graph_time_us(calls: list) -> tuple[float, float]:
    """Median and spread (max-min) in microseconds per call of a CUDA graph that runs
    ``calls`` (closures) CALLS_PER_GRAPH times in rotation."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: first-use allocations
        for fn in calls[: min(4, len(calls))]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPEATS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / CALLS_PER_GRAPH)
    return statistics.median(times), max(times) - min(times)


def _report(benchmark, record_row, device_bandwidth, *, op, label, impl, calls, weight_bytes):
    us, spread = _graph_time_us(calls)
    gbs = weight_bytes / (us * 1e-6) / 1e9
    benchmark.extra_info.update(us=round(us, 2), gb_per_s=round(gbs, 1),
                                bandwidth_fraction=round(gbs / device_bandwidth, 3),
                                device=torch.cuda.get_device_name())
    # pytest-benchmark's own timing (host wall clock of one graph replay) for its table.
    graph_calls = calls

    def replay_once():
        for fn in graph_calls:
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(replay_once, rounds=3, iterations=1, warmup_rounds=1)
    record_row({
        "op": op, "shape": label, "impl": impl, "device": torch.cuda.get_device_name(),
        "us/call": f"{us:.2f}", "spread us": f"{spread:.2f}", "weight GB/s": f"{gbs:.0f}",
        "of copy BW": f"{gbs / device_bandwidth:.0%}", "copy BW GB/s": f"{device_bandwidth:.0f}",
    })
    return us


def _cuda_weights(out_f: int, in_f: int) -> list[cuda.CudaTernaryWeight]:
    base = cuda.CudaTernaryWeight.from_cpu(kernels.quantize_weight(torch.randn(out_f, in_f)))
    n = _copies(base.packed.numel())
    return [cuda.CudaTernaryWeight(base.packed.clone(), base.scale, out_f, in_f) for _ in range(n)]


@pytest.mark.parametrize("label", list(SHAPES))
def test_ternary_gemv_decode(benchmark, record_row, device_bandwidth, label):
    out_f, in_f = SHAPES[label]
    weights = _cuda_weights(out_f, in_f)
    x = torch.randn(1, in_f, device="cuda")
    # The bare GEMV on pre-quantised activations (the kernel alone) ...
    mod = cuda._require_device()
    q, s = cuda.quantize_activations(x)
    qp = torch.zeros((1, mod.padded_k(in_f)), dtype=torch.int8, device="cuda")
    qp[:, :in_f] = q
    qsum = q.sum(dim=1, dtype=torch.int32)
    out = torch.empty((1, out_f), device="cuda")

    def gemv(w):
        return lambda: mod.ternary_gemm(qp.data_ptr(), qsum.data_ptr(), s.data_ptr(),
                                        w.packed.data_ptr(), 1, out_f, in_f, w.scale, 0,
                                        out.data_ptr(), 0,
                                        torch.cuda.current_stream().cuda_stream, "gemv")

    wb = weights[0].packed.numel()
    _report(benchmark, record_row, device_bandwidth, op="gemv", label=label,
            impl="r3mes dp4a GEMV (kernel)", calls=[gemv(w) for w in weights], weight_bytes=wb)


@pytest.mark.parametrize("label", list(SHAPES))
def test_ternary_linear_decode_layer(benchmark, record_row, device_bandwidth, label):
    out_f, in_f = SHAPES[label]
    weights = _cuda_weights(out_f, in_f)
    x = torch.randn(1, in_f, device="cuda")
    calls = [(lambda w=w: cuda.ternary_linear(x, w)) for w in weights]
    _report(benchmark, record_row, device_bandwidth, op="layer", label=label,
            impl="r3mes quant + GEMV", calls=calls, weight_bytes=weights[0].packed.numel())


@pytest.mark.parametrize("label", list(SHAPES))
def test_cublas_bf16_decode(benchmark, record_row, device_bandwidth, label):
    out_f, in_f = SHAPES[label]
    w0 = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    weights = [w0.clone() for _ in range(_copies(w0.numel() * 2))]
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    calls = [(lambda w=w: F.linear(x, w)) for w in weights]
    _report(benchmark, record_row, device_bandwidth, op="layer", label=label,
            impl="cuBLAS bf16 F.linear", calls=calls, weight_bytes=w0.numel() * 2)


@pytest.mark.parametrize("label", ["2560x6912", "6912x2560"])
@pytest.mark.parametrize("experts", [0, 3])
def test_fused_dora_decode(benchmark, record_row, device_bandwidth, label, experts):
    out_f, in_f = SHAPES[label]
    weights = _cuda_weights(out_f, in_f)
    x = torch.randn(1, in_f, device="cuda")
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(len(weights)):
        ads = [cuda.prepare_dora_adapter_cuda(torch.randn(RANK, in_f, generator=g) * 0.02,
                                              torch.randn(out_f, RANK, generator=g) * 0.01,
                                              torch.rand(out_f, generator=g) + 0.5, 2.0)
               for _ in range(experts)]
        sets.append(ads)
    mix = torch.full((1, experts), 1.0 / max(experts, 1), device="cuda")
    calls = [(lambda w=w, ads=ads: cuda.dora_linear(x, w, ads, mix))
             for w, ads in zip(weights, sets, strict=True)]
    ad_bytes = sum(ad.nbytes for ad in sets[0])
    _report(benchmark, record_row, device_bandwidth, op=f"dora {experts} experts r={RANK}",
            label=label, impl="r3mes fused (quant+A pass, GEMV+epilogue)", calls=calls,
            weight_bytes=weights[0].packed.numel() + ad_bytes)
