"""The hybrid expert router: keyword -> (semantic) -> fusion -> VRAM-adaptive gating.

``HybridRouter().route("Python'da for loop nasıl yazılır?")`` returns
``[("coding_dora", 0.55), ("turkish_dora", 0.45)]``-like ``(expert_id, weight)`` pairs whose
weights sum to 1. See ``hybrid_router`` for the stages and ``data/experts.yaml`` for the
experts.
"""

from r3mes.router.hybrid_router import (
    EmptyQueryError,
    HybridConfig,
    HybridRouter,
    RoutingDecision,
)
from r3mes.router.registry import ExpertRegistry, RegistryError, load_registry

__all__ = [
    "EmptyQueryError",
    "ExpertRegistry",
    "HybridConfig",
    "HybridRouter",
    "RegistryError",
    "RoutingDecision",
    "load_registry",
]
