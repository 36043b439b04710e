"""``r3mes index search --server URL``: the CLI searching through a running server (issue 25:
the server has the model and indices loaded, so a search from the shell is fast)."""

from __future__ import annotations

import json

from r3mes.cli import main


def test_cli_search_through_a_running_server_matches_its_api(live_server, capsys):
    assert main(["index", "search", "metformin insulin resistance", "--index", "medical",
                 "--top-k", "2", "--server", live_server.url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["server"] == live_server.url and out["indices"] == ["medical"]
    assert out["hits"][0]["doc_id"] == "med_metformin"
    assert set(out["hits"][0]) >= {"doc_id", "chunk_id", "text", "score", "index"}
    assert main(["index", "search", "metformin", "--server", live_server.url]) == 0
    assert "via " + live_server.url in capsys.readouterr().out


def test_cli_search_reports_server_errors_and_an_unreachable_server(live_server, capsys):
    assert main(["index", "search", "x", "--index", "nowhere", "--server", live_server.url,
                 "--json"]) == 2
    assert "400" in json.loads(capsys.readouterr().out)["error"]
    assert main(["index", "search", "x", "--server", "http://127.0.0.1:9", "--json"]) == 2
    assert "not reachable" in json.loads(capsys.readouterr().out)["error"]
    assert main(["index", "search", "x", "--domain", "medical", "--server", live_server.url,
                 "--json"]) == 2
    assert "not available with --server" in json.loads(capsys.readouterr().out)["error"]
