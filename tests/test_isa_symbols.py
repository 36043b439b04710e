"""SIMD variants cannot leak into baseline code, and every forced level runs the model.

The build's ISA-flagged objects define symbols in their own ``r3mes::isa_<level>``
namespace only (scripts/check_isa_symbols.py), and the whole model, loaded in a fresh
process with ``R3MES_SIMD`` set to each level this CPU runs, gives the same logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r3mes import _native

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_isa_symbols",
                                               ROOT / "scripts" / "check_isa_symbols.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

needs_nm = pytest.mark.skipif(shutil.which("nm") is None or shutil.which("g++") is None,
                              reason="binutils nm and g++ are needed")


@needs_nm
def test_built_isa_objects_define_nothing_outside_their_namespace() -> None:
    objects = check.isa_objects(sorted(p for p in (ROOT / "build").glob("*") if p.is_dir()))
    if not objects:
        pytest.skip("no build tree next to the sources (installed from a wheel)")
    leaks = {str(obj): bad for obj, level in objects
             if (bad := check.offending_symbols(obj, level))}
    assert not leaks, json.dumps(leaks, indent=1)[:4000]


@needs_nm
def test_the_check_catches_a_leaking_object(tmp_path: Path) -> None:
    leaking = tmp_path / "leak_avx2.cpp"
    leaking.write_text("#include <vector>\n"
                       "inline int helper(int x) { return x + 1; }\n"
                       "namespace r3mes { namespace isa_avx2 {\n"
                       "int use(int x) { std::vector<int> v(x); return helper(v.size()); }\n"
                       "} }\n"
                       "namespace r3mes { namespace isa_avx512 {\n"
                       "int wrong_level() { return 1; }\n} }\n")
    clean = tmp_path / "clean_avx2.cpp"
    clean.write_text("namespace r3mes { namespace isa_avx2 {\n"
                     "namespace { int helper(int x) { return x + 1; } }\n"
                     "int use(int x) { return helper(x); }\n} }\n")
    for src in (leaking, clean):
        subprocess.run(["g++", "-O0", "-c", str(src), "-o", f"{src}.o"], check=True)
    bad = check.offending_symbols(Path(f"{leaking}.o"), "avx2")
    assert any("helper(int)" in s for s in bad)          # an inline header function
    assert any("std::vector" in s for s in bad)          # a std container's members
    assert any("isa_avx512::wrong_level" in s for s in bad)  # another level's namespace
    assert not any("isa_avx2::use" in s for s in bad)
    assert check.offending_symbols(Path(f"{clean}.o"), "avx2") == []


_RUN_MODEL = """
import hashlib, json, torch
from r3mes import kernels
from r3mes.assets import ASSETS_DIR
from r3mes.core.checkpoint import load_model
from r3mes.core.generation import GenerationConfig, generate
model, _ = load_model(ASSETS_DIR / "demo_model")
prompt = [0, 17, 42, 99, 5, 250, 31, 8, 77]
logits = model(torch.tensor([prompt]))
out = generate(model, [prompt], GenerationConfig(max_new_tokens=8, stop_token_ids=()))
print(json.dumps({"level": kernels.simd_level(), "tokens": out[0].tokens,
                  "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}))
"""


def test_every_forced_simd_level_runs_the_model_to_the_same_logits() -> None:
    results = []
    for level in _native.info()["supported_simd_levels"]:
        env = dict(os.environ, R3MES_SIMD=level)
        out = subprocess.run([sys.executable, "-c", _RUN_MODEL], env=env, capture_output=True,
                             text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        assert results[-1]["level"] == level
    assert len({r["logits"] for r in results}) == 1, results
    assert len({tuple(r["tokens"]) for r in results}) == 1, results
