"""``r3mes.core`` never imports ``r3mes.core.backends``: the backends sit on top of the model,
DoRA and generation, not the other way round (a cycle there once ran core/dora.py ->
backends/cuda_model -> core/model -> core/dora)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import r3mes.core

CORE_MODULES = sorted(
    f"r3mes.core.{m.name}" for m in pkgutil.iter_modules(r3mes.core.__path__)
    if m.name != "backends"
)

# Imports one module in a fresh interpreter and prints the backends modules that came with it.
_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("r3mes.core.backends"))))
"""


def _backends_imported_by(module: str) -> list[str]:
    res = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_core_modules_are_all_probed() -> None:
    assert {"r3mes.core.model", "r3mes.core.dora", "r3mes.core.generation",
            "r3mes.core.checkpoint", "r3mes.core.bitlinear"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_backend(module: str) -> None:
    assert _backends_imported_by(module) == []


# The command-line layer that lives in core: `r3mes generate` and `r3mes bench` run a
# backend, inside the command (never at import time: the probe above checks that).
COMMANDS = {"r3mes.core.cli", "r3mes.core.speed_report"}


def _backend_imports_in(path: Path) -> list[str]:
    """Every import of r3mes.core.backends written in a file, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"{path.name}:{node.lineno} {n}" for n in names
                  if n.startswith("r3mes.core.backends")]
    return found


@pytest.mark.parametrize("module", sorted(set(CORE_MODULES) - COMMANDS))
def test_core_module_source_names_no_backend(module: str) -> None:
    path = Path(r3mes.core.__path__[0]) / f"{module.rsplit('.', 1)[1]}.py"
    assert _backend_imports_in(path) == []


def test_the_source_check_sees_a_lazy_import(tmp_path: Path) -> None:
    path = tmp_path / "lazy.py"
    path.write_text("def f():\n    from r3mes.core.backends.cuda_model import x\n")
    assert _backend_imports_in(path) == ["lazy.py:2 r3mes.core.backends.cuda_model"]


def test_the_probe_sees_a_backend_import() -> None:
    # The native decoder is a backend module built on the model: importing it must show up.
    assert "r3mes.core.backends.native_decode" in _backends_imported_by(
        "r3mes.core.backends.native_decode")
