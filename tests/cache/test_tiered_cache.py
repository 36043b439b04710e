"""TieredDoRACache: tiers, MB budgets, pinning, promotion/demotion, single flight, prefetch."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from dora_adapter_factory import tensor_bytes

from r3mes.cache.adapter_store import (
    AdapterNotFoundError,
    AdapterStore,
    AdapterValidationError,
    DigestMismatchError,
)
from r3mes.cache.tiered_cache import CacheCapacityError, LoadedAdapter, TieredDoRACache
from r3mes.cache.vram_manager import MB, VRAMBudgetError, VRAMManager

ADAPTER = tensor_bytes()  # bytes of one default test adapter's tensors


def mb(adapters: float) -> float:
    """A capacity in MB that holds ``adapters`` default test adapters."""
    return adapters * ADAPTER / MB


@pytest.fixture
def filled_store(store: AdapterStore, adapter_factory) -> AdapterStore:
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        store.add(adapter_factory(seed=i), name)
    return store


class CountingPrepare:
    """A real prepare step (tensors -> a dict of float32 copies) that counts its calls."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[Path] = []
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, adapter_dir: Path, tensors: dict[str, torch.Tensor]) -> dict:
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "test gate never opened"
        with self.lock:
            self.calls.append(adapter_dir)
        return {k: v.float() for k, v in tensors.items()}


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- basic paths


def test_first_get_loads_from_store_then_hits_tier1(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(3), tier2_capacity_mb=mb(3))
        first = await cache.get_adapter("a")
        second = await cache.get_adapter("a")
        stats = cache.stats()
        await cache.close()
        return first, second, stats

    first, second, stats = run(main())
    assert isinstance(first, LoadedAdapter) and first is second
    assert first.digest == filled_store.get("a").digest
    assert set(first.tensors) == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
        "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector",
    }
    assert stats["tier1"]["hits"] == 1 and stats["tier1"]["misses"] == 1
    assert stats["tier2"]["misses"] == 1 and stats["tier3"]["hits"] == 1
    assert stats["tier3"]["loads"] == 1 and stats["tier3"]["bytes_read"] == ADAPTER
    assert stats["tier1"]["bytes"] == ADAPTER and stats["tier1"]["entries"] == 1
    assert stats["tier1"]["latency_ms"]["count"] == 1
    assert stats["tier3"]["latency_ms"]["count"] == 1


def test_loaded_tensors_equal_the_stored_file(filled_store):
    from safetensors.torch import load_file

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=0)
        adapter = await cache.get_adapter("b")
        await cache.close()
        return adapter

    adapter = run(main())
    expected = load_file(str(filled_store.path("b") / "adapter_model.safetensors"))
    assert adapter.tensors.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(adapter.tensors[key], tensor)


def test_unknown_adapter_raises_and_counts_a_tier3_miss(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=mb(2))
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            await cache.get_adapter("nope")
        stats = cache.stats()
        await cache.close()
        return stats

    stats = run(main())
    assert stats["tier3"]["misses"] == 1 and stats["tier3"]["hits"] == 0


# ----------------------------------------------------------------------------- budgets, LRU


def test_tier1_never_exceeds_its_mb_budget_and_demotes_lru_to_tier2(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2.5),
                                tier2_capacity_mb=mb(10))
        seen = []
        for name in ["a", "b", "a", "c"]:  # "b" is least recently used when "c" arrives
            await cache.get_adapter(name)
            seen.append(cache.stats()["tier1"]["bytes"])
        result = (cache.tier1_ids(), cache.tier2_ids(), seen, cache.stats())
        await cache.close()
        return result

    t1, t2, seen, stats = run(main())
    assert t1 == ["a", "c"] and t2 == ["b"]
    assert max(seen) <= mb(2.5) * MB
    assert stats["tier1"]["evictions"] == 1
    assert stats["tier1"]["utilisation"] == pytest.approx(2 / 2.5)


def test_tier2_hit_promotes_to_tier1_without_reading_disk(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(1.5),
                                tier2_capacity_mb=mb(10))
        await cache.get_adapter("a")
        await cache.get_adapter("b")  # demotes a
        assert cache.tier_of("a") == 2
        await cache.get_adapter("a")  # tier-2 hit
        result = (cache.tier_of("a"), cache.tier_of("b"), cache.stats())
        await cache.close()
        return result

    tier_a, tier_b, stats = run(main())
    assert (tier_a, tier_b) == (1, 2)
    assert stats["tier2"]["hits"] == 1 and stats["tier2"]["loads"] == 1
    assert stats["tier3"]["loads"] == 2, "the promotion must not re-read the file"
    assert stats["tier2"]["bytes"] == ADAPTER, "tiers are exclusive: a is no longer in tier 2"


def test_tier2_evicts_least_recently_used_to_disk_only(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(1), tier2_capacity_mb=mb(2))
        for name in ["a", "b", "c", "d"]:
            await cache.get_adapter(name)
        result = (cache.tier1_ids(), cache.tier2_ids(), cache.tier_of("a"), cache.stats())
        await cache.close()
        return result

    t1, t2, tier_a, stats = run(main())
    assert t1 == ["d"] and t2 == ["b", "c"] and tier_a == 3
    assert stats["tier2"]["evictions"] == 1 and stats["tier2"]["bytes"] <= mb(2) * MB


def test_capacities_are_in_bytes_not_counts(store, adapter_factory):
    store.add(adapter_factory(rank=4), "small")
    store.add(adapter_factory(rank=32), "big")
    small, big = tensor_bytes(rank=4), tensor_bytes(rank=32)

    async def main():
        cache = TieredDoRACache(store, tier1_capacity_mb=(big + small // 2) / MB,
                                tier2_capacity_mb=1)
        await cache.get_adapter("small")
        await cache.get_adapter("big")  # does not fit beside small
        result = cache.tier1_ids(), cache.stats()["tier1"]["bytes"]
        await cache.close()
        return result

    ids, used = run(main())
    assert ids == ["big"] and used == big


def test_adapter_larger_than_tier1_is_refused_clearly(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(0.5), tier2_capacity_mb=mb(4))
        with pytest.raises(CacheCapacityError, match="more than the whole tier-1 capacity"):
            await cache.get_adapter("a")
        result = cache.tier_of("a")
        await cache.close()
        return result

    assert run(main()) == 2, "what was read is kept in RAM"


def test_prepared_size_callback_is_what_tier1_counts(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(10), tier2_capacity_mb=0,
                                prepare=CountingPrepare(),
                                prepared_size=lambda p: sum(t.nbytes for t in p.values()))
        await cache.get_adapter("a")
        result = cache.stats()["tier1"]["bytes"]
        await cache.close()
        return result

    assert run(main()) == 2 * ADAPTER  # float16 -> float32 copies


# ----------------------------------------------------------------------------- pinning, leases


def test_pinned_adapters_are_loaded_at_start_and_never_evicted(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(3), tier2_capacity_mb=mb(1),
                                pinned=["a", "b"])
        await cache.start()
        assert sorted(cache.tier1_ids()) == ["a", "b"]
        for name in ["c", "d", "e", "c", "d"]:
            await cache.get_adapter(name)
        result = cache.tier1_ids(), cache.stats()
        await cache.close()
        return result

    t1, stats = run(main())
    assert {"a", "b"} <= set(t1) and len(t1) == 3
    assert stats["pinned"] == ["a", "b"]
    assert stats["requests"] == 5, "start-up preloads are not requests"


def test_pinned_set_larger_than_tier1_fails_at_start(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(1.5), tier2_capacity_mb=mb(4),
                                pinned=["a", "b"])
        try:
            with pytest.raises(CacheCapacityError, match="pinned: a"):
                await cache.start()
        finally:
            await cache.close()

    run(main())


def test_unpinned_adapter_becomes_evictable(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(1), tier2_capacity_mb=mb(4),
                                pinned=["a"])
        await cache.start()
        with pytest.raises(CacheCapacityError):
            await cache.get_adapter("b")
        cache.unpin("a")
        await cache.get_adapter("b")
        result = cache.tier1_ids()
        await cache.close()
        return result

    assert run(main()) == ["b"]


def test_adapter_in_use_is_not_evicted(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=mb(4))
        async with cache.use("a") as held:
            await cache.get_adapter("b")
            await cache.get_adapter("c")  # must evict b, not the held a
            assert cache.tier_of("a") == 1 and held is await cache.get_adapter("a")
            assert cache.tier_of("b") == 2
        await cache.get_adapter("b")  # tier 1 was [c, a]: the released a stays, c goes
        result = cache.tier1_ids()
        await cache.close()
        return result

    assert run(main()) == ["a", "b"]


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_requests_for_one_adapter_load_it_once(filled_store):
    prepare = CountingPrepare()

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(3), tier2_capacity_mb=mb(3),
                                prepare=prepare)
        results = await asyncio.gather(*(cache.get_adapter("c") for _ in range(64)))
        stats = cache.stats()
        await cache.close()
        return results, stats

    results, stats = run(main())
    assert len(prepare.calls) == 1
    assert all(r is results[0] for r in results)
    assert stats["tier3"]["loads"] == 1
    assert stats["inflight_joins"] == 63 and stats["tier1"]["misses"] == 64


def test_concurrent_requests_for_different_adapters_all_arrive(filled_store):
    prepare = CountingPrepare()

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(5), tier2_capacity_mb=0,
                                prepare=prepare)
        names = ["a", "b", "c", "d", "e"] * 10
        results = await asyncio.gather(*(cache.get_adapter(n) for n in names))
        result = dict(zip(names, results, strict=True)), sorted(cache.tier1_ids())
        await cache.close()
        return result

    by_name, t1 = run(main())
    assert t1 == ["a", "b", "c", "d", "e"] and len(prepare.calls) == 5
    assert by_name["a"] is not by_name["b"]


def test_a_failed_load_is_reported_to_every_waiter_and_can_be_retried(store, adapter_factory):
    async def main():
        cache = TieredDoRACache(store, tier1_capacity_mb=mb(2), tier2_capacity_mb=mb(2))
        outcomes = await asyncio.gather(*(cache.get_adapter("late") for _ in range(5)),
                                        return_exceptions=True)
        assert all(isinstance(o, AdapterNotFoundError) for o in outcomes)
        store.add(adapter_factory(), "late")
        adapter = await cache.get_adapter("late")
        await cache.close()
        return adapter

    assert isinstance(run(main()), LoadedAdapter)


def test_loading_does_not_block_the_event_loop(filled_store):
    gate = threading.Event()

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=0,
                                prepare=CountingPrepare(gate))
        load = asyncio.create_task(cache.get_adapter("a"))
        ticks = 0
        for _ in range(20):  # the loop keeps running while prepare is stuck in a thread
            await asyncio.sleep(0.001)
            ticks += 1
        assert not load.done()
        gate.set()
        await load
        await cache.close()
        return ticks

    assert run(main()) == 20


def test_cancelled_caller_does_not_cancel_the_shared_load(filled_store):
    gate = threading.Event()

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=0,
                                prepare=CountingPrepare(gate))
        first = asyncio.create_task(cache.get_adapter("a"))
        second = asyncio.create_task(cache.get_adapter("a"))
        await asyncio.sleep(0.01)
        first.cancel()
        gate.set()
        result = await second
        await cache.close()
        return result

    assert run(main()) is not None


# ----------------------------------------------------------------------------- predictive load


def test_predictive_load_returns_at_once_and_warms_in_the_background(filled_store):
    gate = threading.Event()
    prepare = CountingPrepare(gate)

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(3), tier2_capacity_mb=0,
                                prepare=prepare)
        task = cache.predictive_load(["b", "c"])
        assert not task.done(), "the caller must not wait for the warm-up"
        assert cache.tier_of("b") == 3
        gate.set()
        await task
        warmed = sorted(cache.tier1_ids())
        await cache.get_adapter("b")
        result = warmed, cache.stats()
        await cache.close()
        return result

    warmed, stats = run(main())
    assert warmed == ["b", "c"]
    assert stats["tier1"]["hits"] == 1 and stats["tier1"]["misses"] == 0
    assert stats["prefetches"] == 2 and stats["tier3"]["loads"] == 2
    assert stats["tier3"]["hits"] == 0, "background loads are not requests"


def test_request_during_prefetch_joins_it(filled_store):
    gate = threading.Event()
    prepare = CountingPrepare(gate)

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(3), tier2_capacity_mb=0,
                                prepare=prepare)
        warm = cache.predictive_load(["d"])
        await asyncio.sleep(0.01)
        request = asyncio.create_task(cache.get_adapter("d"))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(warm, request)
        result = cache.stats()
        await cache.close()
        return result

    stats = run(main())
    assert len(prepare.calls) == 1 and stats["inflight_joins"] == 1


def test_predictive_load_into_tier2_only_reads_host_tensors(filled_store):
    prepare = CountingPrepare()

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(3), tier2_capacity_mb=mb(3),
                                prepare=prepare)
        await cache.predictive_load(["a", "b"], tier=2)
        result = cache.tier2_ids(), cache.tier1_ids()
        await cache.close()
        return result

    t2, t1 = run(main())
    assert sorted(t2) == ["a", "b"] and t1 == [] and prepare.calls == []


def test_predictive_load_of_unknown_ids_is_counted_not_raised(filled_store):
    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(3), tier2_capacity_mb=0)
        await cache.predictive_load(["ghost", "a"])
        result = cache.stats(), cache.tier1_ids()
        await cache.close()
        return result

    stats, t1 = run(main())
    assert stats["prefetch_errors"] == 1 and t1 == ["a"]


# ----------------------------------------------------------------------------- damaged store


def test_truncated_stored_file_is_refused_at_load(filled_store):
    weights = filled_store.path("a") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=0)
        try:
            with pytest.raises(AdapterValidationError, match="truncated"):
                await cache.get_adapter("a")
        finally:
            await cache.close()

    run(main())


def test_verify_on_load_catches_a_flipped_byte(filled_store):
    weights = filled_store.path("a") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=0,
                                verify_on_load=True)
        try:
            with pytest.raises(DigestMismatchError, match="adapter_model.safetensors"):
                await cache.get_adapter("a")
        finally:
            await cache.close()

    run(main())


# ----------------------------------------------------------------------------- VRAM budget


def test_tier1_stays_within_the_vram_budget(filled_store):
    vram = VRAMManager(budget_mb=mb(10), device="cpu")
    vram.reserve("base", int(8 * ADAPTER), "base_model")

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(5), tier2_capacity_mb=mb(5),
                                vram=vram)
        for name in ["a", "b", "c"]:
            await cache.get_adapter(name)
        result = cache.tier1_ids(), vram.reserved_bytes("experts")
        await cache.close()
        return result

    t1, experts = run(main())
    assert t1 == ["b", "c"] and experts == 2 * ADAPTER
    assert vram.reserved_bytes("experts") == 0, "close() releases the reservations"


def test_kv_cache_growth_demotes_experts_to_ram(filled_store):
    vram = VRAMManager(budget_mb=mb(4), device="cpu")

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(4), tier2_capacity_mb=mb(4),
                                vram=vram, pinned=["a"])
        await cache.start()
        for name in ["b", "c", "d"]:
            await cache.get_adapter(name)
        assert vram.free_bytes() == 0
        vram.reserve("kv", int(1.5 * ADAPTER), "kv_cache")  # experts must yield 2 adapters
        result = cache.tier1_ids(), cache.tier2_ids(), cache.stats()
        with pytest.raises(VRAMBudgetError, match="cannot reserve"):
            vram.reserve("kv2", int(2 * ADAPTER), "kv_cache")  # only pinned "a" is left
        await cache.close()
        return result

    t1, t2, stats = run(main())
    assert t1 == ["a", "d"] and t2 == ["b", "c"]
    assert stats["tier1"]["evictions"] == 2
    assert stats["vram"]["reserved_bytes"]["kv_cache"] == int(1.5 * ADAPTER)


def test_damaged_header_with_intact_size_is_refused_at_load(filled_store):
    weights = filled_store.path("a") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # same size, header no longer JSON
    weights.write_bytes(bytes(data))

    async def main():
        cache = TieredDoRACache(filled_store, tier1_capacity_mb=mb(2), tier2_capacity_mb=0)
        try:
            with pytest.raises(AdapterValidationError, match="adapter_model.safetensors"):
                await cache.get_adapter("a")
            return await cache.get_adapter("b")  # the cache keeps working
        finally:
            await cache.close()

    assert isinstance(run(main()), LoadedAdapter)
