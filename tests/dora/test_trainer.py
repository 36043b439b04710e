"""The adapter trainer on a tiny causal LM built from BitLinearDoRA layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from r3mes.core.adapter_io import read_peft_adapter
from r3mes.core.bitlinear import BitLinear
from r3mes.core.dora import BitLinearDoRA, dora_modules, set_adapter_mix
from r3mes.core.trainer import evaluate_perplexity, load_texts, train_adapter

DOMAIN = ("the ternary kernel packs weights in two bits and the dora expert adapts "
          "the frozen base with a low rank update and a magnitude vector. ") * 12


class ByteTokenizer:
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class TinyLM(nn.Module):
    """Embedding -> 2 residual MLP blocks of BitLinearDoRA -> frozen float head."""

    def __init__(self, vocab: int = 256, hidden: int = 48) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.embed.weight.data = torch.randn(vocab, hidden, generator=g)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.mlp = nn.Module()
            block.mlp.up_proj = BitLinearDoRA(BitLinear(hidden, 96).freeze())
            block.mlp.down_proj = BitLinearDoRA(BitLinear(96, hidden).freeze())
            self.model.layers.append(block)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight.data = torch.randn(vocab, hidden, generator=g) / hidden**0.5

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.model.layers:
            h = h + block.mlp.down_proj(torch.relu(block.mlp.up_proj(h)))
        return self.head(h)


def _train(tmp_path, sub, **kw):
    model = TinyLM()
    res = train_adapter(model, [DOMAIN], tokenizer=ByteTokenizer(), output_dir=tmp_path / sub,
                        rank=4, alpha=8.0, steps=kw.pop("steps", 12), batch_size=4, seq_len=32,
                        lr=1e-2, progress=False, checkpoint_every=4, **kw)
    return model, res


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v for p, m in dora_modules(model).items()
            for k, v in m.adapter_tensors("expert").items()}


def test_training_lowers_the_loss_and_saves_a_peft_adapter(tmp_path):
    model, res = _train(tmp_path, "a", steps=30)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.9 * first
    config, tensors = read_peft_adapter(res.output_dir)
    assert config["use_dora"] and config["r"] == 4 and len(tensors) == 12
    tok = ByteTokenizer()
    trained = evaluate_perplexity(model, [DOMAIN], tokenizer=tok, seq_len=32)
    set_adapter_mix(model, None)
    bare = evaluate_perplexity(model, [DOMAIN], tokenizer=tok, seq_len=32)
    assert trained < bare
    assert not any(p.requires_grad for p in model.parameters())  # frozen again afterwards


def test_same_seed_gives_the_same_adapter(tmp_path):
    m1, r1 = _train(tmp_path, "a")
    m2, r2 = _train(tmp_path, "b")
    assert r1.losses == r2.losses
    s1, s2 = _adapter_state(m1), _adapter_state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    full, full_res = _train(tmp_path, "full")
    part, part_res = _train(tmp_path, "split", max_steps_this_run=6)
    assert part_res.steps == 6 and part_res.output_dir is None
    resumed, res = _train(tmp_path, "split")
    assert res.resumed_from == 6 and res.steps == 12
    assert res.losses == full_res.losses[6:]
    a, b = _adapter_state(full), _adapter_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_other_settings_is_refused(tmp_path):
    _train(tmp_path, "x", max_steps_this_run=4)
    with pytest.raises(ValueError, match="rank=4 but this run has 8"):
        train_adapter(TinyLM(), [DOMAIN], tokenizer=ByteTokenizer(), output_dir=tmp_path / "x",
                      rank=8, alpha=8.0, steps=12, batch_size=4, seq_len=32, lr=1e-2,
                      progress=False, checkpoint_every=4)


def test_load_texts_reads_txt_and_jsonl_and_names_bad_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n")
    assert load_texts(tmp_path / "a.txt") == ["first para", "second para"]
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_texts(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2"):
        load_texts(tmp_path / "b.jsonl")
