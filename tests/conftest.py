"""Shared test fixtures: an isolated data directory for every test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_r3mes_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests never touch the user's ~/.r3mes.
    os.environ["R3MES_HOME"] = str(tmp_path_factory.mktemp("r3mes_home"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
