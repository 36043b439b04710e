"""Decode speed of a BitNet-b1.58-2B-4T-shaped model on the native CPU backend.

The model has the exact 2B-4T shapes (30 layers, hidden 2560, intermediate 6912, 20 heads,
5 kv heads, vocab 128256, tied int8 head) with random weights built in memory (nothing is
shipped or downloaded). Reported: decode ms/token and tok/s after a 128-token prompt, for
0, 1 and 3 DoRA experts (r=16 on every projection; int8 adapter storage, the native
backend's default, and fp16), next to the bandwidth floor (ternary + head bytes read per
token / the read bandwidth measured in the same run).

    python -m pytest benchmarks/bench_decode.py --benchmark-only -q --table-out decode.md
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from warmup import warm_up

from r3mes import kernels
from r3mes.core.dora import set_adapter_mix
from r3mes.core.model import (
    LINEAR_NAMES,
    BitNetConfig,
    BitNetForCausalLM,
    LMHead,
    bitlinear_from_packed,
)

CONFIG = BitNetConfig(vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                      num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5,
                      tie_word_embeddings=True)
PROMPT, DECODE = 128, 32
WARM_UP_STEPS = 16  # at most; see warmup.py
RANK = 16


def _shapes(cfg: BitNetConfig) -> dict[str, tuple[int, int]]:
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def build_model() -> BitNetForCausalLM:
    """The 2B-4T-shaped model with random ternary weights (also used by bench_cuda_decode)."""
    rng = np.random.default_rng(0)
    shapes = _shapes(CONFIG)
    layers = []
    for _ in range(CONFIG.num_hidden_layers):
        layer = {}
        for name in LINEAR_NAMES:
            out_f, in_f = shapes[name]
            codes = rng.integers(0, 3, (out_f, in_f), dtype=np.int8) - 1
            packed = kernels.TernaryWeight.from_ternary(torch.from_numpy(codes), 1.0)
            layer[name.split(".")[1]] = bitlinear_from_packed(packed)
        layers.append(layer)
    embed = (torch.randn(CONFIG.vocab_size, CONFIG.hidden_size) * 0.02).to(torch.bfloat16)
    return BitNetForCausalLM(CONFIG, embed, layers, LMHead.from_float(embed))


@pytest.fixture(scope="module")
def model() -> BitNetForCausalLM:
    return build_model()


def add_experts(model: BitNetForCausalLM, count: int,
                storage: str = "int8") -> list[tuple[str, float]]:
    """``count`` random r=16 DoRA experts on every projection; returns an equal mix."""
    g = torch.Generator().manual_seed(1)
    names = [f"expert{e}_{storage}" for e in range(count)]
    for module in model.linear_modules().values():
        module.storage = storage
        for name in names:
            if name in module.adapter_names:
                continue
            a = torch.randn(RANK, module.in_features, generator=g) * 0.01
            b = torch.randn(module.out_features, RANK, generator=g) * 0.01
            m = torch.rand(module.out_features, generator=g) + 0.5
            module.load_adapter(name, a, b, m, scaling=2.0)
    return [(n, 1.0 / count) for n in names]


@pytest.mark.parametrize("experts,storage", [(0, "-"), (1, "int8"), (3, "int8"), (3, "fp16")])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode(benchmark, record_row, read_bandwidth, model, threads, experts, storage):
    kernels.set_num_threads(threads)
    torch.set_num_threads(1)  # tiny attention ops: intra-op threads cost more than they save
    mix = add_experts(model, experts, storage) if experts else None
    set_adapter_mix(model, mix)
    cache = model.new_cache(1, PROMPT + WARM_UP_STEPS + DECODE + 8)
    ids = torch.randint(0, CONFIG.vocab_size, (1, PROMPT),
                        generator=torch.Generator().manual_seed(2))
    model(ids, cache, last_only=True)
    token = torch.tensor([[17]])
    step = lambda: model(token, cache, last_only=True)  # noqa: E731
    warm_up(step, max_calls=WARM_UP_STEPS)
    benchmark.pedantic(step, rounds=DECODE - 2, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    sizes = model.num_parameters_bytes()
    per_token = sizes["ternary"] + sizes["lm_head"]
    floor = read_bandwidth[threads] * 1e9 / per_token
    set_adapter_mix(model, None)
    record_row({"bench": "decode 2B-4T shape", "threads": threads, "experts": experts,
                "adapter storage": storage,
                "ms/token": f"{seconds * 1e3:.1f}", "tok/s": f"{1 / seconds:.1f}",
                "floor tok/s": f"{floor:.1f}", "MB read/token": f"{per_token / 1e6:.0f}"})
