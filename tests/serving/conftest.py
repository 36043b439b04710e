"""Fixtures for the serving tests: one tiny real model, experts and knowledge base per
session, a pipeline factory, and a real uvicorn server on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_assets  # noqa: E402
from serving_support import LiveServer, server_settings  # noqa: E402, F401


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``model`` (HF float BitNet dir), ``experts`` (PEFT DoRA dirs), ``home`` (a data
    directory with the knowledge base indexed)."""
    root = tmp_path_factory.mktemp("serving")
    model = tiny_assets.write_model(root / "model")
    experts = tiny_assets.write_experts(root / "experts")
    home = root / "home"
    from r3mes.rag import Document, RagStore

    store = RagStore(home)
    for index, docs in tiny_assets.DOCUMENTS.items():
        store.index(index).add_documents(Document(d, t, m) for d, t, m in docs)
        store.save(index)
    return {"model": model, "experts": experts, "home": home, "root": root}


@pytest.fixture
def pipeline_factory(assets):
    """``make(**config_fields)`` -> an :class:`InferencePipeline` on the tiny assets."""
    from r3mes.serving import create_pipeline

    def make(**overrides):
        fields = {"home": str(assets["home"]), "model_path": str(assets["model"]),
                  "experts_dir": str(assets["experts"]), "max_new_tokens": 12,
                  # greedy: the tests compare outputs across runs and code paths
                  "temperature": 0.0, "repetition_penalty": 1.0}
        fields.update(overrides)
        return create_pipeline(**fields)

    return make


@pytest.fixture(scope="session")
def live_server(assets):
    from r3mes.serving.inference_pipeline import PipelineConfig
    from r3mes.serving.server import create_app

    settings = server_settings(assets)
    app = create_app(settings=settings,
                     pipeline_config=PipelineConfig.from_settings(settings,
                                                                  home=str(assets["home"])))
    with LiveServer(app) as server:
        yield server
