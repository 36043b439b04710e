"""Shared fixtures: one embedder (the real offline MiniLM) for the whole session, and a fresh
data directory per test."""

from __future__ import annotations

import pytest

from r3mes.rag import Document, RagStore
from r3mes.rag.embedder import Embedder


@pytest.fixture(scope="session")
def embedder(tmp_path_factory) -> Embedder:
    return Embedder(cache_dir=tmp_path_factory.mktemp("embedding-cache"), show_progress=False)


class Clock:
    """A settable clock for time-to-live tests (the store takes any callable)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, embedder, clock) -> RagStore:
    return RagStore(tmp_path / "home", embedder=embedder, clock=clock)


@pytest.fixture
def small_docs() -> list[Document]:
    """Four one-chunk documents on distinct topics, one in Turkish."""
    return list(SMALL_DOCS)


SMALL_DOCS = [
    Document("cats", "Cats are small domesticated felines. They purr and hunt mice at night.",
             {"topic": "animals"}),
    Document("python", "Python is a programming language. Use pip to install packages.",
             {"topic": "code"}),
    Document("bread", "To bake bread, knead flour, water, yeast and salt, then let it rise.",
             {"topic": "food"}),
    Document("istanbul", "İstanbul Boğazı iki kıtayı ayırır. Işıklı köprüler geceleri güzeldir.",
             {"topic": "travel", "lang": "tr"}),
]
