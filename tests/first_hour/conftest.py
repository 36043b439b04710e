"""Fixtures for issue 26's tests ("a real user's first hour"): the serving tests' tiny real
model and experts, a data directory with the tiny knowledge base, and a real server on
loopback over such a directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))

import tiny_assets  # noqa: E402
from serving_support import LiveServer, server_settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``model`` (a tiny HF BitNet directory, another shape than the demo model) and
    ``experts`` (PEFT DoRA adapters that fit it)."""
    root = tmp_path_factory.mktemp("first_hour")
    return {"model": tiny_assets.write_model(root / "model"),
            "experts": tiny_assets.write_experts(root / "experts")}


def index_knowledge(home: Path) -> Path:
    """Index the tiny knowledge base (medical, code, legal) into ``home``; returns it."""
    from r3mes.rag import Document, RagStore

    store = RagStore(home)
    for index, docs in tiny_assets.DOCUMENTS.items():
        store.index(index).add_documents(Document(d, t, m) for d, t, m in docs)
        store.save(index)
    return home


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory: pytest.TempPathFactory):
    """A real r3mes server (uvicorn on 127.0.0.1) over its own data directory, ``home``."""
    from r3mes.serving.inference_pipeline import PipelineConfig
    from r3mes.serving.server import create_app

    home = index_knowledge(tmp_path_factory.mktemp("served_home"))
    settings = server_settings({"model": tiny["model"], "experts": tiny["experts"],
                                "home": home})
    app = create_app(settings=settings,
                     pipeline_config=PipelineConfig.from_settings(settings, home=str(home)))
    with LiveServer(app) as live:
        live.home = home
        yield live
