"""Full and delta pull of an index snapshot between two real kubo nodes on loopback.

Node A (a serving node) holds an index of ``--chunks`` one-chunk documents, publishes its
snapshot, and node B (a miner node, fresh data directory) pulls it by CID; then A adds
``--added`` documents (saved as a delta snapshot), publishes again, and B pulls the newer
snapshot, fetching only the blocks it lacks. Printed per pull: wall time of ``pull_index``
(fetch, verify every block, import with the r3mes digest checks), the blocks and bytes r3mes
fetched from node B's RPC API, the bytes taken from B's local disk, and the bytes node B's
kubo block store grew by (what bitswap moved from A to B).

    .venv/bin/python benchmarks/bench_ipfs_pull.py [--chunks 10000] [--added 100]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from r3mes.distribution.kubo import KuboRPC
from r3mes.distribution.publish import publish_index
from r3mes.distribution.pull import pull_index
from r3mes.rag import Document, RagStore
from r3mes.rag.embedder import Embedder

WORDS = ("index snapshot delta block verify cache router expert adapter ternary kernel "
         "query answer source news medical code general miner serving node bitswap peer "
         "chunk vector search rank fusion digest hash content address network offline").split()


def _docs(n: int, start: int, seed: int) -> list[Document]:
    rng = random.Random(seed)
    return [Document(f"doc{start + i}", " ".join(rng.choice(WORDS) for _ in range(24)) + ".")
            for i in range(n)]


def _node(repo: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "r3mes.distribution.embedded", "--repo",
                             str(repo)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    return proc, json.loads(proc.stdout.readline())  # type: ignore[union-attr]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=10000)
    ap.add_argument("--added", type=int, default=100)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ipfs-"))
    (pa, ia), (pb, ib) = _node(tmp / "kubo-a"), _node(tmp / "kubo-b")
    a, b = KuboRPC(ia["api"]), KuboRPC(ib["api"])
    try:
        b.connect(f"{ia['swarm'][0]}/p2p/{ia['id']}")
        emb = Embedder(cache_dir=tmp / "emb", show_progress=False)
        store_a = RagStore(tmp / "home-a", embedder=emb, compact_fraction=1.0)
        t = time.perf_counter()
        store_a.index("general").add_documents(_docs(args.chunks, 0, 1))
        store_a.save("general")
        print(f"# built a {args.chunks}-chunk index in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        store_b = RagStore(tmp / "home-b", embedder=emb)
        rows = []
        for label in ("full", "delta"):
            if label == "delta":
                store_a.index("general").add_documents(_docs(args.added, args.chunks, 2))
                assert store_a.save("general").kind == "delta"
            pub = publish_index("general", a, tmp / "home-a", store_a)
            before = b.repo_stat()["RepoSize"]
            t = time.perf_counter()
            got = pull_index(pub["uri"], b, tmp / "home-b", store_b)
            wall = time.perf_counter() - t
            p = got["pull"]
            rows.append((label, got["imported"].chunks, wall, p["blocks_fetched"],
                         p["bytes_fetched"], p["bytes_local"],
                         b.repo_stat()["RepoSize"] - before, pub["bytes"]))
        print("| pull | chunks after | time (s) | blocks fetched | bytes fetched | "
              "bytes from local disk | node B block store growth (bitswap) | export size |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]} | {r[4]:,} | {r[5]:,} | {r[6]:,} "
                  f"| {r[7]:,} |")
    finally:
        for proc in (pb, pa):
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
