"""``PipelineConfig``: the pipeline's settings, flat, with the seed's names.

Each field names the setting of the YAML schema (:mod:`r3mes.config`) it mirrors; its
default is that setting's default (:func:`r3mes.config.schema_default`) and
:meth:`PipelineConfig.from_settings` reads it from there, so no default is set twice. The
router's own configurations are built from it (:meth:`PipelineConfig.hybrid_config`,
:meth:`PipelineConfig.gating_config`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from r3mes.config import schema_default


def _setting(key: str, convert: Callable[[Any], Any] | None = None) -> Any:
    """A field mirroring setting ``key`` (``convert`` maps the setting's value to the
    field's); its default is the schema's."""
    value = schema_default(key)
    if convert is not None:
        value = convert(value)
    meta = {"setting": key, "convert": convert}
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return field(default=value, metadata=meta)


def _rag_mode(hybrid_search: bool) -> str:
    return "hybrid" if hybrid_search else "dense"


def _megabytes(gigabytes: float | None) -> float | None:
    return None if gigabytes is None else gigabytes * 1024.0


@dataclass
class PipelineConfig:
    """Everything the pipeline needs, flat, with the seed's names. Build it from the YAML
    configuration with :meth:`from_settings`; every field has the packaged default."""

    # RAG
    enable_rag: bool = _setting("rag.enabled")
    rag_top_k: int = _setting("rag.top_k")
    rag_mode: str = _setting("rag.hybrid_search", _rag_mode)
    rag_indices: list[str] | None = _setting("rag.indices")
    rag_max_context_chars: int = _setting("rag.max_context_chars")
    rag_embedding_model: str | None = _setting("rag.embedding_model")
    rerank: bool = _setting("rag.rerank")
    reranker_model: str | None = _setting("rag.reranker_model")
    # routing
    router_strategy: str = _setting("router.strategy")
    keyword_weight: float = _setting("router.hybrid.keyword_weight")
    semantic_weight: float = _setting("router.hybrid.semantic_weight")
    fast_path_threshold: float = _setting("router.hybrid.fast_path_threshold")
    adaptive_weighting: bool = _setting("router.hybrid.adaptive_weighting")
    fallback_threshold: float = _setting("router.gating.general_fallback_threshold")
    min_expert_weight: float = _setting("router.gating.min_weight")
    experts_8gb: int = _setting("router.gating.vram_8gb_max_experts")
    experts_16gb: int = _setting("router.gating.vram_16gb_max_experts")
    experts_24gb: int = _setting("router.gating.vram_24gb_max_experts")
    vram_capacity_mb: float | None = _setting("router.gating.vram_gb", _megabytes)
    fill_with_general: bool = _setting("router.gating.fill_with_general")
    general_fill_score: float = _setting("router.gating.general_fill_score")
    registry: str | None = _setting("router.registry")
    semantic_model: str | None = _setting("router.semantic.model")
    # cache
    tier1_capacity_mb: float = _setting("cache.tier1_vram.capacity_mb")
    tier2_capacity_mb: float = _setting("cache.tier2_ram.capacity_mb")
    store_max_size_gb: float | None = _setting("cache.tier3_disk.max_size_gb")
    preload_experts: list[str] = _setting("cache.tier1_vram.preload")
    predictive_loading: bool = _setting("cache.predictive_loading")
    # model and backend
    model_path: str | None = _setting("model.path")
    experts_dir: str | None = _setting("model.experts_dir")
    knowledge_dir: str | None = _setting("model.knowledge_dir")
    backend: str = _setting("inference.backend")
    device: str = _setting("inference.device")
    adapter_storage: str | None = _setting("inference.adapter_storage")
    max_batch_size: int = _setting("inference.max_batch_size")
    max_queue: int = _setting("inference.max_queue")
    kv_cache_tokens: int | None = _setting("inference.kv_cache_tokens")
    kv_cache_mb: float | None = _setting("inference.kv_cache_mb")
    kv_block_size: int = _setting("inference.kv_block_size")
    kv_cache_dtype: str = _setting("inference.kv_cache_dtype")
    max_prefill_tokens: int = _setting("inference.max_prefill_tokens")
    home: str | None = None  # the data directory (not a setting: --home / $R3MES_HOME)
    # generation
    max_new_tokens: int = _setting("generation.max_new_tokens")
    temperature: float = _setting("generation.temperature")  # 0 is greedy
    top_k: int = _setting("generation.top_k")
    top_p: float = _setting("generation.top_p")
    repetition_penalty: float = _setting("generation.repetition_penalty")
    stop: list[str] = _setting("generation.stop")
    seed: int | None = _setting("generation.seed")
    system_prompt: str = _setting("generation.system_prompt")
    # post-processing
    citations: bool = _setting("postprocess.citations")
    strip_whitespace: bool = _setting("postprocess.strip_whitespace")
    safety_enabled: bool = _setting("postprocess.safety.enabled")
    blocked_terms: list[str] = _setting("postprocess.safety.blocked_terms")
    safety_replacement: str = _setting("postprocess.safety.replacement")
    max_query_chars: int = _setting("server.max_prompt_chars")

    def __post_init__(self) -> None:
        if self.router_strategy not in ("keyword", "semantic", "hybrid"):
            raise ValueError(f"router_strategy must be keyword, semantic or hybrid, "
                             f"got {self.router_strategy!r}")
        if self.rag_top_k < 1:
            raise ValueError(f"rag_top_k must be at least 1, got {self.rag_top_k}")
        if self.vram_capacity_mb is not None and not (
                math.isfinite(self.vram_capacity_mb) and self.vram_capacity_mb >= 0):
            raise ValueError(f"vram_capacity_mb must be a non-negative number, "
                             f"got {self.vram_capacity_mb!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    @classmethod
    def from_settings(cls, settings: Any, home: str | None = None) -> PipelineConfig:
        """From an :class:`r3mes.config.R3mesConfig` (each field from the setting it names)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.metadata.get("setting")
            if key is None:
                continue
            value = copy.deepcopy(settings.get(key))
            convert = f.metadata["convert"]
            values[f.name] = convert(value) if convert is not None else value
        return cls(home=home, **values)

    def hybrid_config(self) -> Any:
        """The router's :class:`~r3mes.router.hybrid_router.HybridConfig` for these settings."""
        from r3mes.router.hybrid_router import HybridConfig

        return HybridConfig(fast_path_threshold=self.fast_path_threshold,
                            keyword_weight=self.keyword_weight,
                            semantic_weight=self.semantic_weight,
                            adaptive_weighting=self.adaptive_weighting)

    def gating_config(self) -> Any:
        """The router's :class:`~r3mes.router.vram_adaptive_gating.GatingConfig`."""
        from r3mes.router.vram_adaptive_gating import GatingConfig

        return GatingConfig(tiers=((8.0, self.experts_8gb), (16.0, self.experts_16gb)),
                            max_k=self.experts_24gb, fallback_threshold=self.fallback_threshold,
                            min_weight=self.min_expert_weight)
