"""A DoRA expert trains through the real BitNet model and lowers its loss."""

from __future__ import annotations

import torch

from r3mes.core.model import (
    LINEAR_NAMES,
    BitNetConfig,
    BitNetForCausalLM,
    LMHead,
    bitlinear_from_packed,
)
from r3mes.core.trainer import evaluate_perplexity, train_adapter
from r3mes.kernels import quantize_weight


class _CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]


def _tiny_model() -> BitNetForCausalLM:
    cfg = BitNetConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64),
              "self_attn.v_proj": (32, 64), "self_attn.o_proj": (64, 64),
              "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128)}
    layers = [{name.split(".")[1]: bitlinear_from_packed(
        quantize_weight(torch.randn(*shapes[name], generator=g))) for name in LINEAR_NAMES}
        for _ in range(2)]
    embed = torch.randn(256, 64, generator=g)
    return BitNetForCausalLM(cfg, embed, layers, LMHead.from_float(embed))


def test_adapter_trains_through_the_model_and_lowers_perplexity(tmp_path) -> None:
    model = _tiny_model()
    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = _CharTokenizer()
    before = evaluate_perplexity(model, [text], tokenizer=tok, seq_len=32)
    result = train_adapter(model, [text], tokenizer=tok, output_dir=tmp_path / "fox",
                           steps=30, seq_len=32, batch_size=4, rank=4, lr=1e-2,
                           adapter_name="fox", progress=False)
    after = evaluate_perplexity(model, [text], tokenizer=tok, seq_len=32)
    assert result.losses[-1] < result.losses[0]
    assert after < before * 0.9
    assert (tmp_path / "fox" / "adapter_model.safetensors").is_file()
