"""Issue 26, item 7, on a real full disk (a small tmpfs): one clear error line instead of an
ENOSPC traceback, a free-space check before long work, and removal that needs no space."""

from __future__ import annotations

import errno
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from r3mes.cache import AdapterStore
from r3mes.cli import main


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (needs root; skipped where mounting is refused)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", f"r3mes-{uuid.uuid4().hex[:8]}",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Write a file until the disk is full (unbuffered: nothing is left to flush)."""
    with open(disk / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_adapters_add_says_the_disk_is_full_and_remove_still_works(small_disk, tiny, capsys):
    home = str(small_disk / "home")
    for expert in ("medical_dora", "coding_dora"):
        assert main(["adapters", "add", str(tiny["experts"] / expert), "--id", expert,
                     "--home", home]) == 0
    fill(small_disk)
    capsys.readouterr()

    assert main(["adapters", "add", str(tiny["experts"] / "legal_dora"), "--id", "legal_dora",
                 "--home", home]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "free" in err and "Traceback" not in err

    assert main(["adapters", "remove", "medical_dora", "--home", home]) == 0
    store = AdapterStore(home)
    assert [r.id for r in store.list()] == ["coding_dora"]
    assert all(r.ok for r in store.verify())


def test_index_add_refuses_a_full_disk_before_embedding(small_disk, tmp_path, capsys):
    home = small_disk / "home"
    notes = tmp_path / "notes.txt"
    notes.write_text("Insulin resistance improves with exercise and sleep.\n\n" * 400,
                     encoding="utf-8")
    fill(small_disk)
    assert main(["index", "add", str(notes), "--index", "user", "--home", str(home),
                 "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert "needs about" in error and "free" in error
    cache = home / "rag" / "embedding-cache"
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing embedded
