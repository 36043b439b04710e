"""Fixtures: small but real PEFT DoRA adapter directories, and a store in a temporary home."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dora_adapter_factory import write_adapter

from r3mes.cache.adapter_store import AdapterStore


@pytest.fixture
def adapter_factory(tmp_path: Path) -> Callable[..., Path]:
    """``adapter_factory(name, **write_adapter_kwargs) -> Path`` under a scratch directory."""
    counter = iter(range(10_000))

    def make(name: str | None = None, **kwargs) -> Path:
        index = next(counter)
        kwargs.setdefault("seed", index)
        return write_adapter(tmp_path / "src" / (name or f"adapter{index}"), **kwargs)

    return make


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(home: Path) -> AdapterStore:
    return AdapterStore(home)
