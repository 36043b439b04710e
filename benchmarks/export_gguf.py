"""The bench_serving model as a GGUF (TQ2_0) for llama-server: the same ternary weights.

llama.cpp's converter reads Hugging Face directories, so this writes the r3mes-format model
as one (``BitnetForCausalLM``: ternary weights as bf16 values of +-1/s_w and 0, norms,
embeddings; llama.cpp's BitNet graph ties the output to the embeddings, so the GGUF reads the
same number of head bytes) with a SentencePiece tokenizer trained here on the demo model's
knowledge texts (llama.cpp's BitNet converter reads SentencePiece only; its vocabulary is
padded to the model's), then runs llama.cpp's ``convert_hf_to_gguf.py --outtype tq2_0``.

    pip install sentencepiece
    bash benchmarks/build_llama_server.sh /tmp/r3mes-llama
    python benchmarks/export_gguf.py /tmp/r3mes-bench-serving/model /tmp/r3mes-llama
    python benchmarks/export_gguf.py /tmp/r3mes-bench-serving/model /tmp/r3mes-llama \
        --quantize TQ2_0 TQ1_0          # + bench-tq2_0-q6k.gguf, bench-tq1_0-q6k.gguf

``--quantize`` runs ``llama-quantize --allow-requantize --token-embedding-type q6_K`` on the
converter's GGUF for each type: the ternary tensors requantise exactly (TQ1_0 and TQ2_0 both
hold every ternary value), and the embedding, which llama.cpp's BitNet graph also reads as
the head, becomes Q6_K (``--head-type``), as llama.cpp's own BitNet GGUFs ship it. The HF
directory written on the way (``<llama_dir>/hf-export``) is also what bitnet.cpp's converter
reads (benchmarks/build_bitnet_cpp.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def write_hf(model_dir: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from r3mes.core.checkpoint import load_model

    model, _ = load_model(model_dir)
    cfg = model.config
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": model.model.embed_tokens.weight.to(torch.bfloat16),
               "model.norm.weight": model.model.norm.weight.detach().to(torch.bfloat16)}
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        for path, module in (("self_attn.q_proj", layer.self_attn.q_proj),
                             ("self_attn.k_proj", layer.self_attn.k_proj),
                             ("self_attn.v_proj", layer.self_attn.v_proj),
                             ("self_attn.o_proj", layer.self_attn.o_proj),
                             ("mlp.gate_proj", layer.mlp.gate_proj),
                             ("mlp.up_proj", layer.mlp.up_proj),
                             ("mlp.down_proj", layer.mlp.down_proj)):
            tw = module.base.ternary
            w = tw.unpack().to(torch.float32) / tw.scale
            tensors[pre + path + ".weight"] = w.to(torch.bfloat16)
        norms = {"input_layernorm": layer.input_layernorm,
                 "post_attention_layernorm": layer.post_attention_layernorm,
                 "self_attn.inner_attn_ln": layer.self_attn.attn_sub_norm,
                 "mlp.ffn_layernorm": layer.mlp.ffn_sub_norm}
        for name, norm in norms.items():
            tensors[pre + name + ".weight"] = norm.weight.detach().to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["BitnetForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "relu2", "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16"}))


def train_tokenizer(out: Path) -> None:
    import sentencepiece as spm

    from r3mes.serving.inference_pipeline import assets_dir

    docs = assets_dir() / "knowledge" / "docs"
    lines = []
    for f in sorted(docs.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                lines.append(json.loads(line).get("text", ""))
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"),
                                   vocab_size=2000, model_type="bpe", bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, hard_vocab_limit=False,
                                   byte_fallback=True)  # any prompt tokenises
    corpus.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, help="r3mes-format model (bench_serving's)")
    ap.add_argument("llama_dir", type=Path, help="build_llama_server.sh's output folder")
    ap.add_argument("--outfile", type=Path, help="default: <llama_dir>/bench-tq2_0.gguf")
    ap.add_argument("--quantize", nargs="*", default=[], metavar="TYPE",
                    help="also write <llama_dir>/bench-<type>-<head type>.gguf for each "
                    "llama-quantize type (e.g. TQ2_0 TQ1_0)")
    ap.add_argument("--head-type", default="q6_K",
                    help="embedding/head type of the --quantize outputs (default q6_K)")
    args = ap.parse_args()
    hf = args.llama_dir / "hf-export"
    if not (hf / "model.safetensors").is_file():
        write_hf(args.model_dir, hf)
    if not (hf / "tokenizer.model").is_file():
        train_tokenizer(hf)
    outfile = args.outfile or args.llama_dir / "bench-tq2_0.gguf"
    src = args.llama_dir / "src"
    env_path = f"{src / 'gguf-py'}"
    if not outfile.is_file():
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf),
                        "--outtype", "tq2_0", "--outfile", str(outfile)], check=True,
                       env={**os.environ, "PYTHONPATH": env_path})
    print(outfile)
    quantize = args.llama_dir / "build" / "bin" / "llama-quantize"
    for qtype in args.quantize:
        head = args.head_type.lower().replace("_", "")
        out = args.llama_dir / f"bench-{qtype.lower()}-{head}.gguf"
        tmp = out.with_suffix(".gguf.tmp")
        res = subprocess.run([str(quantize), "--allow-requantize", "--token-embedding-type",
                              args.head_type, str(outfile), str(tmp), qtype],
                             capture_output=True, text=True)  # a line per tensor: quiet
        if res.returncode:
            sys.exit(f"{quantize} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        tmp.replace(out)  # a killed run never leaves a truncated GGUF under the final name
        print(out)


if __name__ == "__main__":
    main()
