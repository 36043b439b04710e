from __future__ import annotations

import json

from r3mes.cli import main


def test_convert_and_generate_json(hf_dirs, tmp_path, capsys):
    dst = tmp_path / "conv"
    assert main(["convert", str(hf_dirs["packed"]), str(dst), "--json"]) == 0
    conv = json.loads(capsys.readouterr().out)
    assert conv["format"] == "r3mes-bitnet" and len(conv["weights_sha256"]) == 64
    assert main(["generate", "--model", str(dst), "--json", "--max-tokens", "5",
                 "hello world", "the fox"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "bitnet_cpp"
    assert [len(r["tokens"]) <= 5 for r in out["results"]] == [True, True]
    assert out["results"][0]["finish_reason"] in ("eos", "length")


def test_generate_streams_text(r3mes_dir, capsys):
    assert main(["generate", "--model", str(r3mes_dir), "--max-tokens", "4", "hello"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_bad_model_dir_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--json", "hi"]) == 2
    assert "config.json" in json.loads(capsys.readouterr().out)["error"]


def test_train_adapter_writes_a_peft_dir_that_generate_loads(r3mes_dir, tmp_path, capsys):
    data = tmp_path / "domain.txt"
    data.write_text("insulin resistance is treated with diet, exercise and metformin. " * 30)
    out = tmp_path / "medical_dora"
    assert main(["train-adapter", "--model", str(r3mes_dir), "--data", str(data),
                 "--name", "medical_dora", "--out", str(out), "--steps", "4", "--rank", "4",
                 "--seq-len", "32", "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 4 and result["last_loss"] is not None
    assert (out / "adapter_config.json").is_file()
    assert main(["generate", "--model", str(r3mes_dir), "--json", "--max-tokens", "3",
                 "--adapter", f"medical_dora={out}", "insulin"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["tokens"]


def test_train_adapter_on_missing_data_is_a_clean_error(r3mes_dir, tmp_path, capsys):
    assert main(["train-adapter", "--model", str(r3mes_dir), "--data", str(tmp_path / "no.txt"),
                 "--name", "x", "--out", str(tmp_path / "x"), "--json"]) == 2
    assert "no.txt" in json.loads(capsys.readouterr().out)["error"]


def test_generate_on_a_missing_gpu_is_a_clean_error(r3mes_dir, capsys):
    import pytest

    from r3mes.kernels import cuda

    if cuda.available():
        pytest.skip("a CUDA device is present")
    assert main(["generate", "--model", str(r3mes_dir), "--device", "cuda", "--json",
                 "hi"]) == 2
    assert "cuda" in json.loads(capsys.readouterr().out)["error"].lower()
