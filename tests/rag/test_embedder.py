"""Embeddings: the shared offline model, normalised, batched, cached on disk by content."""

from __future__ import annotations

import numpy as np

from r3mes.core.text_encoder import load_sentence_model
from r3mes.rag.embedder import Embedder


def test_embedder_uses_the_shared_sentence_model(embedder):
    assert embedder.model is load_sentence_model()
    assert embedder.dim == 384


def test_embeddings_are_unit_norm_float32_in_input_order(embedder):
    texts = ["the cat sat on the mat", "stock markets fell sharply", "the cat sat on the mat"]
    vecs = embedder.embed(texts)
    assert vecs.dtype == np.float32 and vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[2])
    assert float(vecs[0] @ vecs[1]) < 0.5


def test_batched_embedding_matches_one_at_a_time(tmp_path):
    e = Embedder(cache_dir=None, batch_size=2, show_progress=False)
    texts = [f"sentence about item {i}" for i in range(5)]
    batched = e.embed(texts)
    single = np.stack([e.embed_query(t) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_reembedding_unchanged_text_uses_the_disk_cache(tmp_path):
    texts = ["alpha beta gamma", "delta epsilon"]
    first = Embedder(cache_dir=tmp_path, show_progress=False)
    v1 = first.embed(texts)
    assert first.texts_encoded == 2
    shards = list((tmp_path / first.fingerprint).glob("shard-*.safetensors"))
    assert len(shards) == 1

    second = Embedder(cache_dir=tmp_path, show_progress=False)  # a new process, in effect
    v2 = second.embed(texts + ["new text"])
    assert second.texts_encoded == 1 and second.cache_hits == 2
    np.testing.assert_array_equal(v1, v2[:2])


def test_a_corrupted_cache_shard_is_ignored_and_recomputed(tmp_path):
    first = Embedder(cache_dir=tmp_path, show_progress=False)
    expected = first.embed(["some cached text"])
    (shard,) = (tmp_path / first.fingerprint).glob("shard-*.safetensors")
    shard.write_bytes(b"garbage, not safetensors")
    second = Embedder(cache_dir=tmp_path, show_progress=False)
    again = second.embed(["some cached text"])
    assert second.texts_encoded == 1
    np.testing.assert_allclose(again, expected, atol=1e-6)


def test_empty_input_gives_an_empty_matrix(embedder):
    assert embedder.embed([]).shape == (0, 384)
