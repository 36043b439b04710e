"""Delta snapshots: small changes are saved as deltas on a full base, reload to the same
state, are verified on load, and are compacted back into a full snapshot."""

from __future__ import annotations

import pytest

from r3mes.rag import Document, IndexCorruptedError, RagStore

MORE = Document("tea", "Green tea is brewed at eighty degrees for two minutes.", {"topic": "food"})


def _reopen(tmp_path, embedder, clock, **kw) -> RagStore:
    return RagStore(tmp_path / "home", embedder=embedder, clock=clock, **kw)


def _snap_files(tmp_path, digest) -> set[str]:
    return {p.name for p in (tmp_path / "home" / "rag" / "snapshots" / digest).iterdir()}


def _dense_top(index, query) -> str:
    vec = index.embedder.embed_query(query)
    return index.records[index.dense_search(vec, 1)[0][0]].doc_id


@pytest.fixture
def delta_store(tmp_path, embedder, clock) -> RagStore:
    # compact_fraction=1: the four-document test index stays below the compaction threshold
    return _reopen(tmp_path, embedder, clock, compact_fraction=1.0)


def test_a_small_addition_is_saved_as_a_delta_without_rewriting_the_index(
        small_docs, delta_store, tmp_path, embedder, clock):
    delta_store.index("general").add_documents(small_docs)
    base = delta_store.save("general")
    delta_store.index("general").add_documents([MORE])
    delta = delta_store.save("general")

    assert (base.kind, delta.kind) == ("full", "delta")
    assert (delta.base, delta.parent, delta.deltas, delta.chunks) == (base.digest, base.digest,
                                                                      1, 5)
    assert _snap_files(tmp_path, delta.digest) == {
        "manifest.json", "added.jsonl", "added-vectors.npy", "deleted.npy"}

    reopened = _reopen(tmp_path, embedder, clock).index("general")
    assert reopened.parent == delta.digest
    assert set(reopened.docs) == {d.doc_id for d in small_docs} | {"tea"}
    assert _dense_top(reopened, "how hot should the water be for green tea") == "tea"
    assert reopened.records[reopened.sparse_search("brewed tea", 1)[0][0]].doc_id == "tea"


def test_a_delete_and_a_replacement_after_a_snapshot_survive_reloading(
        small_docs, delta_store, tmp_path, embedder, clock):
    ix = delta_store.index("general")
    ix.add_documents(small_docs)
    delta_store.save("general")
    ix.delete_documents(["cats"])
    ix.add_documents([Document("bread", "Sourdough needs a starter culture.")])
    info = delta_store.save("general")
    assert info.kind == "delta" and (info.documents, info.chunks) == (3, 3)

    second = _reopen(tmp_path, embedder, clock, compact_fraction=1.0)
    reopened = second.index("general")
    assert set(reopened.docs) == {"python", "bread", "istanbul"}
    assert reopened.sparse_search("cats mice", 5) == []
    assert "cats" not in {reopened.records[i].doc_id for i, _ in reopened.dense_search(
        embedder.embed_query("felines purring"), 5)}
    assert [r.text for r in reopened.records.values() if r.doc_id == "bread"] == [
        "Sourdough needs a starter culture."]
    # a delta on a delta: ids keep growing, nothing is reused
    reopened.add_documents([MORE])
    third = second.save("general")
    assert third.deltas == 2 and third.base == info.base
    assert set(_reopen(tmp_path, embedder, clock).index("general").docs) == \
        {"python", "bread", "istanbul", "tea"}


def test_a_tampered_delta_is_refused_and_the_base_can_be_restored(
        small_docs, delta_store, tmp_path, embedder, clock):
    delta_store.index("general").add_documents(small_docs)
    base = delta_store.save("general")
    delta_store.index("general").add_documents([MORE])
    delta = delta_store.save("general")
    added = tmp_path / "home" / "rag" / "snapshots" / delta.digest / "added.jsonl"
    added.write_text(added.read_text(encoding="utf-8").replace("Green", "Black"), "utf-8")

    fresh = _reopen(tmp_path, embedder, clock)
    with pytest.raises(IndexCorruptedError, match="added.jsonl: sha256 mismatch"):
        fresh.index("general")
    assert added.exists()  # nothing is deleted on a failed load
    fresh.restore("general", base.digest)
    assert set(fresh.index("general").docs) == {d.doc_id for d in small_docs}


def test_a_delta_whose_base_is_missing_is_refused(
        small_docs, delta_store, tmp_path, embedder, clock):
    import shutil

    delta_store.index("general").add_documents(small_docs)
    base = delta_store.save("general")
    delta_store.index("general").add_documents([MORE])
    delta_store.save("general")
    shutil.rmtree(tmp_path / "home" / "rag" / "snapshots" / base.digest)
    with pytest.raises(IndexCorruptedError, match=f"{base.digest}/manifest.json: missing"):
        _reopen(tmp_path, embedder, clock).index("general")


def test_deltas_are_compacted_into_a_full_snapshot(small_docs, tmp_path, embedder, clock):
    store = _reopen(tmp_path, embedder, clock, compact_fraction=1.0, max_deltas=2)
    store.index("general").add_documents(small_docs[:2])
    kinds = [store.save("general").kind]
    for doc in [*small_docs[2:], MORE]:
        store.index("general").add_documents([doc])
        kinds.append(store.save("general").kind)
    assert kinds == ["full", "delta", "delta", "full"]
    assert set(_reopen(tmp_path, embedder, clock).index("general").docs) == \
        {d.doc_id for d in small_docs} | {"tea"}


def test_a_change_to_a_large_part_of_the_index_is_saved_in_full(small_docs, store):
    # default compaction: deltas may touch at most a quarter of the chunks
    store.index("general").add_documents(small_docs[:3])
    store.save("general")
    store.index("general").add_documents([MORE])  # 1 of 4 chunks: a delta
    assert store.save("general").kind == "delta"
    store.index("general").add_documents(small_docs[3:])  # 2 changes of 5 chunks: too many
    assert store.save("general").kind == "full"


def test_pruning_keeps_the_base_a_kept_delta_builds_on(
        small_docs, tmp_path, embedder, clock):
    store = _reopen(tmp_path, embedder, clock, compact_fraction=1.0, keep_snapshots=1)
    store.index("general").add_documents(small_docs)
    base = store.save("general")
    store.index("general").add_documents([MORE])
    delta = store.save("general")
    assert _snap_files(tmp_path, base.digest)  # still there: the delta needs it
    assert {p.name for p in (tmp_path / "home" / "rag" / "snapshots").iterdir()} == \
        {base.digest, delta.digest}
    assert len(_reopen(tmp_path, embedder, clock).index("general")) == 5


def test_export_and_import_carry_the_base_and_every_delta(
        small_docs, delta_store, tmp_path, embedder, clock):
    delta_store.index("general").add_documents(small_docs)
    base = delta_store.save("general")
    delta_store.index("general").add_documents([MORE])
    delta_store.index("general").delete_documents(["cats"])
    delta = delta_store.save("general")
    exported = delta_store.export("general", tmp_path / "general.tgz")
    assert exported["snapshots"] == [base.digest, delta.digest]

    other = RagStore(tmp_path / "other", embedder=embedder, clock=clock)
    result = other.import_snapshot(tmp_path / "general.tgz")
    assert result["imported"].digest == delta.digest and result["imported"].kind == "delta"
    assert set(other.index("general").docs) == {"python", "bread", "istanbul", "tea"}
