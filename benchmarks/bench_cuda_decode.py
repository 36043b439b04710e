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

import statistics

import numpy as np
import pytest
import torch

from r3mes import kernels
from r3mes.kernels import cuda

pytestmark = pytest.mark.skipif(not cuda.available(), reason="needs a CUDA device")

PROMPT, DECODE = 128, 64
RANK = 16


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffers."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return 2 * n / statistics.median(times) / 1e9


@pytest.fixture(scope="module")
def model():
    from r3mes.core.backends.cuda_model import move_model_to_cuda
    from r3mes.core.model import (
        LINEAR_NAMES,
        BitNetConfig,
        BitNetForCausalLM,
        LMHead,
        bitlinear_from_packed,
    )

    cfg = BitNetConfig(vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                       num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5,
                       tie_word_embeddings=True)
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(cfg.num_hidden_layers):
        layer = {}
        for name in LINEAR_NAMES:
            codes = rng.integers(0, 3, shapes[name], dtype=np.int8) - 1
            packed = kernels.TernaryWeight.from_ternary(torch.from_numpy(codes), 1.0)
            layer[name.split(".")[1]] = bitlinear_from_packed(packed)
        layers.append(layer)
    embed = (torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.02).to(torch.bfloat16)
    m = BitNetForCausalLM(cfg, embed, layers, LMHead.from_float(embed))
    move_model_to_cuda(m, "cuda")
    return m


def _add_experts(model, count: int) -> list[tuple[str, float]]:
    from r3mes.core.backends.cuda_model import prepare_cuda_adapters

    g = torch.Generator().manual_seed(1)
    names = [f"expert{e}" for e in range(count)]
    for module in model.linear_modules().values():
        module.storage = "fp16"
        for name in names:
            if name in module.adapter_names:
                continue
            a = torch.randn(RANK, module.in_features, generator=g) * 0.01
            b = torch.randn(module.out_features, RANK, generator=g) * 0.01
            mag = torch.rand(module.out_features, generator=g) + 0.5
            module.load_adapter(name, a, b, mag, scaling=2.0)
    prepare_cuda_adapters(model, names)
    return [(n, 1.0 / count) for n in names]


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("experts", [0, 3])
def test_cuda_decode(benchmark, record_row, copy_bandwidth, model, experts, mode):
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
    floor = copy_bandwidth * 1e9 / per_token
    set_adapter_mix(model, None)
    benchmark.extra_info.update(graph_error=decoder.graph_error, captures=decoder.captures)
    record_row({"bench": "decode 2B-4T shape (GPU)", "device": torch.cuda.get_device_name(),
                "experts": experts, "mode": mode if decoder.graph_error is None
                else "eager (capture failed)",
                "ms/token": f"{seconds * 1e3:.2f}", "tok/s": f"{1 / seconds:.0f}",
                "floor tok/s": f"{floor:.0f}", "MB read/token": f"{per_token / 1e6:.0f}",
                "copy BW GB/s": f"{copy_bandwidth:.0f}"})
