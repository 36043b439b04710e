"""VRAMManager: a device budget shared by base model, KV cache and experts."""

from __future__ import annotations

import pytest
import torch

from r3mes.cache.vram_manager import MB, VRAMBudgetError, VRAMManager


def test_reservations_are_accounted_per_kind():
    vram = VRAMManager(budget_mb=1000, device="cpu")
    vram.reserve("model", 600 * MB, "base_model")
    vram.reserve("kv", 100 * MB, "kv_cache")
    vram.reserve("expert:a", 50 * MB, "experts")
    assert vram.reserved_bytes() == 750 * MB
    assert vram.reserved_bytes("experts") == 50 * MB
    assert vram.free_bytes() == 250 * MB
    assert vram.available_for_experts_mb() == 250
    assert vram.expert_room_mb() == 300
    assert vram.release("kv") == 100 * MB
    assert vram.free_bytes() == 350 * MB


def test_over_budget_reservation_is_refused_and_names_the_holders():
    vram = VRAMManager(budget_mb=1000, device="cpu")
    vram.reserve("model", 900 * MB, "base_model")
    with pytest.raises(VRAMBudgetError, match=r"200.0 MB for 'kv'.*100.0 MB free.*base_model 900"):
        vram.reserve("kv", 200 * MB, "kv_cache")
    assert vram.reserved_bytes() == 900 * MB, "a refused reservation changes nothing"
    assert vram.try_reserve("kv", 200 * MB, "kv_cache") is False


def test_duplicate_names_unknown_kinds_and_negative_sizes_are_rejected():
    vram = VRAMManager(budget_mb=100, device="cpu")
    vram.reserve("x", MB)
    with pytest.raises(ValueError, match="already reserved"):
        vram.reserve("x", MB)
    with pytest.raises(ValueError, match="unknown reservation kind"):
        vram.reserve("y", MB, "weights")
    with pytest.raises(ValueError, match="negative"):
        vram.reserve("z", -1)
    with pytest.raises(KeyError, match="nope"):
        vram.release("nope")


def test_cpu_device_needs_a_configured_budget():
    with pytest.raises(ValueError, match="budget_mb is required"):
        VRAMManager(device="cpu")


def test_max_experts_tells_the_gating_how_many_fit():
    vram = VRAMManager(budget_mb=1000, device="cpu")
    vram.reserve("model", 700 * MB, "base_model")
    vram.reserve("expert:a", 50 * MB, "experts")
    assert vram.max_experts(50) == 6  # 300 MB of room for experts in total
    with pytest.raises(ValueError):
        vram.max_experts(0)


def test_resize_grows_within_budget_and_a_failed_resize_keeps_the_old_size():
    vram = VRAMManager(budget_mb=1000, device="cpu")
    vram.reserve("kv", 100 * MB, "kv_cache")
    vram.resize("kv", 400 * MB)
    assert vram.reserved_bytes("kv_cache") == 400 * MB
    with pytest.raises(VRAMBudgetError):
        vram.resize("kv", 2000 * MB)
    assert vram.reserved_bytes("kv_cache") == 400 * MB


def test_model_and_kv_cache_reclaim_memory_from_experts_not_the_reverse():
    vram = VRAMManager(budget_mb=1000, device="cpu")
    held = {f"expert:{i}": 200 * MB for i in range(4)}
    for name, size in held.items():
        vram.reserve(name, size, "experts")
    calls = []

    def reclaim(needed: int) -> int:
        calls.append(needed)
        freed = 0
        for name in list(held):
            if freed >= needed:
                break
            freed += vram.release(name)
            del held[name]
        return freed

    vram.register_reclaimer("experts", reclaim)
    vram.reserve("kv", 500 * MB, "kv_cache")
    assert calls == [300 * MB]
    assert vram.reserved_bytes("experts") == 400 * MB
    # An expert never makes the KV cache yield.
    with pytest.raises(VRAMBudgetError):
        vram.reserve("expert:new", 200 * MB, "experts")
    assert calls == [300 * MB]


def test_snapshot_is_json_ready():
    import json

    vram = VRAMManager(budget_mb=10, device="cpu")
    vram.reserve("m", MB, "base_model")
    snap = json.loads(json.dumps(vram.snapshot()))
    assert snap["budget_bytes"] == 10 * MB and snap["reserved_bytes"]["base_model"] == MB
    assert snap["device_free_bytes"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budget_is_bounded_by_what_the_driver_reports_free():
    vram = VRAMManager(device="cuda", headroom_mb=256)
    free, total = torch.cuda.mem_get_info()
    assert vram.budget_bytes == total
    assert vram.free_bytes() <= free - 256 * MB
    block = torch.empty(512 * MB, dtype=torch.uint8, device="cuda")  # not reserved
    assert vram.free_bytes() <= torch.cuda.mem_get_info()[0] - 256 * MB
    del block
