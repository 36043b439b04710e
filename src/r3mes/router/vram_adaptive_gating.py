"""Stage 4 of routing: how many experts to apply, given the memory there is to hold them.

Every extra expert costs adapter memory and a rank-r update per layer, so the number of
experts follows the memory budget (the seed's tiers): top-1 at or below 8 GB, top-2 up to
16 GB, top-3 above. When even the best expert scores below ``fallback_threshold`` the
query goes to the fallback expert (``general_dora``) alone. Experts whose share of the
weight would fall under ``min_weight`` are dropped. Weights are the scores renormalised
to sum to 1, which is what the fused DoRA mix expects (DESIGN.md, "DoRA contract").

The budget is ``vram_gb`` or ``budget_mb`` (the cache's VRAM manager speaks MB); with
neither, the free CUDA memory is read when a CUDA device exists, else
``GatingConfig.default_vram_gb`` is used (CPU serving).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from r3mes.config import schema_default


@dataclass(frozen=True)
class GatingConfig:
    """Tiers are ``(upper_gb, k)`` pairs: ``k`` experts while the budget is <= ``upper_gb``;
    above the last tier ``max_k`` experts. The defaults are the ``router.gating`` settings'
    (:func:`r3mes.config.schema_default`)."""

    tiers: tuple[tuple[float, int], ...] = (
        (8.0, schema_default("router.gating.vram_8gb_max_experts")),
        (16.0, schema_default("router.gating.vram_16gb_max_experts")))
    max_k: int = schema_default("router.gating.vram_24gb_max_experts")
    fallback_threshold: float = schema_default("router.gating.general_fallback_threshold")
    min_weight: float = schema_default("router.gating.min_weight")
    default_vram_gb: float = 8.0

    def __post_init__(self) -> None:
        if self.max_k < 1 or any(k < 1 for _, k in self.tiers):
            raise ValueError("GatingConfig: every tier and max_k must allow at least 1 expert")
        uppers = [u for u, _ in self.tiers]
        if uppers != sorted(uppers):
            raise ValueError("GatingConfig.tiers must be sorted by their upper bound")
        if not 0.0 <= self.min_weight < 1.0:
            raise ValueError("GatingConfig.min_weight must be in [0, 1)")


@dataclass(frozen=True)
class GatingResult:
    """The chosen ``(expert_id, weight)`` pairs (weights sum to 1), the ``k`` the budget
    allowed, the budget used, and whether the fallback expert was substituted."""

    experts: list[tuple[str, float]]
    top_k: int
    vram_gb: float
    fallback_used: bool


@lru_cache(maxsize=1)
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # torch is a dependency, but gating must not need it
        return False
    return bool(torch.cuda.is_available())


def free_device_memory_gb() -> float | None:
    """Free memory of the current CUDA device in GB, or ``None`` without CUDA."""
    if not _cuda_available():
        return None
    torch = sys.modules["torch"]
    free, _total = torch.cuda.mem_get_info()
    return free / 1e9


def top_k_for_vram(vram_gb: float, config: GatingConfig | None = None) -> int:
    """How many experts a budget of ``vram_gb`` allows (the seed: 1 / 2 / 3)."""
    config = config or GatingConfig()
    if vram_gb != vram_gb or vram_gb < 0:  # NaN or negative
        raise ValueError(f"vram_gb must be a non-negative number, got {vram_gb!r}")
    for upper, k in config.tiers:
        if vram_gb <= upper:
            return min(k, config.max_k)
    return config.max_k


class VRAMAdaptiveGating:
    """Turns ranked scores into the final weighted expert list."""

    def __init__(self, config: GatingConfig | None = None, fallback_id: str = "general_dora"):
        self.config = config or GatingConfig()
        self.fallback_id = fallback_id

    def budget_gb(self, vram_gb: float | None = None, budget_mb: float | None = None) -> float:
        """The budget in GB from whichever argument is given, else the device, else config."""
        if vram_gb is not None and budget_mb is not None:
            raise ValueError("give vram_gb or budget_mb, not both")
        if budget_mb is not None:
            return float(budget_mb) / 1024.0
        if vram_gb is not None:
            return float(vram_gb)
        free = free_device_memory_gb()
        return free if free is not None else self.config.default_vram_gb

    def gate(
        self,
        scores: Sequence[tuple[str, float]],
        vram_gb: float | None = None,
        *,
        budget_mb: float | None = None,
        top_k: int | None = None,
    ) -> GatingResult:
        """Select and weight experts from ``scores`` (any order, scores >= 0).

        ``top_k`` overrides the budget's k (still at least 1). Empty ``scores`` or a best
        score under ``fallback_threshold`` yields ``[(fallback_id, 1.0)]``.
        """
        budget = self.budget_gb(vram_gb, budget_mb)
        k = top_k_for_vram(budget, self.config) if top_k is None else int(top_k)
        if k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        ranked = sorted(
            ((eid, float(s)) for eid, s in scores if s > 0.0), key=lambda kv: (-kv[1], kv[0])
        )
        if not ranked or ranked[0][1] < self.config.fallback_threshold:
            return GatingResult([(self.fallback_id, 1.0)], k, budget, True)
        chosen = ranked[:k]
        # Drop experts whose share is negligible: they would cost a full adapter for a
        # rounding error of contribution. The best expert always stays.
        while len(chosen) > 1:
            total = sum(s for _, s in chosen)
            if chosen[-1][1] / total >= self.config.min_weight:
                break
            chosen.pop()
        total = sum(s for _, s in chosen)
        weights = [(eid, s / total) for eid, s in chosen]
        # Make the sum exactly 1.0 despite float rounding (the DoRA mix assumes it).
        head, last = weights[:-1], weights[-1]
        weights = head + [(last[0], 1.0 - sum(w for _, w in head))]
        return GatingResult(weights, k, budget, False)
