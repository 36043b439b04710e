"""The scripts that build the demo assets: the tokenizer is deterministic, base training runs
through the library model and its export loads back with the same logits, and it resumes
exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from train_tokenizer import build_tokenizer, write_tokenizer  # noqa: E402

from r3mes.core.model import BitNetConfig, BitNetForCausalLM  # noqa: E402

TEXTS = [
    "Diyabet hastalarında insülin direnci egzersiz ve beslenme ile azaltılabilir. " * 3,
    "The event loop runs one task at a time; a blocking call freezes every task. " * 3,
    "It is a truth universally acknowledged, that a single man must be in want of a wife. " * 3,
    "Türkiye Cumhuriyeti 29 Ekim 1923'te ilan edildi ve Ankara başkent oldu. " * 3,
]


@pytest.fixture()
def tiny_tokenizer(tmp_path):
    tok = build_tokenizer(TEXTS, vocab_size=320)
    write_tokenizer(tok, tmp_path / "tok")
    return tmp_path / "tok"


def test_tokenizer_training_is_deterministic():
    a = build_tokenizer(TEXTS, vocab_size=320).to_str()
    b = build_tokenizer(list(TEXTS), vocab_size=320).to_str()
    assert a == b


def test_tokenizer_has_the_special_tokens_and_round_trips_turkish(tiny_tokenizer):
    from r3mes.core.tokenizer import Tokenizer

    tok = Tokenizer(tiny_tokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "İnsülin direnci nasıl tedavi edilir? Çğış öü."
    assert tok.decode(tok.encode(text)) == text


def test_exported_training_model_loads_in_r3mes_with_the_same_logits(tmp_path, tiny_tokenizer):
    from train_base import export_hf

    from r3mes.core.checkpoint import load_model

    torch.manual_seed(0)
    cfg = BitNetConfig(vocab_size=320, hidden_size=64, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = BitNetForCausalLM.for_training(cfg).eval()
    export_hf(model, tiny_tokenizer, tmp_path / "hf", {"test": True})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BitNetForCausalLM"]
    assert config["model_type"] == "bitnet"
    loaded, info = load_model(tmp_path / "hf", head="float")
    assert info.format.startswith("hf")
    ids = torch.randint(0, 320, (2, 19))
    with torch.no_grad():
        expected = model(ids)
    torch.testing.assert_close(loaded(ids), expected, rtol=1e-4, atol=1e-4)


def test_base_training_resumed_midway_ends_with_identical_weights(tmp_path, tiny_tokenizer):
    import train_base

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 20), encoding="utf-8")
    corpora = tmp_path / "corpora.json"
    corpora.write_text(json.dumps({"corpora": [
        {"name": "tiny", "path": str(corpus), "format": "text", "weight": 1.0}]}))
    common = ["--tokenizer", str(tiny_tokenizer), "--corpora", str(corpora), "--steps", "4",
              "--batch", "2", "--seq", "16", "--hidden", "64", "--intermediate", "256",
              "--layers", "1", "--heads", "2", "--kv-heads", "1", "--eval-windows", "1",
              "--ckpt-every", "1", "--warmup", "1", "--heldout-frac", "0.1", "--threads", "1"]
    assert train_base.main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert train_base.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "split" / "hf").exists()
    assert train_base.main([*common, "--out", str(tmp_path / "split")]) == 0
    a = load_file(str(tmp_path / "straight" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    record = json.loads((tmp_path / "split" / "hf" / "training.json").read_text())
    assert record["steps"] == 4 and record["heldout_perplexity"]["perplexity"]["all"] > 1
