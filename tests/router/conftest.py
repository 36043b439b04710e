"""Shared fixtures: one router (and so one sentence model) for the whole test session."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from r3mes.router.hybrid_router import HybridRouter


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data directory; the user's ~/.r3mes is never touched."""
    home = tmp_path / "r3mes-home"
    monkeypatch.setenv("R3MES_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def router(tmp_path_factory: pytest.TempPathFactory) -> HybridRouter:
    """The default router over all 19 experts, sentence model loaded once."""
    home = tmp_path_factory.mktemp("router-home")
    return HybridRouter(home=home).warm_up(semantic=True)


SMALL_REGISTRY = textwrap.dedent(
    """\
    version: 1
    experts:
      - id: cooking_dora
        kind: domain
        description: Cooking.
        strong: [recipe, tarif]
        queries: ["How do I bake bread?", "Kek tarifi verir misin?"]
      - id: sports_dora
        kind: domain
        description: Sports.
        strong: [football, futbol]
        queries: ["Who won the football match?", "Maç kaç kaç bitti?"]
      - id: general_dora
        kind: fallback
        description: Anything else.
        queries: ["Hello there", "Merhaba"]
    """
)


@pytest.fixture
def small_registry_file(tmp_path: Path) -> Path:
    """A valid three-expert registry file in a temporary directory."""
    path = tmp_path / "experts.yaml"
    path.write_text(SMALL_REGISTRY, encoding="utf-8")
    return path
