"""A replica of the ``microsoft/bitnet-b1.58-2B-4T`` directory at a tiny shape.

Same files and keys as the real one: ``config.json`` (``BitNetForCausalLM``, a
``quantization_config`` of ``quant_method: bitnet, linear_class: autobitlinear,
quantization_mode: offline``), ``model.safetensors`` with packed uint8 projections
``[out/4, in]`` and a bf16 ``weight_scale`` each (autobitlinear *multiplies* by it), bf16
embeddings and norms, a Llama-3-style byte-level BPE ``tokenizer.json`` whose special
tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|start_header_id|>``,
``<|end_header_id|>``, ``<|eot_id|>``) follow the trained vocabulary, a
``tokenizer_config.json`` with Llama 3's chat template, and a ``generation_config.json``
that lists two EOS ids (end of text, end of turn). Random weights, built here: nothing
downloads.

The weights are random except for a planted path so that greedy decoding of a chat
prompt is known: the prompt's last token (the ``\\n\\n`` after the assistant header) leads
to the word token :data:`ANSWER`, and that token leads to ``<|eot_id|>``. Each lead is a
large embedding coordinate read by a large LM-head row (the residual stream carries a
token's embedding to the head), so the planted answer is one word, then end of turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's chat template (meta-llama/Meta-Llama-3-8B-Instruct), verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a ternary model runs fast on a small cpu",
    "experts are mixed in by the router for every query",
    "hello world, this is r3mes speaking about bitnet models",
    "what is the capital of france? paris is the capital.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ! ?",
    "system\n\nuser\n\nassistant\n\n paris paris paris",
] * 4
ANSWER = "Ġparis"  # the planted one-word answer (byte-level BPE: "Ġ" is a leading space)
VOCAB = 384
SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def write_llama3_tokenizer(root: Path) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json; returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIALS)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    # Llama 3 prepends <|begin_of_text|> in the post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False,
                                          "rstrip": False, "normalized": False,
                                          "single_word": False} for t, i in ids.items()},
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return ids


def _pack(t: torch.Tensor) -> torch.Tensor:
    """transformers' pack_weights: row i*out/4 + r of T sits in bits 2i..2i+1 of row r."""
    from transformers.integrations.bitnet import pack_weights

    return pack_weights(t.clone())


def build(root: Path, seed: int = 0) -> dict[str, int]:
    """Writes the replica directory; returns the special token ids and ``answer``."""
    from safetensors.torch import save_file

    from r3mes.kernels import reference

    root.mkdir(parents=True, exist_ok=True)
    ids = write_llama3_tokenizer(root)
    vocab = json.loads((root / "tokenizer.json").read_text())["model"]["vocab"]
    answer = vocab[ANSWER]
    bos, eot, eos = ids["<|begin_of_text|>"], ids["<|eot_id|>"], ids["<|end_of_text|>"]
    h, ffn, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    heads, kv = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    hd = h // heads
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    tensors: dict[str, torch.Tensor] = {}
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv * hd, h),
              "self_attn.v_proj": (kv * hd, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h), "mlp.down_proj": (h, ffn)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, (o, n) in shapes.items():
            w = 0.1 * torch.randn(o, n, generator=g)
            s = reference.weight_scale(w)
            tensors[p + name + ".weight"] = _pack(reference.quantize_weight(w, s))
            tensors[p + name + ".weight_scale"] = (1.0 / s).reshape(1).to(bf)
        for name, n in (("input_layernorm", h), ("post_attention_layernorm", h),
                        ("self_attn.attn_sub_norm", h), ("mlp.ffn_sub_norm", ffn)):
            tensors[p + name + ".weight"] = (1 + 0.2 * torch.randn(n, generator=g)).to(bf)
    tensors["model.norm.weight"] = (1 + 0.1 * torch.rand(h, generator=g)).to(bf)
    embed = torch.randn(VOCAB, h, generator=g)
    head = 0.3 * torch.randn(VOCAB, h, generator=g)
    # The planted path: "\n\n" -> ANSWER (coordinate 1), ANSWER -> <|eot_id|> (coordinate 0).
    nl = vocab["ĊĊ"]
    embed[nl, :2] = torch.tensor([0.0, 30.0])
    embed[answer, :2] = torch.tensor([30.0, 0.0])
    head[:, :2] = 0.0
    head[answer, 1] = 6.0
    head[eot, 0] = 6.0
    tensors["model.embed_tokens.weight"] = embed.to(bf)
    tensors["lm_head.weight"] = head.to(bf)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": bos,
        "eos_token_id": eos, "hidden_act": "relu2", "hidden_size": h,
        "initializer_range": 0.02, "intermediate_size": ffn,
        "max_position_embeddings": 4096, "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": VOCAB,
        "quantization_config": {"linear_class": "autobitlinear", "quant_method": "bitnet",
                                "quantization_mode": "offline"}}))
    (root / "generation_config.json").write_text(json.dumps({
        "bos_token_id": bos, "do_sample": True, "eos_token_id": [eos, eot],
        "temperature": 0.6, "top_p": 0.9}))
    return {**ids, "answer": answer}
