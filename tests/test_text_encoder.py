"""The shared query embedding: one forward pass per query for router and RAG together."""

from __future__ import annotations

import threading

import numpy as np

from r3mes.core import text_encoder


def test_concurrent_callers_share_one_embedding(monkeypatch) -> None:
    model = text_encoder.load_sentence_model()
    calls = []
    original = model.encode

    def counting_encode(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode", counting_encode)
    query = "concurrent callers share one embedding 7f3a"
    results = [None] * 4

    def worker(i: int) -> None:
        results[i] = text_encoder.encode_query(query)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(np.array_equal(r, results[0]) for r in results)
    assert abs(float(np.linalg.norm(results[0])) - 1.0) < 1e-5
    assert not results[0].flags.writeable


def test_query_embedding_equals_a_direct_encode() -> None:
    text = "İnsülin direnci nasıl tedavi edilir?"
    direct = text_encoder.load_sentence_model().encode(
        [text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)[0]
    np.testing.assert_allclose(text_encoder.encode_query(text), direct, rtol=1e-6, atol=1e-6)
