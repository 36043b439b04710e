"""Issue 26, item 10: the command line's small edges: --version, info --home, training
arguments that cannot train, and one unit system for sizes."""

from __future__ import annotations

import json
import re

import pytest

from r3mes.cli import main


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert re.match(r"r3mes \S+", capsys.readouterr().out)


def test_info_takes_home(tmp_path, capsys):
    home = tmp_path / "elsewhere"
    assert main(["info", "--home", str(home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["home"] == str(home)


def test_train_adapter_refuses_zero_steps_and_a_pdf(tmp_path, tiny, capsys):
    text = tmp_path / "domain.txt"
    text.write_text("Insulin resistance is treated with metformin.\n\nExercise helps.",
                    encoding="utf-8")
    pdf = tmp_path / "domain.pdf"  # a PDF that happens to be ASCII: still not training text
    pdf.write_text("%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
                   encoding="ascii")
    out = tmp_path / "adapter"
    common = ["train-adapter", "--model", str(tiny["model"]), "--name", "x", "--out", str(out),
              "--json"]
    assert main([*common, "--data", str(text), "--steps", "0"]) == 2
    assert "--steps" in json.loads(capsys.readouterr().out)["error"]
    assert main([*common, "--data", str(pdf), "--steps", "1"]) == 2
    assert "unsupported file type" in json.loads(capsys.readouterr().out)["error"]
    assert not out.exists()


def test_store_sizes_are_in_binary_units_everywhere(tmp_path, tiny, capsys):
    home = str(tmp_path / "home")
    outputs = []
    for argv in (["adapters", "add", str(tiny["experts"] / "medical_dora"), "--id", "medical"],
                 ["adapters", "limit", "1"], ["adapters", "stats"], ["adapters", "list"]):
        assert main([*argv, "--home", home]) == 0
        outputs.append(capsys.readouterr().out)
    assert "size limit: 1.00 GiB" in outputs[1]
    assert "of 1.00 GiB" in outputs[2]
    assert not re.search(r"\b[kMG]B\b", "".join(outputs)), outputs
