"""Retriever: modes, RRF, routing, filters, bad queries, reranking, prompt and citations."""

from __future__ import annotations

import pytest

from r3mes.core.text_encoder import default_model_path
from r3mes.rag import (
    Document,
    Hit,
    QueryError,
    RerankerUnavailableError,
    Retriever,
    UnknownIndexError,
    build_prompt,
    cited_sources,
    rrf_fuse,
)
from r3mes.rag.indices import DAY_S
from r3mes.rag.retriever import MAX_QUERY_CHARS, PASSAGE_SEPARATOR, CrossEncoderReranker


@pytest.fixture
def retriever(store, small_docs) -> Retriever:
    store.index("general").add_documents(small_docs)
    store.index("code").add_documents([
        Document("git", "Use git commit to record changes and git push to share them.",
                 {"topic": "code"}),
    ])
    return Retriever(store)


def test_rrf_scores_are_sums_of_reciprocal_ranks():
    fused = dict(rrf_fuse([["a", "b", "c"], ["b", "c"]], k=60))
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["a"] == pytest.approx(1 / 61)
    assert [key for key, _ in rrf_fuse([["a", "b", "c"], ["b", "c"]], k=60)][0] == "b"


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_every_mode_finds_the_obvious_document(retriever, mode):
    hits = retriever.search("how do I bake bread with yeast", top_k=2, mode=mode,
                            indices=["general"])
    assert hits[0].doc_id == "bread"
    assert hits[0].chunk_id == "bread#0" and hits[0].index == "general"
    assert hits[0].metadata["topic"] == "food"


def test_hits_are_sorted_by_score(retriever):
    hits = retriever.search("programming", top_k=5, mode="dense")
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_without_indices_every_index_with_content_is_searched(retriever, store):
    hits = retriever.search("git push", top_k=3)
    assert {h.index for h in hits} == {"general", "code"}
    assert hits[0].doc_id == "git"


def test_explicit_indices_restrict_the_search(retriever):
    hits = retriever.search("git push", top_k=5, indices="general")
    assert all(h.index == "general" for h in hits)
    assert "git" not in {h.doc_id for h in hits}


def test_domain_routes_to_the_domain_index_and_general(retriever):
    hits = retriever.search("record changes", top_k=5, domain="programming")
    assert {h.index for h in hits} <= {"code", "general"}
    assert hits[0].doc_id == "git"


def test_metadata_filters_keep_only_matching_chunks(retriever):
    hits = retriever.search("bread", top_k=5, indices="general", filters={"topic": "code"})
    assert [h.doc_id for h in hits] == ["python"]
    hits = retriever.search("anything", top_k=5, indices="general",
                            filters={"topic": ["food", "animals"]}, mode="dense")
    assert {h.doc_id for h in hits} == {"bread", "cats"}


def test_expired_news_are_not_returned(store, clock):
    store.index("news").add_documents([Document("storm", "A storm hit the coast today.")])
    r = Retriever(store)
    assert [h.doc_id for h in r.search("storm coast", indices="news")] == ["storm"]
    clock.now += 7 * DAY_S + 1
    assert r.search("storm coast", indices="news") == []


@pytest.mark.parametrize("query,message", [
    ("", "query is empty"),
    ("   \n", "query is empty"),
    ("x" * (MAX_QUERY_CHARS + 1), "over the 4096-character limit"),
    (None, "query must be a string"),
])
def test_bad_queries_are_refused(retriever, query, message):
    with pytest.raises(QueryError, match=message):
        retriever.search(query)


def test_bad_arguments_are_refused(retriever):
    with pytest.raises(QueryError, match="top_k"):
        retriever.search("bread", top_k=0)
    with pytest.raises(UnknownIndexError, match="invalid index name '../sports'"):
        retriever.search("bread", indices=["../sports"])
    with pytest.raises(QueryError, match="unknown search mode 'fuzzy'"):
        retriever.search("bread", mode="fuzzy")


def test_empty_store_returns_no_hits(store):
    assert Retriever(store).search("anything") == []


def test_reranking_without_a_local_model_is_a_clear_error(store, tmp_path):
    with pytest.raises(RerankerUnavailableError, match="no local cross-encoder"):
        Retriever(store, rerank=True)
    with pytest.raises(RerankerUnavailableError, match="never downloads"):
        Retriever(store, rerank=True, reranker_model="cross-encoder/ms-marco-MiniLM-L-6-v2")
    with pytest.raises(RerankerUnavailableError, match="not a local model directory"):
        Retriever(store, rerank=True, reranker_model=tmp_path)


def test_reranking_orders_hits_by_the_cross_encoder(retriever):
    # The bundled MiniLM directory loads as a cross-encoder (its classifier head is new), which
    # is enough to check the plumbing: the final order is the cross-encoder's order.
    reranker = CrossEncoderReranker(default_model_path())
    r = Retriever(retriever.store, reranker=reranker)
    hits = r.search("bread and cats", top_k=4, indices="general")
    assert len(hits) == 4
    expected = reranker.scores("bread and cats", [h.text for h in hits])
    assert [h.score for h in hits] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)


def test_prompt_numbers_sources_and_citations_map_back(retriever):
    hits = retriever.search("bread yeast", top_k=2, indices="general")
    prompt, sources = build_prompt("How is bread made?", hits)
    assert prompt.startswith("Context:\n[1] ")
    assert prompt.endswith("\n\nQuery: How is bread made?")
    assert sources[1]["doc_id"] == hits[0].doc_id
    cited = cited_sources("Knead it [1], see also [7] and [1].", sources)
    assert [c["number"] for c in cited] == [1]


def test_two_chunks_of_one_document_make_one_source_with_both_passages():
    hits = [
        Hit("guide.md", "guide.md#3", "third part", 0.9, "general", 3, {"title": "Guide"}),
        Hit("other.txt", "other.txt#0", "elsewhere", 0.8, "general", 0, {}),
        Hit("guide.md", "guide.md#1", "first part", 0.7, "general", 1, {"title": "Guide"}),
        Hit("guide.md", "guide.md#0", "same id, other index", 0.6, "medical", 0, {}),
    ]
    prompt, sources = build_prompt("q", hits)
    assert list(sources) == [1, 2, 3]
    assert sources[1]["doc_id"] == "guide.md" and sources[1]["index"] == "general"
    assert sources[1]["chunk_id"] == "guide.md#3"  # the best-ranked chunk
    assert sources[1]["chunk_ids"] == ["guide.md#1", "guide.md#3"]  # reading order
    assert sources[1]["positions"] == [1, 3] and sources[1]["score"] == 0.9
    assert "[1] first part" + PASSAGE_SEPARATOR + "third part" in prompt
    assert "[2] elsewhere" in prompt and "[3] same id, other index" in prompt
    assert [s["doc_id"] for s in sources.values()].count("guide.md") == 2  # two indices


def test_a_long_document_retrieved_twice_is_cited_once(store):
    paragraph = ("Sourdough needs a lively starter, fed flour and water every day. " * 12)
    text = paragraph + "\n\n" + paragraph.replace("Sourdough", "A sourdough loaf")
    store.index("general").add_documents([Document("bread.md", text, {"title": "Bread"})])
    hits = Retriever(store).search("sourdough starter flour water", top_k=5)
    assert len({h.chunk_id for h in hits if h.doc_id == "bread.md"}) >= 2
    _, sources = build_prompt("q", hits)
    assert [s["doc_id"] for s in sources.values()].count("bread.md") == 1
