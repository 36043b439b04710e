"""Decode speed of a BitNet-b1.58-2B-4T-shaped model on the GPU backend path.

The model has the exact 2B-4T shapes (30 layers, hidden 2560, intermediate 6912, 20 heads,
5 kv heads, vocab 128256, tied int8 head) with random weights built in memory (as
``bench_decode.py``), moved to the GPU with
:func:`r3mes.core.backends.cuda_model.move_model_to_cuda`. Reported: decode ms/token and
tok/s after a 128-token prompt, batch 1, for 0 and 3 DoRA experts (r=16 on every
projection, fp16 storage), eager and replayed from a CUDA graph
(:class:`~r3mes.core.backends.cuda_model.StaticDecoder`), each step including the copy of
the logits to the host as the backend does; next to the bandwidth floor (ternary + head +
adapter bytes read per token / the device-to-device copy bandwidth measured in the run).

    python -m pytest benchmarks/bench_cuda_decode.py --benchmark-only -q --table-out d.md

Skips without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from r3mes.kernels import cuda

pytestmark = pytest.mark.skipif(not cuda.available(), reason="needs a CUDA device")

PROMPT, DECODE = 128, 64


@pytest.fixture(scope="module")
def model():
    from bench_decode import build_model

    from r3mes.core.backends.cuda_model import move_model_to_cuda

    m = build_model()
    move_model_to_cuda(m, "cuda")
    return m


def _add_experts(model, count: int) -> list[tuple[str, float]]:
    from bench_decode import add_experts

    from r3mes.core.backends.cuda_model import prepare_cuda_adapters

    mix = add_experts(model, count, "fp16")  # the CUDA kernels take fp16/fp32 adapters
    prepare_cuda_adapters(model, [name for name, _ in mix])
    return mix


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("experts", [0, 3])
def test_cuda_decode(benchmark, record_row, device_bandwidth, model, experts, mode):
    from r3mes.core.backends.cuda_model import StaticDecoder, cuda_adapter
    from r3mes.core.dora import set_adapter_mix

    mix = _add_experts(model, experts) if experts else None
    set_adapter_mix(model, mix)
    decoder = StaticDecoder(model, cuda_graphs=mode == "graph")
    cache = model.new_cache(1, PROMPT + DECODE + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT),
                        generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids.cuda(), cache, last_only=True)
    token = torch.tensor([[17]])

    def step():
        return decoder.step(token, cache).cpu()  # the backend hands logits to the sampler

    benchmark.pedantic(step, rounds=DECODE - 4, iterations=1, warmup_rounds=4)
    seconds = benchmark.stats.stats.median
    sizes = model.num_parameters_bytes()
    adapter_bytes = sum(cuda_adapter(mod, n).nbytes
                        for mod in model.linear_modules().values() for n, _ in (mix or []))
    per_token = sizes["ternary"] + sizes["lm_head"] + adapter_bytes
    floor = device_bandwidth * 1e9 / per_token
    set_adapter_mix(model, None)
    benchmark.extra_info.update(graph_error=decoder.graph_error, captures=decoder.captures)
    record_row({"bench": "decode 2B-4T shape (GPU)", "device": torch.cuda.get_device_name(),
                "experts": experts, "mode": mode if decoder.graph_error is None
                else "eager (capture failed)",
                "ms/token": f"{seconds * 1e3:.2f}", "tok/s": f"{1 / seconds:.0f}",
                "floor tok/s": f"{floor:.0f}", "MB read/token": f"{per_token / 1e6:.0f}",
                "copy BW GB/s": f"{device_bandwidth:.0f}"})
