"""``r3mes adapters list|add|remove|verify|stats|pin|unpin|limit`` with --json and --home."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from r3mes.cli import main


def r3mes_json(capsys, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_add_list_verify_stats_remove_round_trip(capsys, home, adapter_factory):
    src = adapter_factory("medical")
    code, added = r3mes_json(capsys, "adapters", "add", str(src), "--id", "medical_dora",
                             "--home", str(home))
    assert code == 0 and added["added"]["id"] == "medical_dora" and added["evicted"] == []

    code, listed = r3mes_json(capsys, "adapters", "list", "--home", str(home))
    (record,) = listed["adapters"]
    assert record["digest"] == added["added"]["digest"] and record["rank"] == 4
    assert set(record) >= {"id", "digest", "files", "size_bytes", "rank", "target_modules",
                           "base_model", "base_model_fingerprint", "last_used", "pinned"}

    code, verified = r3mes_json(capsys, "adapters", "verify", "--home", str(home))
    assert code == 0 and verified["ok"] and verified["results"][0]["problems"] == []

    code, stats = r3mes_json(capsys, "adapters", "stats", "--home", str(home))
    assert stats["adapters"] == 1 and stats["total_bytes"] == record["size_bytes"]

    code, removed = r3mes_json(capsys, "adapters", "remove", "medical_dora", "--home", str(home))
    assert code == 0 and removed["removed"]["id"] == "medical_dora"
    assert r3mes_json(capsys, "adapters", "list", "--home", str(home))[1] == {"adapters": []}


def test_verify_exits_nonzero_on_a_damaged_adapter(capsys, home, adapter_factory, store):
    record = store.add(adapter_factory(), "a")
    (store.objects / record.digest / "adapter_model.safetensors").write_bytes(b"oops")
    code, verified = r3mes_json(capsys, "adapters", "verify", "a", "--home", str(home))
    assert code == 1 and not verified["ok"]
    assert "sha256" in verified["results"][0]["problems"][0]


def test_refused_add_is_a_clear_error_with_exit_status_1(capsys, home, adapter_factory):
    src = adapter_factory(config_overrides={"use_dora": False})
    code, error = r3mes_json(capsys, "adapters", "add", str(src), "--id", "x", "--home", str(home))
    assert code == 1 and error["type"] == "AdapterValidationError"
    assert "use_dora must be true" in error["error"]
    code = main(["adapters", "remove", "ghost", "--home", str(home)])
    assert code == 1 and "'ghost' is not in the store" in capsys.readouterr().err


def test_wrong_base_model_is_refused_from_the_command_line(capsys, home, adapter_factory):
    src = adapter_factory(base_model="someone/else")
    code, error = r3mes_json(capsys, "adapters", "add", str(src), "--id", "x",
                             "--base-model", "microsoft/bitnet-b1.58-2B-4T", "--home", str(home))
    assert code == 1 and error["type"] == "BaseModelMismatchError"


def test_pin_and_limit(capsys, home, adapter_factory, store):
    size = store.add(adapter_factory(seed=0), "a").size_bytes
    store.add(adapter_factory(seed=1), "b")
    code, pinned = r3mes_json(capsys, "adapters", "pin", "a", "--home", str(home))
    assert code == 0 and pinned["adapter"]["pinned"] is True
    code, limit = r3mes_json(capsys, "adapters", "limit", str(1.5 * size / 1024**3),
                             "--home", str(home))
    assert code == 0 and limit["evicted"] == ["b"]
    code, limit = r3mes_json(capsys, "adapters", "limit", "none", "--home", str(home))
    assert limit["max_size_bytes"] is None


def test_human_readable_list(capsys, home, adapter_factory, store):
    store.add(adapter_factory(), "general_dora", pinned=True)
    assert main(["adapters", "list", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "general_dora" in out and "pinned" in out


@pytest.mark.parametrize("argv", [["adapters", "stats"]])
def test_console_entry_point_runs(home, argv):
    result = subprocess.run([sys.executable, "-m", "r3mes.cli", *argv, "--json",
                             "--home", str(home)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["adapters"] == 0
