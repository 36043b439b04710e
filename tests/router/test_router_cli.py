"""``r3mes route`` and ``r3mes experts`` through the real argument parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r3mes.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_route_json_reports_experts_weights_and_fast_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(
        capsys, "route", "Python'da for loop nasıl yazılır?", "--json", "--vram-gb", "24",
        "--home", str(tmp_path),
    )
    data = json.loads(out)
    assert code == 0
    assert data["experts"][0]["id"] == "coding_dora"
    assert sum(e["weight"] for e in data["experts"]) == pytest.approx(1.0)
    assert data["fast_path"] is True and data["strategy"] == "hybrid"
    assert set(data["timings_ms"]) == {"keyword", "gating"}
    for key in ("scores", "keyword_confidence", "language", "fallback_used", "top_k", "vram_gb",
                "truncated", "total_ms", "query_chars"):
        assert key in data


def test_route_text_output_names_the_expert(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "route", "Diyabet hastalarında insülin direnci", "--vram-gb", "8")
    assert code == 0 and "medical_dora" in out and "fast path" in out


def test_route_keyword_strategy_and_top_k(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "route", "Bunu Almancaya çevirir misin?", "--strategy", "keyword",
        "--top-k", "3", "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["strategy"] == "keyword" and data["top_k"] == 3
    assert [e["id"] for e in data["experts"]][:2] == ["translation_dora", "german_dora"]


def test_route_empty_query_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "route", "   ")
    assert code == 2 and "empty" in err


def test_route_unknown_installed_expert_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "route", "hello", "--experts", "medical_dora,ghost_dora")
    assert code == 2 and "ghost_dora" in err


def test_route_bad_registry_is_a_clear_error_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: {", encoding="utf-8")
    code, _, err = run(capsys, "route", "hello", "--registry", str(bad))
    assert code == 2 and "bad.yaml" in err


def test_experts_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "experts", "list", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["experts"]) == 19 and len(data["digest"]) == 64
    turkish = next(e for e in data["experts"] if e["id"] == "turkish_dora")
    assert turkish["kind"] == "language" and turkish["language"] == "tr"


def test_experts_embed_writes_the_pair_to_home(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, small_registry_file: Path
) -> None:
    code, out, _ = run(
        capsys, "experts", "embed", "--registry", str(small_registry_file),
        "--home", str(tmp_path), "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["rows"] == 6 and data["dim"] == 384
    assert Path(data["npy"]).parent == tmp_path / "router"
    assert np.load(data["npy"], allow_pickle=False).shape == (6, 384)
