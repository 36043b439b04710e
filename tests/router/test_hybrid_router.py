"""Stage 3 and the whole pipeline: fast path, fusion, language experts, input contract."""

from __future__ import annotations

import math

import pytest

from r3mes.router.hybrid_router import EmptyQueryError, HybridConfig, HybridRouter
from r3mes.router.semantic_router import SemanticRouter


def test_seed_example_python_loop_takes_the_fast_path_to_coding(router: HybridRouter) -> None:
    decision = router.route_decision("Python'da for loop nasıl yazılır?", 8.0)
    assert decision.fast_path
    assert decision.keyword_confidence >= 0.85
    assert decision.experts[0][0] == "coding_dora"
    assert "semantic" not in decision.timings_ms


def test_seed_example_vague_turkish_query_runs_the_semantic_stage(router: HybridRouter) -> None:
    decision = router.route_decision("Bu konuyu açıklar mısın?", 8.0)
    assert not decision.fast_path
    assert "semantic" in decision.timings_ms and "fusion" in decision.timings_ms


def test_seed_example_diabetes_at_8_gb_is_medical_alone(router: HybridRouter) -> None:
    query = "Diyabet hastalarında insülin direnci nasıl tedavi edilir?"
    assert router.route(query, vram_gb=8) == [("medical_dora", 1.0)]


def test_seed_example_diabetes_at_24_gb_adds_turkish(router: HybridRouter) -> None:
    query = "Diyabet hastalarında insülin direnci nasıl tedavi edilir?"
    experts = router.route(query, vram_gb=24)
    assert experts[0][0] == "medical_dora"
    assert "turkish_dora" in [e for e, _ in experts[:3]]
    assert math.isclose(sum(w for _, w in experts), 1.0)


@pytest.mark.parametrize(
    ("query", "expert"),
    [
        ("Kira sözleşmemi erken feshedersem tazminat öder miyim?", "legal_dora"),
        ("Can my landlord raise the rent in the middle of a lease?", "legal_dora"),
        ("Hisse senedi almak mı yoksa altın biriktirmek mi?", "finance_dora"),
        ("Is it a good time to invest in government bonds?", "finance_dora"),
        ("Karadeliklerin etrafında zaman nasıl akar?", "science_dora"),
        ("Why do the planets orbit the sun in the same plane?", "science_dora"),
        ("Osmanlı padişahları nasıl seçilirdi?", "history_dora"),
        ("What led to the collapse of the Byzantine Empire?", "history_dora"),
        ("Sınava nasıl daha verimli çalışabilirim?", "education_dora"),
        ("How can I help my students prepare for their exams?", "education_dora"),
        ("Bu raporu kısaca özetler misin?", "summarization_dora"),
        ("Please translate this paragraph into English.", "translation_dora"),
    ],
)
def test_clear_domain_queries_route_in_both_languages(
    router: HybridRouter, query: str, expert: str
) -> None:
    assert router.route(query, vram_gb=8)[0][0] == expert


def test_topic_outranks_language_but_language_follows(router: HybridRouter) -> None:
    decision = router.route_decision("Wie behandelt man eine Migräne mit Medikamenten?", 24.0)
    ids = [e for e, _ in decision.experts]
    assert ids[0] == "medical_dora" and "german_dora" in ids


def test_foreign_query_without_a_topic_goes_to_its_language_expert(router: HybridRouter) -> None:
    assert router.route("¿Qué me recomiendas hacer esta tarde?", 8.0)[0][0] == "spanish_dora"


def test_small_talk_falls_back_to_the_general_expert(router: HybridRouter) -> None:
    assert router.route("Hello there, how are you?", 8.0) == [("general_dora", 1.0)]


def test_fast_path_never_loads_the_sentence_model() -> None:
    fresh = HybridRouter(semantic=SemanticRouter())
    fresh.route("Python'da for loop nasıl yazılır?", 8.0)
    assert not fresh.semantic.loaded


def test_restricted_router_only_returns_installed_experts(router: HybridRouter) -> None:
    installed = ["coding_dora", "turkish_dora"]
    restricted = HybridRouter(expert_ids=installed, semantic=None)
    restricted.semantic = SemanticRouter(restricted.registry)
    for query in ("Diyabet hastalarında insülin direnci", "Python'da liste sıralama"):
        for expert, _ in restricted.route(query, 24.0):
            assert expert in {*installed, "general_dora"}


def test_fusion_weights_are_configurable(router: HybridRouter) -> None:
    keyword_only = HybridRouter(
        config=HybridConfig(keyword_weight=1.0, semantic_weight=0.0, adaptive_weighting=False,
                            calibrated=False),
        semantic=router.semantic,
    )
    # With the semantic weight at zero only keyword evidence counts: a query with no
    # keyword at all has nothing to go on and falls back.
    decision = keyword_only.route_decision("What is the tallest mountain in Africa?", 24.0)
    assert not decision.fast_path
    assert decision.experts == [("general_dora", 1.0)]


@pytest.mark.parametrize("query", ["", "   ", "\n\t  \n"])
def test_empty_or_whitespace_query_is_refused(router: HybridRouter, query: str) -> None:
    with pytest.raises(EmptyQueryError, match="empty"):
        router.route(query)


def test_non_string_query_is_refused(router: HybridRouter) -> None:
    with pytest.raises(TypeError, match="query must be str"):
        router.route(None)  # type: ignore[arg-type]


def test_huge_query_routes_on_its_head(router: HybridRouter) -> None:
    query = "Diyabet ve insülin tedavisi hakkında. " + "lorem ipsum " * 90_000  # ~1 MB
    assert len(query) > 1_000_000
    decision = router.route_decision(query, 8.0)
    assert decision.truncated
    assert decision.experts[0][0] == "medical_dora"


def test_100_kb_query_without_keywords_still_gets_a_valid_decision(router: HybridRouter) -> None:
    decision = router.route_decision("blah " * 20_000, 24.0)
    assert decision.truncated
    assert math.isclose(sum(w for _, w in decision.experts), 1.0)


def test_invalid_utf8_bytes_are_replaced_not_fatal(router: HybridRouter) -> None:
    query = b"Python \xff\xfe\x80 for loop nasil yazilir".decode("utf-8", "surrogateescape")
    assert router.route(query, 8.0)[0][0] == "coding_dora"


def test_binary_garbage_gets_a_defined_answer(router: HybridRouter) -> None:
    garbage = bytes(range(256)).decode("latin-1")
    experts = router.route(garbage, 8.0)
    assert math.isclose(sum(w for _, w in experts), 1.0)


def test_stats_count_routes_and_fast_path() -> None:
    fresh = HybridRouter(semantic=SemanticRouter())
    fresh.route("Python'da for loop nasıl yazılır?", 8.0)
    fresh.route("DİYABET HASTALARINDA İNSÜLİN TEDAVİSİ", 8.0)
    stats = fresh.stats.to_dict()
    assert stats["routes"] == 2 and stats["fast_path_rate"] == 1.0
    assert stats["top_expert_counts"] == {"coding_dora": 1, "medical_dora": 1}
    assert set(stats["mean_stage_ms"]) == {"keyword", "gating"}


def test_unknown_strategy_is_refused(router: HybridRouter) -> None:
    with pytest.raises(ValueError, match="strategy must be one of"):
        router.route_decision("hello", strategy="magic")  # type: ignore[arg-type]
