"""`r3mes info`: the installed console script reports the build and the machine."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from visible_gpus import expected_cuda_devices


def test_info_json_reports_kernels_and_cpu() -> None:
    exe = shutil.which("r3mes")
    assert exe, "the r3mes console script is not installed"
    out = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["native"] is True
    assert "scalar" in data["compiled_simd_levels"]
    assert data["simd_level"] in data["supported_simd_levels"]
    assert data["num_threads"] >= 1
    assert set(data["cuda"]) == {"compiled", "architectures", "device_count", "available"}
    assert isinstance(data["cpu_features"]["avx2"], bool)


def test_info_text_names_each_part() -> None:
    out = subprocess.run(["r3mes", "info"], capture_output=True, text=True, check=True)
    for label in ("native module", "compiled SIMD", "CPU features", "threads", "CUDA module"):
        assert label in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: the CUDA module is not built")
def test_cuda_module_is_built_when_nvcc_is_present() -> None:
    from r3mes import _native_cuda

    count = _native_cuda.device_count()
    assert isinstance(count, int) and count >= 0
    expected = expected_cuda_devices()
    if expected is not None:
        assert count == expected
    out = subprocess.run(["r3mes", "info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["cuda"]["device_count"] == count


def test_bench_reports_each_shape_and_token_count() -> None:
    out = subprocess.run(["r3mes", "bench", "--json", "--shape", "64x300", "--tokens", "1",
                          "--tokens", "5", "--seconds", "0.01"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert [(r["shape"], r["tokens"]) for r in data["results"]] == [("64x300", 1), ("64x300", 5)]
    assert all(r["r3mes_us"] > 0 and r["torch_fp32_us"] > 0 for r in data["results"])
    assert data["read_bandwidth_gb_s"] > 0


def test_bench_rejects_a_malformed_shape() -> None:
    out = subprocess.run(["r3mes", "bench", "--json", "--shape", "64by300"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "OUTxIN" in json.loads(out.stdout)["error"]


def test_info_describes_a_model_directory() -> None:
    from r3mes.assets import ASSETS_DIR

    demo = ASSETS_DIR / "demo_model"
    out = subprocess.run(["r3mes", "info", "--json", "--model", str(demo)],
                         capture_output=True, text=True, check=True)
    model = json.loads(out.stdout)["model"]
    assert model["format"] == "r3mes" and model["head"] == "int8-rowwise"
    assert model["bytes_per_token"] == model["ternary_bytes"] + model["head_bytes"] > 0
    text = subprocess.run(["r3mes", "info", "--model", str(demo)],
                          capture_output=True, text=True, check=True).stdout
    assert "LM head:          int8-rowwise" in text and "read per token" in text
    bad = subprocess.run(["r3mes", "info", "--model", "/nonexistent/model"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "/nonexistent/model" in bad.stderr
