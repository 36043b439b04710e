"""Stage 4: VRAM-adaptive top-k, fallback and weight normalisation."""

from __future__ import annotations

import math

import pytest

from r3mes.router.vram_adaptive_gating import GatingConfig, VRAMAdaptiveGating, top_k_for_vram

SCORES = [("medical_dora", 0.9), ("turkish_dora", 0.6), ("qa_dora", 0.4), ("legal_dora", 0.2)]


@pytest.mark.parametrize(
    ("vram_gb", "k"), [(0.0, 1), (4.0, 1), (8.0, 1), (8.5, 2), (16.0, 2), (16.1, 3), (80.0, 3)]
)
def test_top_k_follows_the_seed_tiers(vram_gb: float, k: int) -> None:
    assert top_k_for_vram(vram_gb) == k


def test_tiers_are_configurable() -> None:
    config = GatingConfig(tiers=((4.0, 1), (12.0, 2), (24.0, 3)), max_k=4)
    assert [top_k_for_vram(v, config) for v in (2, 8, 20, 40)] == [1, 2, 3, 4]


@pytest.mark.parametrize("vram_gb", [4.0, 12.0, 24.0])
def test_weights_sum_to_one_and_respect_the_budget(vram_gb: float) -> None:
    result = VRAMAdaptiveGating().gate(SCORES, vram_gb)
    assert len(result.experts) <= top_k_for_vram(vram_gb)
    assert math.isclose(sum(w for _, w in result.experts), 1.0, abs_tol=1e-12)
    assert result.experts[0][0] == "medical_dora"


def test_weights_are_proportional_to_scores() -> None:
    result = VRAMAdaptiveGating().gate(SCORES, 12.0)
    assert result.experts == [("medical_dora", pytest.approx(0.6)), ("turkish_dora", 0.4)]


def test_budget_in_mb_is_accepted() -> None:
    gating = VRAMAdaptiveGating()
    assert gating.gate(SCORES, budget_mb=4096).top_k == 1
    assert gating.gate(SCORES, budget_mb=12 * 1024).top_k == 2
    assert gating.gate(SCORES, budget_mb=32 * 1024).top_k == 3


def test_both_budget_forms_at_once_are_refused() -> None:
    with pytest.raises(ValueError, match="vram_gb or budget_mb"):
        VRAMAdaptiveGating().gate(SCORES, 8.0, budget_mb=8192)


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        VRAMAdaptiveGating().gate(SCORES, -1.0)


def test_low_best_score_falls_back_to_the_general_expert() -> None:
    result = VRAMAdaptiveGating().gate([("qa_dora", 0.45), ("legal_dora", 0.3)], 24.0)
    assert result.experts == [("general_dora", 1.0)]
    assert result.fallback_used


def test_no_scores_at_all_fall_back() -> None:
    assert VRAMAdaptiveGating().gate([], 24.0).experts == [("general_dora", 1.0)]


def test_experts_with_a_negligible_share_are_dropped() -> None:
    config = GatingConfig(min_weight=0.2)
    result = VRAMAdaptiveGating(config).gate(
        [("a", 0.9), ("b", 0.8), ("c", 0.2)], 24.0
    )
    assert [e for e, _ in result.experts] == ["a", "b"]
    assert math.isclose(sum(w for _, w in result.experts), 1.0)


def test_top_k_override_wins_over_the_budget() -> None:
    assert len(VRAMAdaptiveGating().gate(SCORES, 4.0, top_k=3).experts) == 3


def test_without_a_budget_the_cpu_default_is_used_when_no_cuda() -> None:
    gating = VRAMAdaptiveGating(GatingConfig(default_vram_gb=20.0))
    from r3mes.router.vram_adaptive_gating import free_device_memory_gb

    expected = free_device_memory_gb() or 20.0
    assert gating.budget_gb() == pytest.approx(expected, rel=0.5)
