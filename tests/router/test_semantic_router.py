"""Stage 2: max-pooled similarity and the stored expert embeddings (stale -> rebuilt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r3mes.router.registry import load_registry
from r3mes.router.semantic_router import (
    PACKAGED_DIR,
    SemanticRouter,
    embedding_paths,
    load_or_build_embeddings,
    read_embeddings,
)


def test_packaged_embeddings_match_the_packaged_registry() -> None:
    found, reason = read_embeddings(PACKAGED_DIR, load_registry())
    assert reason == "ok"
    rows = sum(len(e.queries) for e in load_registry())
    assert found is not None and found.matrix.shape == (rows, 384)


def test_packaged_npy_loads_without_pickle() -> None:
    npy, meta = embedding_paths(PACKAGED_DIR, None)
    matrix = np.load(npy, allow_pickle=False)
    assert matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    assert json.loads(meta.read_text())["rows"] == matrix.shape[0]


def test_default_router_uses_the_packaged_embeddings(router) -> None:  # noqa: ANN001
    assert router.semantic.embeddings_source == "packaged"


@pytest.mark.parametrize(
    ("query", "expert"),
    [
        ("What are the symptoms of a heart attack?", "medical_dora"),
        ("How do I sort a dictionary by value in Python?", "coding_dora"),
        ("Who was the first emperor of Rome?", "history_dora"),
        ("Write me a short story about a dragon.", "creative_dora"),
    ],
)
def test_clear_english_queries_rank_their_expert_first(router, query: str, expert: str) -> None:  # noqa: ANN001
    assert router.semantic.score(query)[0][0] == expert


def test_max_pooling_takes_the_closest_representative_query(router) -> None:  # noqa: ANN001
    semantic = router.semantic
    example = semantic.registry.get("finance_dora").queries[3]
    scores = dict(semantic.score(example))
    assert scores["finance_dora"] == pytest.approx(1.0, abs=1e-4)


def test_custom_registry_embeddings_are_built_then_cached(
    small_registry_file: Path, tmp_path: Path
) -> None:
    registry = load_registry(small_registry_file)
    _, source = load_or_build_embeddings(registry, home=tmp_path)
    assert source == "built"
    _, source = load_or_build_embeddings(registry, home=tmp_path)
    assert source == "cached"


def test_stale_embeddings_are_detected_and_rebuilt_after_a_registry_edit(
    small_registry_file: Path, tmp_path: Path
) -> None:
    load_or_build_embeddings(load_registry(small_registry_file), home=tmp_path)
    small_registry_file.write_text(
        small_registry_file.read_text(encoding="utf-8").replace(
            '"Merhaba"', '"Merhaba", "İyi günler"'
        ),
        encoding="utf-8",
    )
    edited = load_registry(small_registry_file)
    found, reason = read_embeddings(tmp_path / "router", edited)
    assert found is None and "another registry" in reason
    embeddings, source = load_or_build_embeddings(edited, home=tmp_path)
    assert source == "built" and embeddings.matrix.shape[0] == 7
    assert read_embeddings(tmp_path / "router", edited)[1] == "ok"


def test_corrupted_npy_is_detected_by_checksum_and_rebuilt(
    small_registry_file: Path, tmp_path: Path
) -> None:
    registry = load_registry(small_registry_file)
    load_or_build_embeddings(registry, home=tmp_path)
    npy, _ = embedding_paths(tmp_path / "router", None)
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    assert "checksum" in read_embeddings(tmp_path / "router", registry)[1]
    assert load_or_build_embeddings(registry, home=tmp_path)[1] == "built"


def test_pickled_npy_is_never_loaded(small_registry_file: Path, tmp_path: Path) -> None:
    registry = load_registry(small_registry_file)
    load_or_build_embeddings(registry, home=tmp_path)
    npy, meta = embedding_paths(tmp_path / "router", None)
    np.save(npy, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    info = json.loads(meta.read_text())
    import hashlib

    info["npy_sha256"] = hashlib.sha256(npy.read_bytes()).hexdigest()
    meta.write_text(json.dumps(info))
    found, reason = read_embeddings(tmp_path / "router", registry)
    assert found is None and "not a valid .npy" in reason


def test_restricted_semantic_router_scores_only_its_experts(small_registry_file: Path) -> None:
    semantic = SemanticRouter(small_registry_file, expert_ids=["sports_dora"])
    scores = dict(semantic.score("Which team won the football league?"))
    assert set(scores) == {"sports_dora", "general_dora"}
    assert scores["sports_dora"] > scores["general_dora"]


def test_unknown_model_name_is_refused_without_downloading(small_registry_file: Path) -> None:
    semantic = SemanticRouter(small_registry_file, model_name="no/such-model")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        semantic.load()
