"""``r3mes index ...`` (and its alias ``r3mes rag ...``): stats, export / import between data
directories, and bad input that must leave the existing index intact. Some runs go through
the installed ``r3mes`` console script, the rest through ``r3mes.cli.main`` in process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from r3mes.cli import build_parser, main


def _console() -> list[str]:
    script = Path(sys.executable).with_name("r3mes")
    return [str(script)] if script.exists() else [sys.executable, "-m", "r3mes.cli"]


def _run_console(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_console(), *argv], capture_output=True, text=True, timeout=300,
                          check=False)


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "care.md").write_text(
        "# Fever\n\nDrink water and rest when you have a fever.\n\n"
        "# Burns\n\nCool a burn under running water for twenty minutes.\n", encoding="utf-8")
    (d / "more.txt").write_text("Wash small cuts with clean water and soap.", encoding="utf-8")
    return d


@pytest.fixture
def home(files, tmp_path, capsys):
    """A data directory whose ``medical`` index holds care.md (written in process)."""
    h = str(tmp_path / "home")
    assert main(["index", "add", str(files / "care.md"), "--index", "medical",
                 "--home", h]) == 0
    capsys.readouterr()
    return h


def test_index_add_search_stats_through_the_console_script(files, tmp_path):
    h = str(tmp_path / "home")
    added = _run_console("index", "add", str(files / "care.md"), str(files / "more.txt"),
                         "--index", "medical", "--home", h, "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["chunks"] == 3

    stats = _run_console("index", "stats", "--home", h, "--json")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    (row,) = data["indices"]
    assert (row["name"], row["documents"], row["chunks"], row["kind"], row["snapshot_kind"],
            row["error"]) == ("medical", 2, 3, "flat", "full", None)
    assert row["snapshot"] == json.loads(added.stdout)["snapshot"]["digest"]
    assert data["totals"] == {"documents": 2, "chunks": 3, "disk_bytes": row["disk_bytes"]}
    assert row["disk_bytes"] > 0


def test_index_search_modes_and_json_schema(home, capsys):
    for mode in ("dense", "sparse", "hybrid"):
        found = _json(capsys, ["index", "search", "what to do for a burn", "--mode", mode,
                               "--index", "medical", "--home", home, "--json", "--top-k", "1"])
        assert found["mode"] == mode and found["indices"] == ["medical"]
        assert found["hits"][0]["chunk_id"] == "care.md#1"


def test_rag_is_an_alias_of_index(home, capsys):
    commands = {}
    for group in ("index", "rag"):
        action = next(a for a in build_parser()._subparsers._group_actions[0].choices[group]
                      ._subparsers._group_actions)
        commands[group] = set(action.choices)
    assert commands["index"] == commands["rag"] >= {
        "add", "search", "stats", "export", "import", "list", "snapshot", "restore", "purge"}
    assert _json(capsys, ["rag", "stats", "--home", home, "--json"]) == \
        _json(capsys, ["index", "stats", "--home", home, "--json"])


@pytest.mark.parametrize("out_name", ["medical.tar.gz", "medical-export"])
def test_export_then_import_into_another_home_gives_the_same_index(
        home, out_name, tmp_path, capsys):
    out = tmp_path / out_name
    exported = _json(capsys, ["index", "export", str(out), "--index", "medical", "--home", home,
                              "--json"])
    assert exported["format"] == ("tar.gz" if out_name.endswith(".gz") else "directory")
    assert out.exists() and exported["bytes"] > 0

    other = str(tmp_path / "other")
    imported = _json(capsys, ["index", "import", str(out), "--home", other, "--json"])
    assert imported["imported"]["digest"] == exported["digest"]
    assert imported["replaced"] is None
    query = ["index", "search", "fever", "--index", "medical", "--json"]
    assert _json(capsys, [*query, "--home", other])["hits"] == \
        _json(capsys, [*query, "--home", home])["hits"]


def test_import_replaces_the_current_snapshot_and_keeps_the_old_one_restorable(
        home, files, tmp_path, capsys):
    out = tmp_path / "export.tar"
    exported = _json(capsys, ["index", "export", str(out), "--index", "medical", "--home", home,
                              "--json"])
    other = str(tmp_path / "other")
    own = _json(capsys, ["index", "add", str(files / "more.txt"), "--index", "medical",
                         "--home", other, "--json"])["snapshot"]["digest"]
    imported = _json(capsys, ["index", "import", str(out), "--home", other, "--json"])
    assert imported["replaced"] == own
    restored = _json(capsys, ["index", "restore", own, "--index", "medical", "--home", other,
                              "--json"])
    assert restored["restored"]["digest"] == own and exported["digest"] != own


def _tampered_archive(home, tmp_path, capsys) -> Path:
    good = tmp_path / "good"
    _json(capsys, ["index", "export", str(good), "--index", "medical", "--home", home, "--json"])
    (chunks,) = good.glob("snapshots/*/chunks.jsonl")
    chunks.write_text(chunks.read_text(encoding="utf-8").replace("twenty", "two"), "utf-8")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for p in sorted(good.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(good)), recursive=False)
    return bad


def test_a_tampered_export_is_refused_and_the_existing_index_is_intact(
        home, files, tmp_path, capsys):
    bad = _tampered_archive(home, tmp_path, capsys)
    other = str(tmp_path / "other")
    assert main(["index", "add", str(files / "more.txt"), "--index", "medical",
                 "--home", other]) == 0
    capsys.readouterr()
    before = _json(capsys, ["index", "stats", "--home", other, "--json"])

    refused = _run_console("index", "import", str(bad), "--home", other)
    assert refused.returncode == 2
    assert "import refused, nothing was changed" in refused.stderr
    assert "bad.tar.gz:snapshots/" in refused.stderr
    assert "chunks.jsonl: sha256 mismatch" in refused.stderr
    assert _json(capsys, ["index", "stats", "--home", other, "--json", "--verify"]) == before
    leftovers = [p.name for p in (Path(other) / "rag" / "snapshots").iterdir()]
    assert leftovers == [before["indices"][0]["snapshot"]]  # no staging directory left


def test_an_archive_with_a_path_outside_the_export_is_refused(home, tmp_path, capsys):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    assert main(["index", "import", str(evil), "--home", home]) == 2
    assert "'../escaped.txt' is not a plain relative file" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped.txt"))


def test_an_export_naming_an_invalid_index_is_refused(home, tmp_path, capsys):
    out = tmp_path / "exp"
    _json(capsys, ["index", "export", str(out), "--index", "medical", "--home", home, "--json"])
    header = json.loads((out / "export.json").read_text(encoding="utf-8"))
    header["index"] = "../sports"
    (out / "export.json").write_text(json.dumps(header), encoding="utf-8")
    assert main(["index", "import", str(out), "--home", home, "--json"]) == 2
    assert "invalid index name '../sports'" in json.loads(capsys.readouterr().out)["error"]


def test_an_export_relabelled_to_another_index_is_refused(home, tmp_path, capsys):
    out = tmp_path / "exp"
    _json(capsys, ["index", "export", str(out), "--index", "medical", "--home", home, "--json"])
    header = json.loads((out / "export.json").read_text(encoding="utf-8"))
    header["index"] = "sports"
    (out / "export.json").write_text(json.dumps(header), encoding="utf-8")
    assert main(["index", "import", str(out), "--home", home, "--json"]) == 2
    assert "not 'sports'" in json.loads(capsys.readouterr().out)["error"]


def test_export_refuses_an_existing_path_and_an_index_without_snapshot(home, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x", encoding="utf-8")
    assert main(["index", "export", str(tmp_path / "taken"), "--index", "medical",
                 "--home", home]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["index", "export", str(tmp_path / "new"), "--index", "legal",
                 "--home", home]) == 2
    assert "index 'legal' has no snapshot (add documents first)" in capsys.readouterr().err


def test_bad_input_is_refused_clearly_and_the_existing_index_stays_intact(
        home, tmp_path, capsys):
    before = _json(capsys, ["index", "stats", "--home", home, "--json"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    binary = tmp_path / "photo.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as fh:
        fh.truncate(50 * 1024 * 1024)  # a 50 MB (sparse) file; refused before it is read
    for path, message in [(empty, "empty.txt: file is empty"),
                          (binary, "photo.txt: looks like a binary file"),
                          (huge, "huge.txt: file is 50.0 MiB, over the 32 MiB limit")]:
        assert main(["index", "add", str(path), "--index", "medical", "--home", home]) == 2
        assert message in capsys.readouterr().err
        assert _json(capsys, ["index", "stats", "--home", home, "--json"]) == before

    with pytest.raises(SystemExit) as exc:
        main(["index", "add", str(empty), "--index", "sports/../x", "--home", home])
    assert exc.value.code == 2
    assert "invalid index name 'sports/../x'" in capsys.readouterr().err

    digest = before["indices"][0]["snapshot"]
    vectors = Path(home) / "rag" / "snapshots" / digest / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-8])
    assert main(["index", "search", "fever", "--home", home]) == 2
    assert "vectors.npy: sha256 mismatch" in capsys.readouterr().err
    assert main(["index", "stats", "--home", home, "--verify"]) == 1
    assert "vectors.npy: sha256 mismatch" in capsys.readouterr().out
    assert main(["index", "add", str(tmp_path / "docs" / "more.txt"), "--index", "medical",
                 "--home", home]) == 2  # never builds on a corrupted snapshot
    assert "sha256 mismatch" in capsys.readouterr().err
    assert vectors.exists()
