"""``r3mes ask / chat / config show`` through the real entry point, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from serving_support import MEDICAL_TR

from r3mes.cli import main


def r3mes(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
          timeout: int = 180) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([sys.executable, "-m", "r3mes.cli", *args], capture_output=True,
                          text=True, env=full_env, input=stdin, timeout=timeout)


def test_ask_json_reports_experts_sources_and_timings(assets):
    out = r3mes("ask", MEDICAL_TR, "--json", "--model", str(assets["model"]),
                "--home", str(assets["home"]), "--vram-gb", "8", "--max-tokens", "6",
                env={"R3MES_MODEL__EXPERTS_DIR": str(assets["experts"])})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["success"] and data["experts_used"] == [{"id": "medical_dora", "weight": 1.0}]
    assert data["fast_path"] is True
    assert data["sources"][0]["doc_id"] == "med_metformin"
    assert data["metrics"]["tokens_generated"] <= 6
    assert {"routing_time_ms", "rag_time_ms", "loading_time_ms", "inference_time_ms"} <= set(
        data["metrics"])


def test_ask_streams_the_answer_then_the_summary(assets):
    out = r3mes("ask", "Python'da for loop nasıl yazılır?", "--model", str(assets["model"]),
                "--home", str(assets["home"]), "--no-rag", "--force-experts", "coding_dora",
                "--max-tokens", "5",
                env={"R3MES_MODEL__EXPERTS_DIR": str(assets["experts"]),
                     "R3MES_ROUTER__STRATEGY": "keyword"})
    assert out.returncode == 0, out.stderr
    assert "experts:   coding_dora (1.00)" in out.stdout
    assert "routing:   forced" in out.stdout and "sources:   none" in out.stdout
    assert "timings:" in out.stdout


def test_ask_without_a_model_says_what_to_pass(tmp_path, capsys):
    code = main(["ask", "hello", "--home", str(tmp_path), "--model", str(tmp_path / "none")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--model PATH" in err and "Traceback" not in err


def test_unknown_forced_expert_is_an_error_not_a_crash(assets, capsys, monkeypatch):
    monkeypatch.setenv("R3MES_ROUTER__STRATEGY", "keyword")
    code = main(["ask", "hello", "--json", "--model", str(assets["model"]), "--home",
                 str(assets["home"]), "--no-rag", "--force-experts", "wizard_dora"])
    assert code == 2
    assert json.loads(capsys.readouterr().out)["error_type"] == "unknown_expert"


def test_chat_keeps_history_and_answers_each_line(assets):
    out = r3mes("chat", "--json", "--model", str(assets["model"]), "--home",
                str(assets["home"]), "--no-rag", "--max-tokens", "3",
                env={"R3MES_ROUTER__STRATEGY": "keyword"},
                stdin="merhaba\n\nnasılsın?\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [a["query"] for a in answers] == ["merhaba", "nasılsın?"]
    assert all(a["success"] for a in answers)
    assert answers[1]["metrics"]["prompt_tokens"] > answers[0]["metrics"]["prompt_tokens"]


def test_config_show_prints_the_effective_config_and_its_sources(tmp_path):
    out = r3mes("config", "show", "--json", "--home", str(tmp_path),
                env={"R3MES_ROUTER__HYBRID__FAST_PATH_THRESHOLD": "0.9",
                     "R3MES_API_KEY": "hidden-key"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["config"]["router"]["hybrid"]["fast_path_threshold"] == 0.9
    assert data["config"]["server"]["api_key"] == "***" and "hidden-key" not in out.stdout
    assert "R3MES_ROUTER__HYBRID__FAST_PATH_THRESHOLD" in data["sources"]["environment"]
    bad = r3mes("config", "show", "--home", str(tmp_path), env={"R3MES_RAG__TOP_K": "many"})
    assert bad.returncode == 2 and "R3MES_RAG__TOP_K" in bad.stderr


def test_config_show_prints_yaml(tmp_path, capsys):
    assert main(["config", "show", "--home", str(tmp_path)]) == 0
    assert "fast_path_threshold: 0.85" in capsys.readouterr().out
