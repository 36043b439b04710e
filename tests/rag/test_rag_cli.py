"""``r3mes rag ...`` end to end, in process, on a temporary data directory."""

from __future__ import annotations

import json

import pytest

from r3mes.cli import main


@pytest.fixture
def files(tmp_path):
    (tmp_path / "guide.md").write_text(
        "# Baking\n\nKnead flour, water and yeast, then bake the bread.\n\n"
        "# Git\n\nUse git commit to record changes.\n", encoding="utf-8")
    (tmp_path / "news.jsonl").write_text(
        json.dumps({"id": "n1", "text": "The storm reached the coast.", "lang": "en"}) + "\n",
        encoding="utf-8")
    return tmp_path


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_add_search_list_snapshot_restore_purge(files, tmp_path, capsys):
    home = str(tmp_path / "home")
    added = _json(capsys, ["rag", "add", str(files / "guide.md"), "--home", home, "--json"])
    assert (added["index"], added["documents"], added["chunks"]) == ("general", 1, 2)
    first = added["snapshot"]["digest"]

    news = _json(capsys, ["rag", "add", str(files / "news.jsonl"), "--index", "news",
                          "--home", home, "--json"])
    assert news["snapshot"]["chunks"] == 1 and news["expired"] == []

    found = _json(capsys, ["rag", "search", "bake bread", "--home", home, "--json",
                           "--index", "general", "--top-k", "1"])
    assert found["hits"][0]["chunk_id"] == "guide.md#0"
    assert set(found["hits"][0]) == {"doc_id", "chunk_id", "text", "score", "index",
                                     "position", "metadata"}

    sparse = _json(capsys, ["rag", "search", "storm coast", "--mode", "sparse", "--home", home,
                            "--json", "--filter", "lang=en"])
    assert [h["doc_id"] for h in sparse["hits"]] == ["n1"]

    listed = _json(capsys, ["rag", "list", "--home", home, "--json"])
    assert {r["name"] for r in listed["indices"]} == {"general", "news"}

    (files / "more.txt").write_text("Sourdough needs a starter.", encoding="utf-8")
    second = _json(capsys, ["rag", "add", str(files / "more.txt"), "--home", home, "--json"])
    assert second["snapshot"]["parent"] == first

    restored = _json(capsys, ["rag", "restore", first[:12], "--home", home, "--json"])
    assert restored["restored"]["digest"] == first
    after = _json(capsys, ["rag", "search", "sourdough starter", "--home", home, "--json",
                           "--index", "general", "--mode", "sparse"])
    assert after["hits"] == []

    purged = _json(capsys, ["rag", "purge", "--index", "news", "--doc-id", "n1", "--home", home,
                            "--json"])
    assert purged["deleted"] == ["n1"] and purged["snapshot"]["chunks"] == 0

    snap = _json(capsys, ["rag", "snapshot", "--home", home, "--json"])
    assert snap["snapshot"]["digest"] == first


def test_errors_are_reported_with_status_2_and_nothing_is_lost(files, tmp_path, capsys):
    home = str(tmp_path / "home")
    assert main(["rag", "add", str(files / "guide.md"), "--home", home]) == 0
    capsys.readouterr()
    bad = files / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    assert main(["rag", "add", str(files / "guide.md"), str(bad), "--home", home]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert main(["rag", "search", "", "--home", home, "--json"]) == 2
    assert json.loads(capsys.readouterr().out) == {"error": "query is empty"}
    listed = _json(capsys, ["rag", "list", "--home", home, "--json"])
    assert listed["indices"][0]["chunks"] == 2


def test_rerank_without_a_local_model_is_an_error(files, tmp_path, capsys):
    home = str(tmp_path / "home")
    assert main(["rag", "search", "x", "--rerank-model", str(tmp_path / "nope"),
                 "--home", home]) == 2
    assert "not a local model directory" in capsys.readouterr().err
