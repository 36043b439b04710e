"""The inference pipeline end to end on a tiny real BitNet model, real experts, real RAG."""

from __future__ import annotations

import asyncio
import re

import pytest
from serving_support import CODING_EN, MEDICAL_TR

from r3mes.serving import ModelNotFoundError, PipelineConfig, create_pipeline
from r3mes.serving.inference_pipeline import assets_dir, resolve_model_path


@pytest.fixture
async def pipeline(pipeline_factory):
    pipe = pipeline_factory()
    await pipe.initialize()
    await pipe.load_model()
    yield pipe
    await pipe.close()


async def test_turkish_medical_question_at_8gb_uses_the_medical_expert_alone(pipeline):
    result = await pipeline.run(MEDICAL_TR, vram_gb=8)
    assert result.success, result.error
    assert result.experts_used == [("medical_dora", 1.0)]
    m = result.metrics
    assert m.used_fast_path and m.keyword_confidence >= 0.85
    assert m.adapters_loaded == ["medical_dora"]
    assert m.tokens_generated == len(result.tokens) > 0
    assert m.backend_used and m.inference_time_ms > 0 and m.total_time_ms >= m.inference_time_ms
    assert m.rag_docs_retrieved == len(result.sources) > 0
    assert m.rag_context_length == len(result.rag_context)
    assert result.sources[0]["doc_id"] == "med_metformin"
    assert "metformin" in result.rag_context


async def test_english_coding_question_at_24gb_blends_coding_with_general(pipeline):
    result = await pipeline.run(CODING_EN, vram_gb=24)
    assert result.success, result.error
    ids = [e for e, _ in result.experts_used]
    assert ids == ["coding_dora", "general_dora"]
    weights = [w for _, w in result.experts_used]
    assert weights[0] > weights[1] > 0 and abs(sum(weights) - 1.0) < 1e-9
    assert result.sources[0]["doc_id"] == "code_bst"


async def test_forced_experts_skip_routing(pipeline):
    result = await pipeline.run(MEDICAL_TR, force_experts=["coding_dora", "legal_dora"])
    assert result.success, result.error
    assert result.experts_used == [("coding_dora", 0.5), ("legal_dora", 0.5)]
    assert result.routing is None and result.metrics.routing_time_ms == 0.0
    assert sorted(result.metrics.adapters_loaded) == ["coding_dora", "legal_dora"]


async def test_forcing_an_unknown_expert_fails_the_query_not_the_pipeline(pipeline):
    result = await pipeline.run("hello", force_experts=["nonexistent_dora"])
    assert not result.success and result.error_type == "unknown_expert"
    assert "nonexistent_dora" in result.error
    assert (await pipeline.run("hello", force_experts=["general_dora"])).success


async def test_experts_change_the_answer(pipeline):
    base = await pipeline.run(MEDICAL_TR, force_experts=[], skip_rag=True)
    medical = await pipeline.run(MEDICAL_TR, force_experts=["medical_dora"], skip_rag=True)
    assert base.success and medical.success
    assert base.experts_used == [] and base.metrics.adapters_loaded == []
    assert base.tokens != medical.tokens


async def test_skip_rag_retrieves_nothing(pipeline):
    result = await pipeline.run(MEDICAL_TR, skip_rag=True)
    assert result.success
    assert result.sources == [] and result.rag_context is None
    assert result.metrics.rag_time_ms == 0.0 and result.metrics.rag_docs_retrieved == 0
    assert "Sources:" not in result.output


async def test_streaming_yields_exactly_the_non_streaming_answer(pipeline):
    complete = await pipeline.run(CODING_EN, vram_gb=24)
    holder = []
    pieces = [p async for p in pipeline.run_streaming(CODING_EN, vram_gb=24,
                                                      result_holder=holder)]
    assert len(pieces) > 1
    assert "".join(pieces) == complete.output
    assert holder[0].tokens == complete.tokens


async def test_batch_answers_match_single_runs_in_order(pipeline):
    queries = [MEDICAL_TR, CODING_EN, "The court ruled that the contract was void.", "merhaba"]
    singles = [await pipeline.run(q, skip_rag=True, force_experts=["general_dora"])
               for q in queries]
    before = pipeline.get_stats()["pipeline"]
    batch = await pipeline.run_batch(queries, force_experts=["general_dora"], skip_rag=True)
    after = pipeline.get_stats()["pipeline"]
    assert [r.query for r in batch] == queries
    assert [r.tokens for r in batch] == [r.tokens for r in singles]
    assert after["batched_jobs"] - before["batched_jobs"] == len(queries)
    # The queued jobs decode together (continuous batching).
    assert max(r.metrics.batch_size for r in batch) > 1


async def test_stats_report_router_cache_and_pipeline(pipeline):
    await pipeline.run(MEDICAL_TR, vram_gb=8)
    await pipeline.run("Bu konuyu açıklar mısın?", vram_gb=8)
    stats = pipeline.get_stats()
    assert stats["router"]["routes"] == 2 and stats["router"]["fast_path_rate"] == 0.5
    assert stats["cache"]["tier1"]["entries"] >= 1
    assert 0 <= stats["cache"]["tier1"]["utilisation"] <= 1
    assert stats["pipeline"]["requests"] == 2 and stats["pipeline"]["failures"] == 0
    assert stats["rag"]["indices"]["medical"] == 2
    assert "medical_dora" in stats["experts"]["installed"]


async def test_stop_string_ends_the_answer(pipeline):
    free = await pipeline.run("merhaba", skip_rag=True, max_new_tokens=12)
    text = free.output
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    stopped = await pipeline.run("merhaba", skip_rag=True, max_new_tokens=12, stop=[stop])
    assert stopped.success and stop not in stopped.output
    assert text.startswith(stopped.output)


async def test_bad_requests_fail_cleanly(pipeline):
    empty = await pipeline.run("   ")
    assert not empty.success and empty.error_type == "invalid_request"
    huge = await pipeline.run("x" * (pipeline.config.max_query_chars + 1))
    assert not huge.success and "limit" in huge.error
    bad = await pipeline.run("hello", temperature=-1)
    assert not bad.success and bad.error_type == "invalid_request"
    with pytest.raises(Exception, match="empty"):
        [p async for p in pipeline.run_streaming("")]
    assert (await pipeline.run("hello", skip_rag=True)).success


async def test_added_document_is_retrieved_and_cited(pipeline_factory, tmp_path):
    pipe = pipeline_factory(home=str(tmp_path / "home"), rag_top_k=2)
    try:
        info = pipe.add_rag_document("zebra_1", "Zebras sleep standing up in the savanna.",
                                     {"domain": "general", "title": "Zebra sleep"})
        assert info["index"] == "general" and info["chunks"] == 1
        result = await pipe.run("Do zebras sleep standing up?", force_experts=[])
        assert result.success, result.error
        assert result.sources[0]["doc_id"] == "zebra_1"
        assert "Sources:\n[1] Zebra sleep" in result.output
    finally:
        await pipe.close()


async def test_safety_filter_masks_configured_terms(pipeline_factory):
    probe = pipeline_factory(max_new_tokens=16)
    try:
        text = (await probe.run("merhaba", skip_rag=True)).output
    finally:
        await probe.close()
    words = re.findall(r"(?<!\w)\w{2,}(?!\w)", text)
    if not words:
        pytest.skip("the random model produced no whole word to block")
    pipe = pipeline_factory(max_new_tokens=16, blocked_terms=[words[0]])
    try:
        result = await pipe.run("merhaba", skip_rag=True)
    finally:
        await pipe.close()
    assert result.masked_terms
    assert not re.search(rf"(?<!\w){re.escape(words[0])}(?!\w)", result.output, re.I)
    assert "[filtered]" in result.output


async def test_small_tier1_evicts_and_unloads_adapters_from_the_backend(pipeline_factory):
    one_adapter = 0.07  # MB: each tiny expert is about 46 KB
    pipe = pipeline_factory(tier1_capacity_mb=one_adapter, preload_experts=[],
                            predictive_loading=False)
    try:
        for expert in ("medical_dora", "coding_dora", "legal_dora"):
            result = await pipe.run("merhaba", force_experts=[expert], skip_rag=True)
            assert result.success, result.error
        await pipe.run("merhaba", force_experts=[], skip_rag=True)
        assert len(pipe.backend.adapters) <= 1
        assert pipe.get_stats()["cache"]["tier1"]["evictions"] >= 2
    finally:
        await pipe.close()


async def test_concurrent_queries_all_succeed(pipeline):
    results = await asyncio.gather(*(pipeline.run(f"soru {i}", skip_rag=True)
                                     for i in range(6)))
    assert all(r.success for r in results)


def test_missing_model_path_says_what_to_pass(tmp_path):
    with pytest.raises(ModelNotFoundError, match="--model PATH") as info:
        resolve_model_path(tmp_path / "nope")
    assert "never downloads" in str(info.value)


def test_default_model_is_the_bundled_demo_or_a_helpful_error():
    demo = assets_dir() / "demo_model"
    if demo.is_dir():
        assert resolve_model_path(None) == demo
    else:
        with pytest.raises(ModelNotFoundError, match="microsoft/bitnet-b1.58-2B-4T"):
            resolve_model_path(None)


def test_pipeline_config_validates_and_maps_the_yaml():
    from r3mes.config import load_config

    with pytest.raises(ValueError, match="router_strategy"):
        PipelineConfig(router_strategy="magic")
    settings = load_config(overrides={"router.gating.vram_gb": 24, "rag.top_k": 3},
                           environ={})
    cfg = PipelineConfig.from_settings(settings)
    assert cfg.vram_capacity_mb == 24 * 1024 and cfg.rag_top_k == 3
    assert (cfg.keyword_weight, cfg.semantic_weight, cfg.fast_path_threshold) == (0.3, 0.7, 0.85)
    assert create_pipeline(enable_rag=False).config.enable_rag is False


async def test_configured_adapter_storage_and_device_reach_the_backend(pipeline_factory):
    from r3mes.config import load_config

    settings = load_config(overrides={"inference.adapter_storage": "fp32"}, environ={})
    assert PipelineConfig.from_settings(settings).adapter_storage == "fp32"
    exact = pipeline_factory(adapter_storage="fp32")
    await exact.initialize()
    await exact.load_model()
    try:
        assert exact.backend.name == "bitnet_cpp" and exact.backend.adapter_storage == "fp32"
    finally:
        await exact.close()
    with pytest.raises(ValueError, match="adapter_storage"):
        load_config(overrides={"inference.adapter_storage": "int3"}, environ={})
    from r3mes.kernels import cuda

    if not cuda.available():
        gpu = pipeline_factory(device="cuda")
        with pytest.raises(Exception, match="(?i)cuda"):
            await gpu.load_model()
        await gpu.close()
