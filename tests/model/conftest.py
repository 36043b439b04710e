"""Tiny BitNet checkpoints built with transformers itself, in HF's float and packed forms."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# transformers' BitLinear methods are wrapped in torch.compile; eager is what we compare to.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

VOCAB = 320
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a ternary model runs fast on a small cpu",
    "experts are mixed in by the router for every query",
    "hello world, this is r3mes speaking about bitnet models",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ! ?",
] * 4


def write_tokenizer(root: Path) -> None:
    """A small byte-level BPE tokenizer trained here (no download), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE}))


def hf_config(**overrides):
    from transformers import BitNetConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
              initializer_range=0.1)
    kw.update(overrides)
    return BitNetConfig(**kw)


def random_hf_model(seed: int = 0, **overrides):
    """A float transformers BitNetForCausalLM with random weights (norms too)."""
    from transformers import BitNetForCausalLM

    torch.manual_seed(seed)
    model = BitNetForCausalLM(hf_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
    return model


def quantize_like_hf(model, linear_class: str, mode: str):
    """Swap the projections for transformers' own BitNet layers (in place).

    ``bitlinear``/offline: packed uint8 weights and weight_scale = s_w (what HF checkpoints
    ship); ``autobitlinear``/online: float weights quantised in every forward.
    """
    from transformers.integrations.bitnet import pack_weights, replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    from r3mes.kernels import reference

    state = {k: v.clone() for k, v in model.state_dict().items()}
    qc = BitNetQuantConfig(linear_class=linear_class, quantization_mode=mode)
    replace_with_bitnet_linear(model, quantization_config=qc, modules_to_not_convert=["lm_head"])
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind == "BitLinear":
            w = state[name + ".weight"]
            s = reference.weight_scale(w)
            mod.weight = torch.nn.Buffer(pack_weights(reference.quantize_weight(w, s)))
            mod.weight_scale = torch.nn.Buffer(s.reshape(1).float())
            mod.dtype = torch.float32
        elif kind == "AutoBitLinear":
            mod.weight = torch.nn.Parameter(state[name + ".weight"], requires_grad=False)
    model.load_state_dict({k: v for k, v in state.items() if "_proj" not in k}, strict=False)
    model.config.quantization_config = qc
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """{"float": dir, "packed": dir, "sharded": dir} and the transformers reference models."""
    root = tmp_path_factory.mktemp("hf")
    float_model = random_hf_model()
    float_dir = root / "float"
    float_model.save_pretrained(float_dir)
    write_tokenizer(float_dir)
    sharded = root / "sharded"
    float_model.save_pretrained(sharded, max_shard_size="40KB")
    write_tokenizer(sharded)
    # Untied head here (the float checkpoints are tied): both forms are covered, and an
    # untied random model does not just repeat its input token.
    packed_model = quantize_like_hf(random_hf_model(tie_word_embeddings=False), "bitlinear",
                                    "offline")
    packed_dir = root / "packed"
    packed_model.save_pretrained(packed_dir)
    write_tokenizer(packed_dir)
    online_model = quantize_like_hf(random_hf_model(), "autobitlinear", "online")
    return {"float": float_dir, "packed": packed_dir, "sharded": sharded,
            "hf_packed_model": packed_model, "hf_online_model": online_model}


@pytest.fixture(scope="session")
def r3mes_dir(hf_dirs, tmp_path_factory):
    from r3mes.core.checkpoint import convert

    dst = tmp_path_factory.mktemp("r3mes") / "tiny"
    convert(hf_dirs["packed"], dst)
    return dst
