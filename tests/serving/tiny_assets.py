"""Small but real assets for the serving tests: a random-weight BitNet model in the HF float
format (config.json + model.safetensors + a BPE tokenizer trained here), PEFT DoRA experts
that fit it, and a few knowledge-base documents."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS

CORPUS = [
    "Diyabet hastalarında insülin direnci nasıl tedavi edilir? Metformin ilk tercihtir.",
    "İnsülin direnci yaşam tarzı değişikliği, diyet ve egzersiz ile azalır.",
    "How to implement a binary search tree in Python? Use a Node class with left and right.",
    "Python'da for loop nasıl yazılır? for i in range(10): print(i)",
    "The court ruled that the contract was void. Sözleşme hükümsüz sayıldı.",
    "Stocks and bonds form a portfolio; faiz oranları yükseldi.",
    "The answer is short. Cevap kısadır. Hello world, merhaba dünya.",
] * 4

DOCUMENTS = {
    "medical": [
        ("med_metformin", "İnsülin direnci tedavisinde metformin ilk tercih edilen ilaçtır. "
         "Diyabet hastalarında yaşam tarzı değişikliği, düzenli egzersiz ve kilo kaybı "
         "insülin duyarlılığını artırır.", {"title": "İnsülin direnci tedavisi"}),
        ("med_hypertension", "High blood pressure is treated with lifestyle changes and "
         "medicines such as ACE inhibitors.", {"title": "Hypertension"}),
    ],
    "code": [
        ("code_bst", "A binary search tree in Python stores keys in nodes; each node has a "
         "left child with smaller keys and a right child with larger keys. Insert and search "
         "walk down from the root.", {"title": "Binary search trees in Python"}),
        ("code_loops", "Python'da for döngüsü: for i in range(10): print(i). while döngüsü "
         "bir koşul doğru olduğu sürece çalışır.", {"title": "Python döngüleri"}),
    ],
    "legal": [
        ("legal_contract", "A contract is void when an essential element such as consent is "
         "missing. Sözleşmenin geçersizliği mahkemece tespit edilir.",
         {"title": "Void contracts"}),
    ],
}

EXPERTS = ("medical_dora", "coding_dora", "general_dora", "turkish_dora", "legal_dora")


def train_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer with ``<s>``, ``</s>``, ``<pad>``; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "add_bos_token": False}))
    return tok.get_vocab_size(with_added_tokens=True)


def linear_shapes() -> dict[str, tuple[int, int]]:
    kv = KV_HEADS * HEAD_DIM
    return {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }


def write_model(directory: Path, seed: int = 0) -> Path:
    """A random BitNet model (HF float weights, quantised by r3mes at load)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(directory)
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=gen),
               "model.norm.weight": torch.ones(HIDDEN),
               "lm_head.weight": torch.randn(vocab, HIDDEN, generator=gen) * 0.5}
    for i in range(LAYERS):
        for name, (out_f, in_f) in linear_shapes().items():
            tensors[f"model.layers.{i}.{name}.weight"] = torch.randn(out_f, in_f, generator=gen)
        for norm, n in (("input_layernorm", HIDDEN), ("post_attention_layernorm", HIDDEN),
                        ("self_attn.attn_sub_norm", HIDDEN), ("mlp.ffn_sub_norm", INTERMEDIATE)):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(n)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "relu2", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }))
    return directory


def write_expert(directory: Path, seed: int, rank: int = 4) -> Path:
    """A PEFT DoRA adapter on every projection of the tiny model."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1000 + seed)
    tensors = {}
    for i in range(LAYERS):
        for name, (out_f, in_f) in linear_shapes().items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.1
            tensors[f"{prefix}.lora_magnitude_vector"] = (
                torch.rand(out_f, generator=gen) + 0.5) * in_f ** 0.5
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "use_dora": True, "r": rank, "lora_alpha": 2 * rank,
        "use_rslora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"],
        "base_model_name_or_path": "r3mes-tests/tiny-bitnet", "task_type": "CAUSAL_LM"}))
    return directory


def write_experts(directory: Path, ids: tuple[str, ...] = EXPERTS) -> Path:
    for n, expert in enumerate(ids):
        write_expert(directory / expert, seed=n)
    return directory
