"""The bundled demo assets: manifest integrity, model and experts load, seed questions
retrieve relevant passages from the bundled knowledge snapshot."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from r3mes.assets import ASSETS_DIR, AssetsError, read_manifest, verify_assets

SEED_EXPERTS = {"general_dora", "medical_dora", "coding_dora", "turkish_dora", "legal_dora",
                "finance_dora", "science_dora", "history_dora"}
WHEEL_LIMIT = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def manifest():
    return read_manifest()


@pytest.fixture(scope="module")
def demo():
    from r3mes.core.checkpoint import load_model
    from r3mes.core.tokenizer import Tokenizer

    model, info = load_model(ASSETS_DIR / "demo_model")
    return model, info, Tokenizer(ASSETS_DIR / "demo_model")


def test_every_shipped_file_matches_its_manifest_digest():
    manifest = verify_assets()
    shipped = {p.relative_to(ASSETS_DIR).as_posix() for p in ASSETS_DIR.rglob("*")
               if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
               and p.name != "MANIFEST.json"}
    assert shipped == set(manifest["files"])


def test_an_altered_asset_is_refused(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    target = copy / "demo_model" / "tokenizer.json"
    data = bytearray(target.read_bytes())
    data[10] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(AssetsError, match="tokenizer.json"):
        verify_assets(copy)


def test_a_missing_asset_is_named(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    (copy / "experts" / "medical_dora" / "adapter_config.json").unlink()
    with pytest.raises(AssetsError, match="adapter_config.json.*missing"):
        verify_assets(copy)


def test_assets_fit_well_inside_the_wheel_limit(manifest):
    assert manifest["total_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    assert manifest["total_bytes"] < WHEEL_LIMIT // 2


def test_demo_model_is_packed_bitnet_and_predicts_text_far_better_than_chance(demo):
    model, info, tok = demo
    assert info.format == "r3mes"
    assert model.config.vocab_size == tok.vocab_size
    text = ("It is a truth universally acknowledged, that a single man in possession of a "
            "good fortune, must be in want of a wife. She was the youngest of the two "
            "daughters of a most affectionate, indulgent father.")
    ids = torch.tensor([tok.encode(text)])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    # A uniform guess has perplexity = vocab size (8192); the trained model is far below.
    assert math.exp(float(nll)) < model.config.vocab_size / 8


def test_every_seed_expert_is_bundled_and_loads_into_the_demo_model(demo, manifest):
    from r3mes.core.adapter_io import load_peft_adapter
    from r3mes.core.dora import set_adapter_mix

    model, _, tok = demo
    bundled = {p.name for p in (ASSETS_DIR / "experts").iterdir() if p.is_dir()}
    assert SEED_EXPERTS <= bundled
    assert set(manifest["experts"]) == bundled
    ids = torch.tensor([tok.encode("Insulin resistance is treated with exercise.")])
    set_adapter_mix(model, None)
    base = model(ids)
    for eid in sorted(bundled):
        info = load_peft_adapter(model, ASSETS_DIR / "experts" / eid, eid)
        assert info.rank == 8 and len(info.modules) == 7 * model.config.num_hidden_layers
        set_adapter_mix(model, [(eid, 1.0)])
        out = model(ids)
        assert torch.isfinite(out).all()
        assert not torch.equal(out, base), f"{eid} changes nothing"
    set_adapter_mix(model, None)


def test_bundled_experts_are_known_to_the_router_registry():
    from r3mes.router.registry import load_registry

    registry_ids = {e.id for e in load_registry().experts}
    bundled = {p.name for p in (ASSETS_DIR / "experts").iterdir() if p.is_dir()}
    assert bundled <= registry_ids


def test_model_card_matrix_shows_each_expert_beating_the_base_on_its_domain(manifest):
    results = manifest["training"]["experts"]
    ppl = results["perplexity"]
    for eid in SEED_EXPERTS:
        assert ppl[eid][eid] < ppl["base"][eid], eid


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    from r3mes.rag import RagStore, Retriever

    home = tmp_path_factory.mktemp("home")
    shutil.copytree(ASSETS_DIR / "knowledge" / "rag", home / "rag")
    return Retriever(RagStore(home))


@pytest.mark.parametrize("query, expected", [
    ("Diyabet hastalarında insülin direnci nasıl tedavi edilir?", "med-tr-insulin-direnci-tedavi"),
    ("How do I fix a Python async deadlock?", "code-en-python-async-deadlock"),
])
def test_seed_questions_retrieve_the_relevant_passage_first(retriever, query, expected):
    hits = retriever.search(query, top_k=3)
    assert hits and hits[0].doc_id == expected, [h.doc_id for h in hits]


@pytest.mark.parametrize("query, expected", [
    ("KVKK kapsamında kişisel verilerin silinmesini isteyebilir miyim?", "legal-tr-kvkk"),
    ("How does compound interest work?", "fin-en-compound-interest"),
    ("Cumhuriyet ne zaman ilan edildi?", "hist-tr-cumhuriyet"),
    ("What is the treatment for insulin resistance?", "med-en-insulin-resistance"),
])
def test_domain_questions_retrieve_the_relevant_passage_in_the_top_three(retriever, query,
                                                                         expected):
    # Fusion across indices can tie the top entry of each index, so only the top 3 is fixed.
    hits = retriever.search(query, top_k=3)
    assert expected in [h.doc_id for h in hits], [h.doc_id for h in hits]


def test_knowledge_snapshot_covers_every_bundled_document(retriever):
    import json

    docs = ASSETS_DIR / "knowledge" / "docs"
    expected = {json.loads(line)["id"] for f in docs.glob("*.jsonl")
                for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}
    store = retriever.store
    indexed = {d for name in store.existing() for d in store.index(name).docs}
    assert indexed == expected
    assert len(expected) >= 40
