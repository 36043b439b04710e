"""Issue 26, items 5 and 6: a flipped adapter byte is refused, not used; a damaged expert or
index is skipped with a warning in the result and the rest answers."""

from __future__ import annotations

import json

from conftest import index_knowledge
from test_first_hour_experts import MEDICAL_TR, flip_byte_in_tensors

from r3mes.cache import AdapterStore
from r3mes.cli import main
from r3mes.serving.inference_pipeline import InferencePipeline, PipelineConfig


def _config(home, tiny, **fields) -> PipelineConfig:
    return PipelineConfig(home=str(home), model_path=str(tiny["model"]), max_new_tokens=2,
                          temperature=0.0, router_strategy="keyword", **fields)


def _add(home, tiny, *ids: str) -> AdapterStore:
    for expert in ids:
        assert main(["adapters", "add", str(tiny["experts"] / expert), "--id", expert,
                     "--home", str(home)]) == 0
    return AdapterStore(home)


async def test_a_flipped_adapter_weight_is_refused_not_used(tmp_path, tiny, capsys):
    store = _add(tmp_path, tiny, "medical_dora")
    flip_byte_in_tensors(store.path("medical_dora") / "adapter_model.safetensors")
    capsys.readouterr()
    assert main(["adapters", "verify", "--home", str(tmp_path), "--json"]) == 1
    assert not json.loads(capsys.readouterr().out)["ok"]

    pipeline = InferencePipeline(_config(tmp_path, tiny, enable_rag=False))
    try:
        result = await pipeline.run(MEDICAL_TR, force_experts=["medical_dora"])
    finally:
        await pipeline.close()
    assert result.success, result.error
    assert result.metrics.adapters_loaded == []
    assert any("medical_dora" in w and "sha256" in w for w in result.warnings), result.warnings


async def test_a_broken_expert_and_a_corrupt_index_are_skipped_the_rest_answers(tmp_path, tiny):
    home = index_knowledge(tmp_path / "home")
    store = _add(home, tiny, "medical_dora", "coding_dora")
    # A corrupt index before start (as a fresh `r3mes ask` finds it) ...
    from r3mes.rag import RagStore

    rag = RagStore(home)
    current = json.loads((rag.root / "refs" / "medical.json").read_text())["current"]
    chunks = rag.snapshots_dir / current / "chunks.jsonl"
    chunks.write_bytes(chunks.read_bytes().replace(b"metformin", b"metfXrmin"))

    pipeline = InferencePipeline(_config(home, tiny, rag_top_k=5))
    try:
        await pipeline.load_model()
        # ... and an expert truncated while the server runs.
        weights = store.path("medical_dora") / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        result = await pipeline.run(MEDICAL_TR, force_experts=["medical_dora", "coding_dora"])
        again = await pipeline.run(MEDICAL_TR, force_experts=["medical_dora", "coding_dora"])
    finally:
        await pipeline.close()
    assert result.success, result.error
    assert result.metrics.adapters_loaded == ["coding_dora"]
    assert [e for e, _ in result.experts_used] == ["coding_dora"]
    assert any(w.startswith("index medical skipped") for w in result.warnings), result.warnings
    assert any(w.startswith("expert medical_dora skipped") for w in result.warnings)
    assert result.sources and all(s["index"] != "medical" for s in result.sources)
    assert again.success and any("medical_dora" in w for w in again.warnings)

    # A new process finds the truncated expert at start and leaves it out of routing.
    fresh = InferencePipeline(_config(home, tiny, enable_rag=False))
    await fresh.initialize()
    await fresh.close()
    assert "medical_dora" in fresh.skipped_experts
    assert fresh.installed_experts == ["coding_dora"]
