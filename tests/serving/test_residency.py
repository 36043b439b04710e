"""Adapter residency: the tiered cache decides which DoRA adapters the backend holds
(prepare on entering tier 1, release on leaving it, unload between engine steps)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from r3mes.cache import AdapterStore, TieredDoRACache
from r3mes.cache.residency import AdapterResidency, AdapterSlot, slot_name
from r3mes.core.backends import PyTorchBackend

EXPERTS = ("medical_dora", "coding_dora", "legal_dora")


@pytest.fixture
def store(assets, tmp_path) -> AdapterStore:
    store = AdapterStore(tmp_path / "home")
    for expert in EXPERTS:
        store.add(assets["experts"] / expert, expert)
    return store


@pytest.fixture
def backend(assets) -> PyTorchBackend:
    backend = PyTorchBackend()
    backend.load_base_model(assets["model"])
    return backend


def _object(store: AdapterStore, expert: str):
    return store.objects / store.get(expert).digest


def _tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(4, 8)}  # 128 bytes


def test_prepare_loads_by_content_and_counts_each_reference(store, backend):
    residency = AdapterResidency(backend)
    path = _object(store, "medical_dora")
    first = residency.prepare(path, _tensors())
    again = residency.prepare(path, _tensors())  # another id with the same content
    assert first == again == AdapterSlot(slot_name(path.name), 128)
    assert list(backend.adapters) == [first.name]
    residency.release(first)
    residency.sync(set())
    assert first.name in backend.adapters, "one reference is left"
    residency.release(again)
    residency.sync(set())
    assert first.name not in backend.adapters and residency.referenced() == {}


def test_a_released_adapter_stays_while_a_running_row_needs_it(store, backend):
    residency = AdapterResidency(backend)
    slot = residency.prepare(_object(store, "coding_dora"), _tensors())
    residency.release(slot)
    residency.sync({slot.name})
    assert slot.name in backend.adapters
    residency.sync(set())
    assert slot.name not in backend.adapters


def test_an_adapter_prepared_but_not_yet_in_tier1_survives_a_sync(store, backend):
    # The reload race: the cache records a prepared adapter in tier 1 only after prepare
    # returns; a sync running in between (another job joining) must not unload it.
    residency = AdapterResidency(backend)
    slot = residency.prepare(_object(store, "legal_dora"), _tensors())
    residency.sync(set())
    assert slot.name in backend.adapters


def test_sync_loads_a_needed_adapter_again_and_refuses_an_unknown_one(store, backend):
    residency = AdapterResidency(backend)
    slot = residency.prepare(_object(store, "medical_dora"), _tensors())
    backend.unload_dora_adapter(slot.name)
    residency.sync({slot.name})
    assert slot.name in backend.adapters
    with pytest.raises(KeyError, match="never prepared"):
        residency.sync({"dora-unknown"})


def test_adapters_the_residency_did_not_load_are_left_alone(store, backend, assets):
    backend.load_dora_adapter("mine", assets["experts"] / "general_dora")
    AdapterResidency(backend).sync(set())
    assert "mine" in backend.adapters


async def test_the_cache_releases_what_it_evicts_and_the_backend_unloads_it(store, backend):
    residency = AdapterResidency(backend)
    one_adapter = 0.07  # MB: each tiny expert is about 46 KB
    cache = TieredDoRACache(store, tier1_capacity_mb=one_adapter, tier2_capacity_mb=10,
                            prepare=residency.prepare, release=residency.release)
    try:
        async with cache.use("medical_dora") as medical:
            assert medical.name in backend.adapters
        async with cache.use("coding_dora") as coding:
            pass
        assert cache.tier1_ids() == ["coding_dora"]
        assert set(residency.referenced()) == {coding.name}
        residency.sync(set())
        assert list(backend.adapters) == [coding.name]
        # A leased entry is never evicted: the second adapter does not fit beside it.
        async with cache.use("coding_dora"):
            with pytest.raises(Exception, match="no room in tier 1"):
                await cache.get_adapter("legal_dora")
        residency.sync(set())
        legal = slot_name(store.get("legal_dora").digest)
        assert legal not in backend.adapters, "a slot that could not be placed is released"
        cache.invalidate("coding_dora")
        residency.sync(set())
        assert backend.adapters == {}
    finally:
        await cache.close()


async def test_closing_the_cache_releases_every_slot(store, backend):
    residency = AdapterResidency(backend)
    cache = TieredDoRACache(store, tier1_capacity_mb=10, tier2_capacity_mb=10,
                            prepare=residency.prepare, release=residency.release)
    await asyncio.gather(*(cache.get_adapter(e) for e in EXPERTS))
    assert len(residency.referenced()) == len(EXPERTS)
    await cache.close()
    assert residency.referenced() == {}
