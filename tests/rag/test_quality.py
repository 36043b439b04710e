"""Retrieval quality on a small judged query set (see rag_judged.py) built from the shared
Turkish help pages and Pride and Prejudice. Skipped when /work/shared/data is absent.

Measured on this set (171 chunks of <= 200 tokens, 36 queries; see the report of issue #8):
dense recall@5 0.83 / MRR 0.60, BM25 0.94 / 0.83, hybrid (RRF) 0.94 / 0.80. The floors are
those figures minus a margin, so a regression fails while run-to-run noise does not.
"""

from __future__ import annotations

import pytest
import rag_judged as judged

from r3mes.rag import RagStore, Retriever
from r3mes.rag.indices import IndexConfig

pytestmark = pytest.mark.skipif(not judged.available(), reason="shared data folder is absent")

FLOORS = {  # mode: (recall@5, MRR@5)
    "dense": (0.65, 0.45),
    "sparse": (0.80, 0.70),
    "hybrid": (0.85, 0.65),
}


@pytest.fixture(scope="module")
def quality(tmp_path_factory, embedder):
    store = RagStore(tmp_path_factory.mktemp("quality-home"), embedder=embedder,
                     configs={"general": IndexConfig(max_tokens=200, overlap=30)})
    store.index("general").add_documents(judged.build_corpus())
    retriever = Retriever(store)
    return store, {mode: judged.evaluate(retriever, mode) for mode in FLOORS}


def test_every_judgement_points_at_indexed_text(quality):
    store, _ = quality
    ix = store.index("general")
    assert 120 <= len(ix) <= 300  # "a few hundred chunks" keeps the test fast
    for _, rel in judged.TURKISH:
        assert rel <= set(ix.docs)
    for _, phrase in judged.ENGLISH:
        assert any(judged._norm(phrase) in judged._norm(r.text) for r in ix.records.values())


@pytest.mark.parametrize("mode", list(FLOORS))
def test_recall_and_mrr_stay_above_measured_floors(quality, mode):
    _, results = quality
    recall_floor, mrr_floor = FLOORS[mode]
    assert results[mode]["recall"] >= recall_floor, results
    assert results[mode]["mrr"] >= mrr_floor, results


def test_hybrid_recall_beats_dense_alone(quality):
    _, results = quality
    # MiniLM is an English model; BM25 with Turkish stemming carries the Turkish queries and
    # fusion must keep that (measured: hybrid 0.94 vs dense 0.83).
    assert results["hybrid"]["recall"] >= results["dense"]["recall"] + 0.08, results
    assert results["hybrid"]["recall"] >= results["sparse"]["recall"] - 0.03, results
