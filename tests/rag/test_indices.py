"""Named indices: add/update/delete, TTL, routing, snapshots, corruption and restore."""

from __future__ import annotations

import json

import pytest

from r3mes.rag import (
    INDEX_NAMES,
    Document,
    DocumentError,
    IndexCorruptedError,
    RagStore,
    UnknownIndexError,
    route_domain,
)
from r3mes.rag.indices import DAY_S


def _ids(index, query, k=3):
    vec = index.embedder.embed_query(query)
    return [index.records[i].doc_id for i, _ in index.dense_search(vec, k)]


def test_six_default_indices_and_user_named_ones_invalid_names_refused(store):
    assert INDEX_NAMES == ("general", "news", "medical", "legal", "code", "user")
    for bad in ("../etc", "a b", "", ".hidden", "x" * 65, "naïve"):
        with pytest.raises(UnknownIndexError, match="invalid index name"):
            store.index(bad)
    sports = store.index("sports-2024_v1")
    assert sports.config.ttl_s is None and store.index("news").config.ttl_s == 7 * 86400
    sports.add_documents([Document("match", "The final ended two to one after extra time.")])
    store.save("sports-2024_v1")
    assert "sports-2024_v1" in store.existing() and "sports-2024_v1" in store.names()
    # A second store over the same data directory finds the user's index from its ref.
    again = RagStore(store.root.parent, embedder=store.embedder)
    assert "sports-2024_v1" in again.existing()
    assert [r["name"] for r in again.stats()][-1] == "sports-2024_v1"


def test_domains_route_to_their_index_then_general():
    assert route_domain("medical") == ["medical", "general"]
    assert route_domain("Hukuk") == ["legal", "general"]
    assert route_domain("programming") == ["code", "general"]
    assert route_domain("astrology") == ["general"]
    assert route_domain(None) == ["general"]


def test_added_documents_are_found_by_dense_and_sparse_search(small_docs, store):
    ix = store.index("general")
    counts = ix.add_documents(small_docs)
    assert counts == {"documents": 4, "replaced": 0, "chunks": 4}
    assert _ids(ix, "how to make a loaf", 1) == ["bread"]
    assert ix.records[ix.sparse_search("python pip", 1)[0][0]].doc_id == "python"


def test_adding_a_document_again_replaces_it(small_docs, store):
    ix = store.index("general")
    ix.add_documents(small_docs)
    counts = ix.add_documents([Document("bread", "Sourdough needs a starter culture.")])
    assert counts["replaced"] == 1 and len(ix.docs) == 4
    texts = [r.text for r in ix.records.values() if r.doc_id == "bread"]
    assert texts == ["Sourdough needs a starter culture."]
    assert ix.sparse_search("yeast flour", 5) == []


def test_deleted_documents_disappear_from_both_searches(small_docs, store):
    ix = store.index("general")
    ix.add_documents(small_docs)
    assert ix.delete_documents(["cats", "not-there"]) == 1
    assert "cats" not in _ids(ix, "felines purring", 4)
    assert ix.sparse_search("cats mice", 5) == []


def test_a_bad_document_in_a_batch_changes_nothing(small_docs, store):
    ix = store.index("general")
    ix.add_documents(small_docs[:1])
    with pytest.raises(DocumentError, match="'empty' is empty"):
        ix.add_documents([Document("new", "Fine text."), Document("empty", " ")])
    assert list(ix.docs) == ["cats"]


def test_news_expire_after_seven_days_and_are_purged(store, clock):
    news = store.index("news")
    assert news.config.ttl_s == 7 * DAY_S
    news.add_documents([Document("old", "Election results announced today.")])
    clock.now += 3 * DAY_S
    news.add_documents([Document("new", "Election campaign starts this week.")])
    assert news.allowed_ids(clock.now) is None  # nothing expired yet
    clock.now += 5 * DAY_S  # "old" is 8 days old, "new" 5
    allowed = news.allowed_ids(clock.now)
    assert {news.records[i].doc_id for i in allowed} == {"new"}
    assert news.purge_expired() == ["old"]
    assert list(news.docs) == ["new"]


def test_news_timestamp_metadata_sets_the_expiry(store, clock):
    news = store.index("news")
    news.add_documents([Document("dated", "Old story.", {"timestamp": clock.now - 8 * DAY_S})])
    assert news.expired_doc_ids() == ["dated"]
    with pytest.raises(DocumentError, match="not ISO 8601"):
        news.add_documents([Document("bad", "x", {"timestamp": "yesterday"})])


def test_general_index_has_no_ttl(small_docs, store, clock):
    ix = store.index("general")
    ix.add_documents(small_docs[:1])
    clock.now += 1000 * DAY_S
    assert ix.purge_expired() == []


def test_snapshot_round_trip(small_docs, store, tmp_path, embedder, clock):
    ix = store.index("general")
    ix.add_documents(small_docs)
    info = store.save("general")
    assert (info.documents, info.chunks) == (4, 4)
    reopened = RagStore(tmp_path / "home", embedder=embedder, clock=clock).index("general")
    assert reopened.parent == info.digest
    assert set(reopened.docs) == set(ix.docs)
    assert _ids(reopened, "how to make a loaf", 1) == ["bread"]
    assert reopened.records[reopened.sparse_search("Boğaz köprü", 1)[0][0]].doc_id == "istanbul"


def test_snapshot_digest_identifies_content(small_docs, store):
    store.index("general").add_documents(small_docs[:2])
    a = store.save("general")
    b = store.save("general")  # nothing changed
    assert a.digest == b.digest
    store.index("general").add_documents(small_docs[2:3])
    c = store.save("general")
    assert c.digest != a.digest and c.parent == a.digest


def test_current_digests_name_each_saved_index_and_skip_unreadable_refs(
        small_docs, store, tmp_path, embedder):
    assert store.current_digest("general") is None and store.current_digests() == {}
    store.index("general").add_documents(small_docs[:2])
    store.index("medical").add_documents(small_docs[2:3])
    general, medical = store.save("general"), store.save("medical")
    assert store.current_digests() == {"general": general.digest, "medical": medical.digest}
    (tmp_path / "home" / "rag" / "refs" / "medical.json").write_text("{not json", "utf-8")
    fresh = RagStore(tmp_path / "home", embedder=embedder)
    assert fresh.current_digest("medical") is None
    assert fresh.current_digests() == {"general": general.digest}
    with pytest.raises(ValueError, match="index name"):
        fresh.current_digest("../etc")


def test_a_tampered_snapshot_file_is_refused_and_restore_brings_back_the_previous(small_docs,
        store, tmp_path, embedder, clock):
    store.index("general").add_documents(small_docs[:2])
    first = store.save("general")
    store.index("general").add_documents(small_docs[2:])
    second = store.save("general")
    chunks = tmp_path / "home" / "rag" / "snapshots" / second.digest / "chunks.jsonl"
    chunks.write_text(chunks.read_text(encoding="utf-8").replace("Cats", "Dogs"), "utf-8")

    fresh = RagStore(tmp_path / "home", embedder=embedder, clock=clock)
    with pytest.raises(IndexCorruptedError, match="chunks.jsonl: sha256 mismatch"):
        fresh.index("general")
    assert [s.digest for s in fresh.snapshots("general")][1] == first.digest
    restored = fresh.restore("general", first.digest[:10])
    assert restored.digest == first.digest
    assert set(fresh.index("general").docs) == {"cats", "python"}


def test_a_corrupted_faiss_file_is_refused_and_nothing_is_deleted(
        small_docs, store, tmp_path, embedder):
    store.index("general").add_documents(small_docs)
    info = store.save("general")
    snap = tmp_path / "home" / "rag" / "snapshots" / info.digest
    before = sorted(p.name for p in snap.iterdir())
    (snap / "index.faiss").write_bytes(b"junk")
    with pytest.raises(IndexCorruptedError, match="index.faiss"):
        RagStore(tmp_path / "home", embedder=embedder).index("general")
    assert sorted(p.name for p in snap.iterdir()) == before


def test_a_corrupted_ref_names_the_file_and_restore_repairs_it(
        small_docs, store, tmp_path, embedder):
    store.index("general").add_documents(small_docs[:1])
    info = store.save("general")
    ref = tmp_path / "home" / "rag" / "refs" / "general.json"
    ref.write_text("{not json", encoding="utf-8")
    fresh = RagStore(tmp_path / "home", embedder=embedder)
    with pytest.raises(IndexCorruptedError, match="general.json: unreadable index reference"):
        fresh.index("general")
    fresh.restore("general", info.digest)
    assert json.loads(ref.read_text(encoding="utf-8"))["current"] == info.digest


def test_a_corrupted_manifest_is_refused(small_docs, store, tmp_path, embedder):
    store.index("general").add_documents(small_docs[:1])
    info = store.save("general")
    manifest = tmp_path / "home" / "rag" / "snapshots" / info.digest / "manifest.json"
    manifest.write_text('{"format": 1}', encoding="utf-8")
    with pytest.raises(IndexCorruptedError, match="manifest.json: invalid manifest"):
        RagStore(tmp_path / "home", embedder=embedder).index("general")


def test_restore_of_an_unknown_digest_is_refused(store):
    with pytest.raises(IndexCorruptedError, match="no snapshot 'abcdef12'"):
        store.restore("general", "abcdef12")


def test_old_snapshots_beyond_the_kept_number_are_pruned(small_docs, tmp_path, embedder):
    store = RagStore(tmp_path / "home", embedder=embedder, keep_snapshots=2)
    for doc in small_docs[:3]:
        store.index("general").add_documents([doc])
        store.save("general")
    assert len(store.snapshots("general")) == 2
    assert len(list((tmp_path / "home" / "rag" / "snapshots").iterdir())) == 2


def test_save_purges_expired_news(store, clock):
    store.index("news").add_documents([Document("n", "Breaking story.")])
    clock.now += 8 * DAY_S
    info = store.save("news")
    assert info.documents == 0
