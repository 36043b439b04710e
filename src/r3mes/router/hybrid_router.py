"""The hybrid router: keyword -> (semantic) -> fusion -> VRAM-adaptive gating.

1. **Keyword** (:mod:`keyword_router`): stems, patterns and the detected language.
2. **Fast path**: when the keyword confidence of a domain/task/fallback expert is at least
   ``fast_path_threshold`` (0.85, i.e. two strong keyword hits) the semantic stage is
   skipped; the sentence model is not even loaded until a query needs it.
3. **Semantic** (:mod:`semantic_router`): the query is embedded with the multilingual
   encoder and compared with every expert's representative queries.
4. **Calibrated fusion** (:mod:`calibration`, the default wherever a fitted model exists
   for the encoder): keyword confidence and four semantic features per topical expert go
   through a conditional logit fitted on the train split of the real-style questions,
   giving ``p(expert | query)``. The best expert's score is ``0.5 + 0.5·p`` and the others
   keep their probability ratio to it (the gating's weights follow ``p``). When the best
   ``p`` is under the fitted ``general_threshold`` the router decides "general": the
   fallback expert goes first and the unsure specialist stays behind it.
   Without a fitted model (``calibrated=False`` or a custom encoder) the hand-set fusion
   runs: a softmax at ``semantic_temperature`` over the max-pooled similarities, fused
   ``keyword_weight * keyword + semantic_weight * semantic``, and with
   ``adaptive_weighting`` an expert keeps at least its keyword score.
5. **Language experts** rank behind the topic: the language of a query says how to
   answer, the topic says what. Once the best domain/task expert scores at least
   ``language_lead_threshold`` a language expert is capped just below it; otherwise (a
   Turkish query with no clear topic) the language expert may lead. A question *about*
   a language ("Almancada der die das farkı") names it, which the keyword stage sees; the
   language expert then competes with the topic on that keyword score, uncapped.
6. **Gating** (:mod:`vram_adaptive_gating`): top-k by memory budget, fallback, weights.

Input contract (also enforced by the CLI):

- ``query`` must be a ``str``; anything else raises :class:`TypeError`.
- An empty or whitespace-only query raises :class:`EmptyQueryError` (a ``ValueError``):
  there is nothing to route, and silently answering with the fallback would hide a bug
  upstream.
- Undecodable bytes that reached the string (lone surrogates) become U+FFFD and control
  characters become spaces before routing.
- Only the first ``max_query_chars`` characters (default 4096) are routed; the topic of a
  long document shows in its head, and this bounds the latency of a 1 MB query. The
  decision records ``truncated=True``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from r3mes.config import schema_default
from r3mes.errors import R3mesError
from r3mes.router.calibration import FusionModel, load_fusion
from r3mes.router.keyword_router import KeywordRouter, LanguageGuess, clean_query
from r3mes.router.registry import ExpertRegistry, resolve_registry
from r3mes.router.semantic_router import SemanticRouter
from r3mes.router.vram_adaptive_gating import GatingConfig, VRAMAdaptiveGating

Strategy = Literal["keyword", "semantic", "hybrid"]
STRATEGIES: tuple[str, ...] = ("keyword", "semantic", "hybrid")


class EmptyQueryError(R3mesError, ValueError):
    """The query is empty or only whitespace."""


@dataclass(frozen=True)
class HybridConfig:
    """Tunables of the hybrid router; the defaults are the seed's, tuned on the training
    split of ``tests/router/data/router_eval.yaml`` where the seed leaves a choice. The four
    the YAML configuration sets (``router.hybrid``) take their defaults from its schema
    (:func:`r3mes.config.schema_default`)."""

    fast_path_threshold: float = schema_default("router.hybrid.fast_path_threshold")
    keyword_weight: float = schema_default("router.hybrid.keyword_weight")
    semantic_weight: float = schema_default("router.hybrid.semantic_weight")
    adaptive_weighting: bool = schema_default("router.hybrid.adaptive_weighting")
    semantic_temperature: float = 0.01
    language_weight: float = 0.6
    language_lead_threshold: float = 0.5
    language_cap: float = 0.95
    semantic_language_experts: bool = True
    max_query_chars: int = 4096
    #: an unsure language guess at least this probable still adds its language expert
    #: (calibrated fusion only), at ``language_weight × probability``
    unsure_language_floor: float = 0.35
    #: use the fitted fusion (``fusion-<encoder>.json``) when one exists for the encoder
    calibrated: bool = True
    #: override the fitted general-fallback threshold (``None``: the fitted one)
    general_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.keyword_weight < 0 or self.semantic_weight < 0:
            raise ValueError("HybridConfig: fusion weights must be non-negative")
        if self.keyword_weight + self.semantic_weight <= 0:
            raise ValueError("HybridConfig: fusion weights must not both be zero")
        if self.semantic_temperature <= 0:
            raise ValueError("HybridConfig.semantic_temperature must be positive")
        if self.max_query_chars < 1:
            raise ValueError("HybridConfig.max_query_chars must be at least 1")
        if self.general_threshold is not None and not 0.0 <= self.general_threshold < 1.0:
            raise ValueError("HybridConfig.general_threshold must be in [0, 1)")


@dataclass
class RoutingDecision:
    """Everything one routing produced.

    ``experts`` are the gated ``(expert_id, weight)`` pairs (weights sum to 1); ``scores``
    the full ranking they were chosen from; ``timings_ms`` per stage (``keyword``,
    ``semantic``, ``fusion``, ``gating``) and ``total_ms``. ``topic_confidence`` is the
    calibrated ``p`` of the best topical expert (``None`` on the fast path and without a
    fitted fusion); ``general_decision`` says the router chose the fallback because that
    ``p`` was under the threshold.
    """

    experts: list[tuple[str, float]]
    scores: list[tuple[str, float]]
    strategy: str
    fast_path: bool
    keyword_confidence: float
    language: str | None
    language_probability: float
    fallback_used: bool
    top_k: int
    vram_gb: float
    truncated: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    total_ms: float = 0.0
    topic_confidence: float | None = None
    general_decision: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``r3mes route --json`` schema)."""
        data = asdict(self)
        data["experts"] = [{"id": e, "weight": round(w, 6)} for e, w in self.experts]
        data["scores"] = [{"id": e, "score": round(s, 6)} for e, s in self.scores]
        data["timings_ms"] = {k: round(v, 4) for k, v in self.timings_ms.items()}
        data["total_ms"] = round(self.total_ms, 4)
        return data


@dataclass
class RouterStats:
    """Counters since the router was built: routes, fast-path rate, mean stage latency,
    how often each expert was chosen first."""

    routes: int = 0
    fast_path: int = 0
    fallback: int = 0
    stage_ms_total: dict[str, float] = field(default_factory=dict)
    stage_counts: dict[str, int] = field(default_factory=dict)
    top_expert_counts: Counter[str] = field(default_factory=Counter)

    @property
    def fast_path_rate(self) -> float:
        return self.fast_path / self.routes if self.routes else 0.0

    def mean_stage_ms(self) -> dict[str, float]:
        return {k: v / self.stage_counts[k] for k, v in self.stage_ms_total.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "routes": self.routes,
            "fast_path": self.fast_path,
            "fast_path_rate": self.fast_path_rate,
            "fallback": self.fallback,
            "mean_stage_ms": self.mean_stage_ms(),
            "top_expert_counts": dict(self.top_expert_counts),
        }


def _softmax(values: np.ndarray, temperature: float) -> np.ndarray:
    z = np.exp((values - values.max()) / temperature)
    return z / z.sum()


class HybridRouter:
    """Routes a query to weighted DoRA experts.

    ``HybridRouter()`` routes over every expert of the packaged registry;
    ``HybridRouter(expert_ids=installed)`` over the installed ones (plus the fallback).
    ``registry`` may be an :class:`ExpertRegistry` or a path to a registry file;
    ``model_name`` picks the sentence model (bundled MiniLM by default); ``home`` is the
    data directory for embeddings built for custom registries or models.
    """

    def __init__(
        self,
        registry: ExpertRegistry | str | Path | None = None,
        *,
        expert_ids: Sequence[str] | None = None,
        config: HybridConfig | None = None,
        gating: GatingConfig | None = None,
        model_name: str | None = None,
        home: str | Path | None = None,
        semantic: SemanticRouter | None = None,
    ) -> None:
        self.registry = resolve_registry(registry, expert_ids)
        self.config = config or HybridConfig()
        self.keyword = KeywordRouter(self.registry, language_weight=self.config.language_weight)
        if semantic is not None and semantic.registry.ids != self.registry.ids:
            raise ValueError("the semantic router was built for a different set of experts")
        self.semantic = semantic or SemanticRouter(
            self.registry, model_name=model_name, home=home, max_chars=self.config.max_query_chars
        )
        self.gating = VRAMAdaptiveGating(gating, fallback_id=self.registry.fallback.id)
        self.stats = RouterStats()
        self._ids = self.registry.ids
        self._language = np.array([e.kind == "language" for e in self.registry])
        self._topical_ids = [e.id for e in self.registry if e.kind != "language"]
        self._language_experts = {
            code: self._ids.index(eid) for code, eid in self.registry.languages().items()}
        self._fallback_topical = self._topical_ids.index(self.registry.fallback.id)
        self._lock = threading.Lock()
        self._fusion: FusionModel | None = None
        self._fusion_checked = False

    @property
    def fusion(self) -> FusionModel | None:
        """The fitted fusion for this router's encoder, or ``None`` (hand-set fusion)."""
        if not self._fusion_checked:
            with self._lock:
                if not self._fusion_checked:
                    if self.config.calibrated:
                        self._fusion = load_fusion(self.semantic.encoder_slug)
                    self._fusion_checked = True
        return self._fusion

    # -- public API ----------------------------------------------------------------------

    def warm_up(self, semantic: bool = True) -> HybridRouter:
        """Load the language detector, probe the device memory and (``semantic``) load the
        sentence model and expert embeddings, so the first route pays no start-up cost."""
        self.keyword.detect_language("warm up the language detector")
        self.gating.budget_gb()
        if semantic:
            self.semantic.load()
            _ = self.fusion
        return self

    def route(
        self, query: str, vram_gb: float | None = None, *, budget_mb: float | None = None
    ) -> list[tuple[str, float]]:
        """``[(expert_id, weight)]`` for ``query``, weights summing to 1 (the seed's API)."""
        return self.route_decision(query, vram_gb, budget_mb=budget_mb).experts

    def route_decision(
        self,
        query: str,
        vram_gb: float | None = None,
        *,
        budget_mb: float | None = None,
        top_k: int | None = None,
        strategy: Strategy = "hybrid",
    ) -> RoutingDecision:
        """Route ``query`` and report every stage (see :class:`RoutingDecision`).

        ``strategy="keyword"`` or ``"semantic"`` ranks by that stage alone (for evaluation
        and debugging); gating applies in every case.
        """
        start = time.perf_counter()
        text, truncated = self._prepare(query)
        scores, info, timings = self.rank(text, strategy)
        t0 = time.perf_counter()
        gated = self.gating.gate(scores, vram_gb, budget_mb=budget_mb, top_k=top_k)
        timings["gating"] = (time.perf_counter() - t0) * 1e3
        decision = RoutingDecision(
            experts=gated.experts,
            scores=scores,
            strategy=strategy,
            fast_path=info["fast_path"],
            keyword_confidence=info["keyword_confidence"],
            language=info["language"],
            language_probability=info["language_probability"],
            fallback_used=gated.fallback_used,
            top_k=gated.top_k,
            vram_gb=gated.vram_gb,
            truncated=truncated,
            timings_ms=timings,
            total_ms=(time.perf_counter() - start) * 1e3,
            topic_confidence=info.get("topic_confidence"),
            general_decision=info.get("general_decision", False),
        )
        self._record(decision)
        return decision

    def rank(
        self, query: str, strategy: Strategy = "hybrid"
    ) -> tuple[list[tuple[str, float]], dict[str, Any], dict[str, float]]:
        """Ungated ranking ``[(expert_id, score)]`` (best first, every expert), a dict of
        stage facts (``fast_path``, ``keyword_confidence``, ``language``,
        ``language_probability``) and stage timings in ms."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        text, _ = self._prepare(query)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        stems, guess = self.keyword.evidence(text)
        confidence = self.keyword.topical_confidence(stems)
        keyword = np.asarray(self.keyword.with_language(stems, guess))
        timings["keyword"] = (time.perf_counter() - t0) * 1e3
        info: dict[str, Any] = {
            "fast_path": False,
            "keyword_confidence": round(confidence, 6),
            "language": guess.language,
            "language_probability": round(guess.probability, 6),
        }
        if strategy == "keyword":
            return self._ranked(keyword), info, timings
        fast = strategy == "hybrid" and confidence >= self.config.fast_path_threshold
        if fast:
            info["fast_path"] = True
            final = keyword.copy()
        else:
            t0 = time.perf_counter()
            features = self.semantic.features(text)
            timings["semantic"] = (time.perf_counter() - t0) * 1e3
            if strategy == "semantic":
                return self._ranked(np.clip(features[:, 0], 0.0, None)), info, timings
            t0 = time.perf_counter()
            fusion = self.fusion
            if fusion is not None:
                final = self._fuse_calibrated(fusion, np.asarray(stems), features, info)
                final = self._rank_languages_calibrated(
                    final, np.asarray(stems), guess, info["general_topic"])
                timings["fusion"] = (time.perf_counter() - t0) * 1e3
                return self._ranked(final), info, timings
            final = self._fuse(keyword, features[:, 0])
            timings["fusion"] = (time.perf_counter() - t0) * 1e3
        final = self._rank_languages(final, keyword)
        return self._ranked(final), info, timings

    # -- internals -----------------------------------------------------------------------

    def _prepare(self, query: str) -> tuple[str, bool]:
        text = clean_query(query)
        if not text.strip():
            raise EmptyQueryError("query is empty or only whitespace; nothing to route")
        limit = self.config.max_query_chars
        return (text[:limit], True) if len(text) > limit else (text, False)

    def _fuse(self, keyword: np.ndarray, similarities: np.ndarray) -> np.ndarray:
        if not self.config.semantic_language_experts and self._language.any():
            similarities = np.where(self._language, -1.0, similarities)
        semantic = _softmax(similarities, self.config.semantic_temperature)
        fused = self.config.keyword_weight * keyword + self.config.semantic_weight * semantic
        if self.config.adaptive_weighting:
            fused = np.maximum(fused, keyword)
        return np.clip(fused, 0.0, 1.0)

    def _fuse_calibrated(
        self, fusion: FusionModel, stems: np.ndarray, features: np.ndarray,
        info: dict[str, Any],
    ) -> np.ndarray:
        topical = ~self._language
        evidence = np.column_stack([stems[topical], features[topical]])
        p = fusion.probabilities(evidence, self._topical_ids)
        top = int(p.argmax())
        p_top = float(p[top])
        # The best expert's score is 0.5 + 0.5 p (so the gating's fallback threshold of 0.5
        # never overrides a decision made here); the others keep their ratio to it, which
        # is what the gating turns into mixing weights.
        scores = p * ((0.5 + 0.5 * p_top) / p_top)
        threshold = (fusion.general_threshold if self.config.general_threshold is None
                     else self.config.general_threshold)
        general = self._fallback_topical
        decided = p_top < threshold and top != general
        if decided:
            scores[general] = min(1.0, scores[top] + 1e-3)
        info["general_topic"] = top == general
        info["topic_confidence"] = round(p_top, 6)
        info["general_decision"] = decided
        final = np.zeros(len(self._ids))
        final[topical] = scores
        return final

    def _rank_languages_calibrated(
        self, final: np.ndarray, stems: np.ndarray, guess: LanguageGuess, general_topic: bool
    ) -> np.ndarray:
        if not self._language.any():
            return final
        best = float(final[~self._language].max())
        detected = np.zeros(len(self._ids))
        # A short question often leaves the detector unsure ("qué es git"); its best guess
        # still beats nothing when it is clearly ahead, at the weight its probability says.
        code = guess.language or (
            guess.candidate if guess.probability >= self.config.unsure_language_floor else None)
        expert = self._language_experts.get(code or "")
        if expert is not None:
            detected[expert] = self.config.language_weight * guess.probability
        language = np.maximum(stems, detected) * self._language
        capped = np.minimum(language, best * self.config.language_cap)
        lead = np.zeros(len(self._ids), dtype=bool)
        if general_topic and guess.language is not None:
            # No topic (the fusion itself found the fallback most likely, not merely an
            # unsure specialist), a clear language: the language expert is the informative
            # choice (the seed's rule; with one expert allowed it is the one that runs).
            lead |= detected > 0
        # A question that names a language ("Almancada fiiller ...", "French nasal vowels")
        # is about it unless the keyword stage found a stronger topic (a translation
        # request names its target language too, and also says "translate").
        topical_keyword = float(np.where(self._language, 0.0, stems).max())
        lead |= self._language & (stems >= 0.7) & (stems > topical_keyword)
        if lead.any():
            leader = int(np.where(lead, language, -1.0).argmax())
            capped[leader] = min(1.0, best + 2e-3)
        return np.where(self._language, capped, final)

    def _rank_languages(self, final: np.ndarray, keyword: np.ndarray) -> np.ndarray:
        if not self._language.any():
            return final
        language = np.maximum(final, keyword) * self._language
        topical = np.where(self._language, 0.0, final)
        best = float(topical.max()) if topical.size else 0.0
        if best >= self.config.language_lead_threshold:
            language = np.minimum(language, best * self.config.language_cap)
        return np.where(self._language, language, final)

    def _ranked(self, scores: np.ndarray) -> list[tuple[str, float]]:
        pairs = [(eid, round(float(s), 6)) for eid, s in zip(self._ids, scores, strict=True)]
        return sorted(pairs, key=lambda kv: (-kv[1], kv[0]))

    def _record(self, decision: RoutingDecision) -> None:
        with self._lock:
            stats = self.stats
            stats.routes += 1
            stats.fast_path += decision.fast_path
            stats.fallback += decision.fallback_used
            for stage, ms in decision.timings_ms.items():
                stats.stage_ms_total[stage] = stats.stage_ms_total.get(stage, 0.0) + ms
                stats.stage_counts[stage] = stats.stage_counts.get(stage, 0) + 1
            if decision.experts:
                stats.top_expert_counts[decision.experts[0][0]] += 1
