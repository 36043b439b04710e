"""Tiered expert cache: tier hit latencies, cold-load throughput, prefetch benefit, Zipf hit rates.

Run::

    python -m pytest benchmarks/bench_cache.py --benchmark-only -s \
        --benchmark-columns=min,median,mean,max,rounds

Adapters have the realistic shape of the issue: DoRA r=16 on every linear layer of the
BitNet b1.58 2B-4T architecture (30 layers; hidden 2560, intermediate 6912, 20 query heads
and 5 KV heads of 128), fp16: 22.3 M parameters, 44.6 MB each.

- tier 1 hit: ``get_adapter`` of an adapter already prepared (the hot path).
- tier 2 hit: host tensors in RAM, promoted with ``prepare``. Two prepares: ``identity``
  (the default on CPU: nothing to do) and ``copy`` (one memcpy of every tensor, a stand-in
  for the host-to-device upload or a packing step).
- tier 3 load: read + parse the safetensors file + prepare, with the page cache warm
  (file read recently) and cold (``posix_fadvise(DONTNEED)`` on the object's files first).
- prefetch: ``predictive_load`` issued, 100 ms of other work (routing, retrieval) elapse,
  then ``get_adapter``: the request latency the caller sees.
- Zipf: 10 000 requests over 50 experts, Zipf(s=1.0) popularity, tier 1 = 4 adapters,
  tier 2 = 12 adapters, the two most popular pinned. Hit rates depend only on capacities
  measured in adapters (all the same size), so this stream uses small adapters with the
  same capacities in adapter units: the rates are those the 44.6 MB adapters would get.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from r3mes.cache.adapter_store import AdapterStore
from r3mes.cache.tiered_cache import TieredDoRACache
from r3mes.cache.vram_manager import MB

LAYERS, HIDDEN, INTERMEDIATE, KV = 30, 2560, 6912, 640
RANK = 16
MODULES = {  # name -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
RESULTS: dict[str, str] = {}


def write_realistic_adapter(path: Path, seed: int, *, layers: int = LAYERS, rank: int = RANK,
                            scale: int = 1) -> Path:
    """A PEFT DoRA adapter, r=16 on all linear layers of the 2B-4T shape (``scale`` divides
    the widths, for the small adapters of the hit-rate stream)."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (out_f, in_f) in MODULES.items():
            out_f, in_f = out_f // scale, in_f // scale
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen)
                                                  * 0.01).half()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen)
                                                  * 0.01).half()
            tensors[f"{prefix}.lora_magnitude_vector"] = torch.ones(out_f).half()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "use_dora": True, "r": rank, "lora_alpha": 2 * rank,
        "use_rslora": False, "task_type": "CAUSAL_LM",
        "target_modules": sorted({m.split(".")[-1] for m in MODULES}),
        "base_model_name_or_path": "microsoft/bitnet-b1.58-2B-4T",
    }))
    return path


def drop_page_cache(directory: Path) -> None:
    """Evict a directory's files from the page cache (needs no privileges for clean pages)."""
    for file in directory.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def copy_prepare(adapter_dir: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def realistic_store(tmp_path_factory) -> AdapterStore:
    root = tmp_path_factory.mktemp("bench_cache")
    store = AdapterStore(root / "home")
    for i in range(3):
        store.add(write_realistic_adapter(root / "src" / f"e{i}", seed=i), f"expert{i}")
    return store


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _cache(store: AdapterStore, prepare=None) -> TieredDoRACache:
    return TieredDoRACache(store, tier1_capacity_mb=1024, tier2_capacity_mb=1024,
                           prepare=prepare)


def _record(name: str, benchmark, extra: str = "") -> None:
    stats = benchmark.stats.stats
    RESULTS[name] = f"{stats.median * 1e3:10.3f} ms median  {stats.min * 1e3:10.3f} ms min  {extra}"


def test_tier1_hit(benchmark, realistic_store, loop):
    cache = _cache(realistic_store)
    loop.run_until_complete(cache.get_adapter("expert0"))
    benchmark(lambda: loop.run_until_complete(cache.get_adapter("expert0")))
    assert cache.tier_of("expert0") == 1
    _record("tier 1 hit", benchmark, "(includes one run_until_complete)")
    loop.run_until_complete(cache.close())


@pytest.mark.parametrize("prepare_name", ["identity", "copy"])
def test_tier2_hit(benchmark, realistic_store, loop, prepare_name):
    cache = _cache(realistic_store, copy_prepare if prepare_name == "copy" else None)

    async def warm_tier2():
        await cache.predictive_load(["expert1"], tier=2)

    def setup():
        cache.invalidate("expert1")
        loop.run_until_complete(warm_tier2())
        assert cache.tier_of("expert1") == 2

    benchmark.pedantic(lambda: loop.run_until_complete(cache.get_adapter("expert1")),
                       setup=setup, rounds=15)
    assert cache.stats()["tier2"]["hits"] >= 15
    _record(f"tier 2 hit ({prepare_name} prepare)", benchmark)
    loop.run_until_complete(cache.close())


@pytest.mark.parametrize("page_cache", ["warm", "cold"])
def test_tier3_load(benchmark, realistic_store, loop, page_cache):
    cache = _cache(realistic_store)
    size = realistic_store.get("expert2").size_bytes

    def setup():
        cache.invalidate("expert2")
        if page_cache == "cold":
            drop_page_cache(realistic_store.path("expert2"))

    benchmark.pedantic(lambda: loop.run_until_complete(cache.get_adapter("expert2")),
                       setup=setup, rounds=8, warmup_rounds=1 if page_cache == "warm" else 0)
    median = benchmark.stats.stats.median
    benchmark.extra_info["mb_per_s"] = size / MB / median
    _record(f"tier 3 load ({page_cache} page cache)", benchmark,
            f"{size / MB:.1f} MB at {size / MB / median:7.0f} MB/s")
    loop.run_until_complete(cache.close())


def test_predictive_load_hides_the_cold_load(benchmark, realistic_store, loop):
    cache = _cache(realistic_store)

    async def request_after_prefetch():
        cache.predictive_load(["expert2"])
        await asyncio.sleep(0.1)  # routing + retrieval happen meanwhile
        start = loop.time()
        await cache.get_adapter("expert2")
        return loop.time() - start

    def setup():
        cache.invalidate("expert2")
        drop_page_cache(realistic_store.path("expert2"))

    seen: list[float] = []
    benchmark.pedantic(lambda: seen.append(loop.run_until_complete(request_after_prefetch())),
                       setup=setup, rounds=5)
    RESULTS["request after predictive_load (cold)"] = (
        f"{sorted(seen)[len(seen) // 2] * 1e3:10.3f} ms median  (request latency only; "
        "the prefetch overlapped 100 ms of other work)")
    loop.run_until_complete(cache.close())


def test_zipf_hit_rates(benchmark, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_zipf")
    store = AdapterStore(root / "home")
    names = ["turkish_dora", "general_dora"] + [f"expert{i:02d}" for i in range(48)]
    for i, name in enumerate(names):
        store.add(write_realistic_adapter(root / "src" / name, seed=i, layers=1, scale=32), name)
    unit = store.get(names[0])
    rng = random.Random(0)
    weights = [1.0 / (rank + 1) for rank in range(len(names))]  # Zipf, s = 1.0
    stream = rng.choices(names, weights=weights, k=10_000)

    def run_stream():
        async def main():
            probe = TieredDoRACache(store, tier1_capacity_mb=1, tier2_capacity_mb=0)
            adapter_bytes = (await probe.get_adapter(names[0])).nbytes
            await probe.close()
            cache = TieredDoRACache(store, tier1_capacity_mb=4 * adapter_bytes / MB,
                                    tier2_capacity_mb=12 * adapter_bytes / MB,
                                    pinned=names[:2])
            await cache.start()
            for name in stream:
                await cache.get_adapter(name)
            stats = cache.stats()
            await cache.close()
            return stats

        return asyncio.run(main())

    stats = benchmark.pedantic(run_stream, rounds=1)
    t1, t2, t3 = stats["tier1"], stats["tier2"], stats["tier3"]
    requests = stats["requests"]
    benchmark.extra_info.update({"tier1_hit_rate": t1["hits"] / requests,
                                 "tier2_hit_rate": t2["hits"] / requests,
                                 "tier3_load_rate": t3["hits"] / requests})
    RESULTS["Zipf stream (10k req, 50 experts, t1=4, t2=12)"] = (
        f"tier 1 {t1['hits'] / requests:6.1%}  tier 2 {t2['hits'] / requests:6.1%}  "
        f"tier 3 {t3['hits'] / requests:6.1%}  evictions t1 {t1['evictions']} "
        f"t2 {t2['evictions']}  (unit adapter {unit.size_bytes} B on disk)")
    assert t1["hits"] + t2["hits"] + t3["hits"] == requests


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if RESULTS:
        width = max(len(k) for k in RESULTS)
        print("\n\ncache benchmark (r=16 DoRA on all linear layers of 2B-4T, fp16)")
        for name, line in RESULTS.items():
            print(f"  {name:<{width}}  {line}")
