"""``r3mes bench --model``: the speed report on real model directories (tiny token counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import r3mes
from r3mes import kernels
from r3mes.cli import main

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native module not built")

DEMO = Path(r3mes.__file__).parent / "assets" / "demo_model"
TINY = ["--prompt-tokens", "8", "--gen-tokens", "3", "--warmup-tokens", "1"]


def _bench_json(capsys, *args: str) -> dict:
    assert main(["bench", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_case_is_measured_on_the_demo_model(capsys):
    data = _bench_json(capsys, "--model", str(DEMO), "--threads", "1,2", "--experts", "0,2",
                       "-r", "2", *TINY)
    cases = [(r["threads"], r["experts"], r["test"]) for r in data["results"]]
    assert cases == [(t, k, test) for t in (1, 2) for k in (0, 2) for test in ("pp8", "tg3")]
    for r in data["results"]:
        assert len(r["samples_tok_s"]) == 2 and min(r["samples_tok_s"]) > 0
        assert r["tok_s_mean"] > 0 and r["tok_s_stdev"] >= 0 and r["ms_per_token"] > 0
        assert r["kind"] == r["test"][:2] and r["tokens"] == int(r["test"][2:])


def test_report_describes_model_cpu_and_settings(capsys):
    data = _bench_json(capsys, "--model", str(DEMO), "--experts", "0,1", "-r", "1", *TINY)
    m = data["model"]
    assert m["format"] == "r3mes" and m["head"] == "int8-rowwise" and m["head_kind"] == "int8"
    assert m["layers"] == 4 and m["hidden_size"] == 256 and m["vocab_size"] == 8192
    assert m["parameters"]["total"] == sum(v for k, v in m["parameters"].items()
                                           if k != "total") > 0
    w = m["weight_bytes"]
    assert m["bytes_per_token"] == w["ternary"] + w["lm_head"] > 0
    assert m["adapter_bytes_per_token"]["0"] == 0 < m["adapter_bytes_per_token"]["1"]
    assert data["cpu"]["simd_level"] == kernels.info()["simd_level"]
    assert data["cpu"]["cores"] >= 1
    s = data["settings"]
    assert s["backend"] == "bitnet_cpp" and s["adapters"] == "random rank 16"
    assert (s["prompt_tokens"], s["gen_tokens"], s["warmup_tokens"], s["repetitions"]) == (
        8, 3, 1, 1)
    assert s["threads"] == [kernels.get_num_threads()]  # default: all cores


def test_peft_adapters_are_mixed_when_given(capsys, write_random_adapters):
    dirs = write_random_adapters(DEMO, b_std=0.01)
    data = _bench_json(capsys, "--model", str(DEMO), "--experts", "2", "-r", "1",
                       "--adapters", str(dirs["alpha"]), str(dirs["beta"]), *TINY)
    assert data["settings"]["adapters"] == [str(dirs["alpha"]), str(dirs["beta"])]
    assert data["settings"]["adapter_storage"] == "int8"
    # Rank 4 on the 7 projections of 4 layers, one byte an element (int8): in + out summed
    # over q, k, v, o (256, 128, 128, 256 out of 256 in) and gate, up, down (256 <-> 768).
    per_layer = (512 + 384 + 384 + 512) + 3 * 1024
    assert data["model"]["adapter_bytes_per_token"]["2"] == 2 * 4 * 4 * per_layer


def test_an_hf_directory_runs_with_the_head_asked_for(capsys, hf_dirs):
    data = _bench_json(capsys, "--model", str(hf_dirs["packed"]), "--head", "float",
                       "-r", "1", *TINY)
    assert data["model"]["format"].startswith("hf") and data["model"]["head_kind"] == "float"
    assert all(r["tok_s_mean"] > 0 for r in data["results"])


def test_text_output_is_a_table(capsys):
    assert main(["bench", "--model", str(DEMO), "-r", "1", "--threads", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "head int8-rowwise" in out and "| threads | experts | test |" in out
    assert "| 1 | 0 | pp8 |" in out and "| 1 | 0 | tg3 |" in out


def _error(capsys, *args: str) -> str:
    assert main(["bench", "--json", *args]) == 2
    return json.loads(capsys.readouterr().out)["error"]


def test_a_missing_model_directory_is_a_clean_error(capsys, tmp_path):
    assert "not a directory" in _error(capsys, "--model", str(tmp_path / "nope"))


def test_a_malformed_model_directory_is_a_clean_error(capsys, tmp_path):
    (tmp_path / "r3mes_model.json").write_text("{not json")
    assert "r3mes_model.json" in _error(capsys, "--model", str(tmp_path))


def test_a_directory_without_a_model_is_a_clean_error(capsys, tmp_path):
    assert "config.json" in _error(capsys, "--model", str(tmp_path))


def test_more_experts_than_adapters_is_refused(capsys, write_random_adapters):
    dirs = write_random_adapters(DEMO, b_std=0.01)
    msg = _error(capsys, "--model", str(DEMO), "--experts", "3", "--adapters",
                 str(dirs["alpha"]), *TINY)
    assert "3 experts" in msg and "1 adapters" in msg


@pytest.mark.parametrize("flag,value", [("--gen-tokens", "-1"), ("--repetitions", "0"),
                                        ("--prompt-tokens", "-1"), ("--threads", "0")])
def test_non_positive_counts_are_refused(capsys, flag, value):
    assert flag.lstrip("-").replace("-", "_") in _error(capsys, "--model", str(DEMO),
                                                        flag, value)


def test_a_zero_count_leaves_its_test_out(capsys):
    data = _bench_json(capsys, "--model", str(DEMO), "-r", "1", *TINY, "--prompt-tokens", "0")
    assert [r["test"] for r in data["results"]] == ["tg3"]
    assert "nothing to measure" in _error(capsys, "--model", str(DEMO), "--prompt-tokens", "0",
                                          "--gen-tokens", "0")


def test_model_options_without_a_model_are_refused(capsys):
    assert "only with --model" in _error(capsys, "--experts", "1")
