"""Adapters and index snapshots over IPFS between two real kubo nodes (loopback only)."""

from __future__ import annotations

import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dag_cbor
import pytest
import torch

from r3mes.cache.adapter_store import AdapterStore
from r3mes.distribution import BlockVerificationError, TrustlessGateway, parse_cid
from r3mes.distribution.cid import CID
from r3mes.distribution.gateway import read_car
from r3mes.distribution.publish import adapter_cid, publish_adapter, publish_index
from r3mes.distribution.pull import pull_adapter, pull_index
from r3mes.distribution.unixfs import CHUNK_SIZE, build_dag
from r3mes.rag import Document, RagStore
from r3mes.rag.embedder import Embedder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cache"))
from dora_adapter_factory import write_adapter  # noqa: E402

DOCS = [
    Document("cats", "Cats are small domesticated felines. They purr and hunt mice at night."),
    Document("python", "Python is a programming language. Use pip to install packages."),
    Document("bread", "To bake bread, knead flour, water, yeast and salt, then let it rise."),
]
TEA = Document("tea", "Green tea is brewed at eighty degrees for two minutes.")


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> Embedder:
    return Embedder(cache_dir=tmp_path_factory.mktemp("emb"), show_progress=False)


def _top(store: RagStore, name: str, query: str) -> str:
    ix = store.index(name)
    hit = ix.dense_search(ix.embedder.embed_query(query), 1)[0][0]
    return ix.records[hit].doc_id


def test_local_cids_equal_what_kubo_computes_for_the_same_bytes(kubo_pair, tmp_path):
    a, _ = kubo_pair
    rng = random.Random(7)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    # empty, one chunk, one byte past a chunk, and past 174 chunks (a two-level DAG)
    for i, size in enumerate((0, 10, CHUNK_SIZE + 1, CHUNK_SIZE * 175 + 3)):
        (tree / f"f{i}.bin").write_bytes(rng.randbytes(size))
    (tree / "sub" / "x.json").write_text('{"a": 1}')
    for path in [*sorted(tree.rglob("*")), tree]:
        assert a.rpc.add(path) == build_dag(path)[0], path.name


def test_node_b_pulls_an_adapter_and_a_snapshot_into_a_fresh_home_and_answers(
        kubo_pair, tmp_path, embedder):
    a, b = kubo_pair
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    src = write_adapter(tmp_path / "src" / "medical", seed=3)
    record = AdapterStore(home_a).add(src, "medical_dora")
    store_a = RagStore(home_a, embedder=embedder)
    store_a.index("general").add_documents(DOCS)
    store_a.save("general")

    pub_adapter = publish_adapter("medical_dora", a.rpc, home_a)
    pub_index = publish_index("general", a.rpc, home_a, store_a)
    assert pub_adapter["cid"] == adapter_cid("medical_dora", home_a, record.digest)
    assert parse_cid(pub_index["cid"]).version == 1

    got = pull_adapter(pub_adapter["uri"], b.rpc, "med", home_b)
    assert got["added"]["digest"] == record.digest
    assert got["pull"]["blocks_fetched"] > 0 and got["pull"]["bytes_local"] == 0
    store_b_ad = AdapterStore(home_b)
    assert all(r.ok for r in store_b_ad.verify("med"))
    assert (store_b_ad.path("med") / "adapter_model.safetensors").read_bytes() == \
        (src / "adapter_model.safetensors").read_bytes()

    store_b = RagStore(home_b, embedder=embedder)
    pulled = pull_index(pub_index["uri"], b.rpc, home_b, store_b)
    assert pulled["imported"].digest == pub_index["digest"]
    assert _top(RagStore(home_b, embedder=embedder), "general", "how do I bake bread") == "bread"


def test_a_pulled_expert_generates_exactly_as_the_published_one(kubo_pair, tmp_path):
    # A bundled expert of the demo model, published by node A and pulled by node B by CID,
    # then mixed into the model: the same logits and tokens as the original directory's.
    from r3mes.assets import ASSETS_DIR
    from r3mes.core.backends import BitNetCppBackend
    from r3mes.core.generation import GenerationConfig

    a, b = kubo_pair
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    expert = ASSETS_DIR / "experts" / "medical_dora"
    AdapterStore(home_a).add(expert, "medical_dora")
    published = publish_adapter("medical_dora", a.rpc, home_a)
    pull_adapter(published["uri"], b.rpc, "med", home_b)

    backend = BitNetCppBackend()
    backend.load_base_model(ASSETS_DIR / "demo_model")
    backend.load_dora_adapter("original", expert)
    backend.load_dora_adapter("pulled", AdapterStore(home_b).path("med"))
    ids = backend.encode_prompt("What helps with insulin resistance?")
    original = backend.inference([ids], ["original"], [1.0])
    assert torch.equal(backend.inference([ids], ["pulled"], [1.0]), original)
    assert not torch.equal(backend.inference([ids]), original)  # the expert changes the answer
    config = GenerationConfig(max_new_tokens=8)
    want = backend.generate([ids], config, ["original"], [1.0])[0].tokens
    assert backend.generate([ids], config, ["pulled"], [1.0])[0].tokens == want


def test_a_delta_pull_moves_only_the_changed_blocks(kubo_pair, tmp_path, embedder):
    a, b = kubo_pair
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    store_a = RagStore(home_a, embedder=embedder, compact_fraction=1.0)
    store_a.index("general").add_documents(DOCS)
    store_a.save("general")
    first = publish_index("general", a.rpc, home_a, store_a)
    store_b = RagStore(home_b, embedder=embedder)
    full = pull_index(first["uri"], b.rpc, home_b, store_b)["pull"]

    store_a.index("general").add_documents([TEA])
    delta = store_a.save("general")
    assert delta.kind == "delta"
    second = publish_index("general", a.rpc, home_a, store_a)
    moved = pull_index(second["uri"], b.rpc, home_b, store_b)["pull"]

    snaps = home_a / "rag" / "snapshots"
    delta_bytes = sum(p.stat().st_size for p in (snaps / delta.digest).iterdir())
    base_bytes = sum(p.stat().st_size for p in (snaps / first["digest"]).iterdir())
    # the base snapshot came from local disk; what moved is the delta and the directory
    # nodes and export.json above it (a few hundred bytes)
    assert moved["bytes_local"] >= base_bytes
    assert delta_bytes <= moved["bytes_fetched"] < delta_bytes + 2048
    assert moved["bytes_fetched"] < full["bytes_fetched"]
    assert _top(RagStore(home_b, embedder=embedder), "general", "green tea temperature") == "tea"


class _Gateway:
    """A trustless gateway served by the test from node A's blocks, flipping one byte of the
    block named ``corrupt`` (a gateway or path that alters bytes in transit)."""

    def __init__(self, upstream, corrupt: CID | None = None) -> None:
        up, bad = upstream, str(corrupt) if corrupt else None

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                cid = parse_cid(self.path.split("?")[0])
                data = bytearray(up.get_block(cid))
                if str(cid) == bad:
                    data[len(data) // 2] ^= 0xFF
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.ipld.raw")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(bytes(data))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_block_corrupted_in_transit_is_refused_and_nothing_is_stored(
        kubo_pair, tmp_path, embedder):
    a, _ = kubo_pair
    home_a, home_c = tmp_path / "a", tmp_path / "c"
    store_a = RagStore(home_a, embedder=embedder)
    store_a.index("general").add_documents(DOCS)
    store_a.save("general")
    pub = publish_index("general", a.rpc, home_a, store_a)
    _, dag = build_dag(home_a / "rag" / "snapshots" / pub["digest"] / "chunks.jsonl")
    victim = parse_cid(next(iter(dag.leaves)))  # a leaf deep in the tree

    gw = _Gateway(a.rpc, corrupt=victim)
    try:
        store_c = RagStore(home_c, embedder=embedder)
        with pytest.raises(BlockVerificationError, match=str(victim)):
            pull_index(pub["uri"], TrustlessGateway(gw.url), home_c, store_c)
        assert store_c.existing() == []
        assert not any((home_c / "ipfs" / "staging").iterdir())
        assert not (home_c / "rag" / "snapshots").exists() or \
            not any(p for p in (home_c / "rag" / "snapshots").iterdir()
                    if not p.name.startswith("."))
    finally:
        gw.close()

    honest = _Gateway(a.rpc)
    try:
        got = pull_index(pub["uri"], TrustlessGateway(honest.url), home_c,
                         RagStore(home_c, embedder=embedder))
        assert got["imported"].digest == pub["digest"]
    finally:
        honest.close()


def _car(root: CID, blocks: dict[str, bytes]) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    header = dag_cbor.encode({"version": 1, "roots": [root]})
    body = varint(len(header)) + header
    for cid, data in blocks.items():
        section = bytes(parse_cid(cid)) + data
        body += varint(len(section)) + section
    return body


def test_a_car_is_read_block_by_verified_block(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(random.Random(1).randbytes(CHUNK_SIZE * 2 + 5))
    root, dag = build_dag(tmp_path / "d")
    blocks = {c: dag.block(c) for c in [*dag.inner, *dag.leaves]}
    assert read_car(_car(root, blocks), expect_root=root) == blocks
    bad = dict(blocks)
    leaf = next(iter(dag.leaves))
    bad[leaf] = bad[leaf][:-1] + b"\x00"
    with pytest.raises(BlockVerificationError, match=leaf):
        read_car(_car(root, bad))


def test_a_miner_node_syncs_from_the_serving_node_and_keeps_serving_when_it_is_gone(
        kubo_pair, tmp_path, embedder):
    import json

    from r3mes.distribution.kubo import KuboRPC
    from r3mes.distribution.sync import MinerSync, published

    a, b = kubo_pair
    home_a, home_m = tmp_path / "serving", tmp_path / "miner"
    store_a = RagStore(home_a, embedder=embedder, compact_fraction=1.0)
    store_a.index("news").add_documents(DOCS)
    store_a.save("news")
    publish_index("news", a.rpc, home_a, store_a)

    class Serving(BaseHTTPRequestHandler):  # what the serving node's server answers
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            body = json.dumps({"indices": published(home_a)}).encode()
            self.send_response(200 if self.path == "/api/v1/ipfs/published" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Serving)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    store_m = RagStore(home_m, embedder=embedder)
    sync = MinerSync(home_m, url, lambda: KuboRPC(b.api), rag_store=store_m)
    try:
        assert sync.sync_once() == {"news": "pulled"}
        assert sync.sync_once() == {"news": "current"}
        store_a.index("news").add_documents([TEA])
        store_a.save("news")
        publish_index("news", a.rpc, home_a, store_a)
        assert sync.sync_once() == {"news": "pulled"}
        assert _top(RagStore(home_m, embedder=embedder), "news", "green tea") == "tea"
    finally:
        srv.shutdown()
        srv.server_close()
    # the serving node is gone: nothing changes, the last good snapshot keeps answering
    assert sync.sync_once() == {}
    assert "unreachable" in (sync.last_error or "")
    assert _top(RagStore(home_m, embedder=embedder), "news", "green tea") == "tea"
