"""BitNet runner at the exact 2B-4T shape with random weights: load, prefill, decode, RSS.

Shape: hidden 2560, intermediate 6912, 30 layers, 20 heads / 5 KV heads, vocab 128256,
tied embeddings. The weights are random (generated on first use into
``$R3MES_BENCH_DIR``, default ``/tmp/r3mes-bench-2b``; never shipped): an HF *packed*
directory (what microsoft/bitnet-b1.58-2B-4T ships) and its r3mes conversion.

Run:
    python benchmarks/bench_model.py                      # the full table
    python benchmarks/bench_model.py --threads 2 --experts 0 3
    python -m pytest benchmarks/bench_model.py -s         # the same, as a pytest-benchmark

Every configuration runs in a fresh process so that its peak RSS is its own. Reported:
load time (HF packed dir vs r3mes packed), prefill tok/s (128-token prompt), decode tok/s
(128 new tokens, one at a time, with the KV cache), peak RSS, and the bandwidth floor
(bytes read per decoded token / measured memory bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPE = dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
             num_attention_heads=20, num_key_value_heads=5, max_position_embeddings=4096,
             rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
             hidden_act="relu2", bos_token_id=128000, eos_token_id=128001,
             model_type="bitnet", architectures=["BitNetForCausalLM"],
             quantization_config={"quant_method": "bitnet", "linear_class": "bitlinear",
                                  "quantization_mode": "offline"})
BENCH_DIR = Path(os.environ.get("R3MES_BENCH_DIR", "/tmp/r3mes-bench-2b"))
PROMPT_LEN = 128
DECODE_TOKENS = 128


def build(root: Path = BENCH_DIR, layers: int | None = None) -> tuple[Path, Path]:
    """Write the random HF packed directory and its r3mes conversion (once)."""
    from r3mes.core.checkpoint import FORMAT_VERSION, convert
    from r3mes.core.model import LINEAR_NAMES
    from r3mes.utils.safetensors_io import write_safetensors

    hf, r3 = root / "hf-packed", root / "r3mes"
    manifest = r3 / "r3mes_model.json"
    if manifest.exists():
        if json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION:
            return hf, r3
        if (hf / "model.safetensors").exists():  # an older r3mes format: convert again
            convert(hf, r3)
            return hf, r3
    cfg = dict(SHAPE)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    tensors: dict[str, torch.Tensor] = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in LINEAR_NAMES:
            out_f, in_f = shapes[name]
            codes = torch.randint(0, 3, (4, out_f // 4, in_f), dtype=torch.uint8, generator=g)
            tensors[p + name + ".weight"] = (codes[0] | codes[1] << 2 | codes[2] << 4
                                             | codes[3] << 6)
            tensors[p + name + ".weight_scale"] = torch.tensor([1.0 / (0.02 + 0.001 * i)],
                                                               dtype=torch.bfloat16)
        for norm, n in (("input_layernorm", h), ("post_attention_layernorm", h),
                        ("self_attn.attn_sub_norm", h), ("mlp.ffn_sub_norm", inter)):
            tensors[p + norm + ".weight"] = (1 + 0.1 * torch.randn(n, generator=g)).bfloat16()
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    emb = torch.empty(v, h, dtype=torch.bfloat16)
    for r in range(0, v, 16384):
        emb[r:r + 16384] = (0.02 * torch.randn(min(16384, v - r), h, generator=g)).bfloat16()
    tensors["model.embed_tokens.weight"] = emb
    write_safetensors(hf / "model.safetensors", tensors, {"format": "pt"})
    del tensors, emb
    convert(hf, r3)
    return hf, r3


def _add_experts(model, n: int, rank: int = 16) -> None:
    from r3mes.core.dora import dora_modules, set_adapter_mix

    g = torch.Generator().manual_seed(1)
    names = [f"e{i}" for i in range(n)]
    for mod in dora_modules(model).values():
        for name in names:
            a = torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5
            b = 0.01 * torch.randn(mod.out_features, rank, generator=g)
            m = 1.0 + 0.01 * torch.rand(mod.out_features, generator=g)
            mod.load_adapter(name, a, b, m, 2.0)
    set_adapter_mix(model, [(name, 1.0 / n) for name in names] if names else None)


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM belongs to the address space exec created, while
    getrusage's ru_maxrss survives fork + exec and can report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, threads: int, experts: int, decode: bool) -> dict:
    """One measurement in this process (called through a subprocess by :func:`run`)."""
    from r3mes import kernels
    from r3mes.core.backends import BitNetCppBackend
    from r3mes.core.checkpoint import load_model

    kernels.set_num_threads(threads)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, info = load_model(path)
    out = {"load_s": time.perf_counter() - t0, "format": info.format}
    if decode:
        backend = BitNetCppBackend()
        backend.model = model
        if experts:
            from r3mes.core.dora import dora_modules

            # the native backend's default adapter storage (int8)
            for mod in dora_modules(model).values():
                mod.storage = backend.adapter_storage
            _add_experts(model, experts)
        ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(2))
        cache = model.new_cache(1, PROMPT_LEN + DECODE_TOKENS + 1)
        t0 = time.perf_counter()
        logits = backend._forward(ids, cache, True)
        out["prefill_tok_s"] = PROMPT_LEN / (time.perf_counter() - t0)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        backend._forward(tok, cache, True)  # warm: first decode call
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS - 1):
            tok = backend._forward(tok, cache, True)[:, -1].argmax(-1, keepdim=True)
        out["decode_tok_s"] = (DECODE_TOKENS - 1) / (time.perf_counter() - t0)
        out["bytes_per_token"] = sum(model.num_parameters_bytes()[k]
                                     for k in ("ternary", "lm_head"))
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def run(path: Path, threads: int, experts: int, decode: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(threads),
           "--experts", str(experts)] + ([] if decode else ["--load-only"])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bandwidth_gbs(threads: int) -> float:
    """A quick read-bandwidth measurement (sum over a 512 MB buffer)."""
    torch.set_num_threads(threads)
    buf = np.ones(1 << 27, dtype=np.float32)
    t = torch.from_numpy(buf)
    t.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        t.sum()
    return 3 * buf.nbytes / (time.perf_counter() - t0) / 1e9


def table(threads_list: list[int], experts_list: list[int]) -> list[dict]:
    hf, r3 = build()
    rows = []
    for fmt, path in (("hf-packed", hf), ("r3mes", r3)):
        r = run(path, 2, 0, decode=False)
        rows.append({"what": f"load {fmt}", **r})
    for threads in threads_list:
        bw = bandwidth_gbs(threads)
        for experts in experts_list:
            r = run(r3, threads, experts)
            floor = bw * 1e9 / r["bytes_per_token"]
            rows.append({"what": f"{threads} thr, {experts} experts", "bandwidth_gbs": bw,
                         "floor_tok_s": floor, **r})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'config':<24}{'load s':>8}{'prefill t/s':>13}{'decode t/s':>12}"
          f"{'floor t/s':>11}{'peak RSS MB':>13}")
    for r in rows:
        def f(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if key in r else "-"

        print(f"{r['what']:<24}{f('load_s', '8.2f')}{f('prefill_tok_s', '13.1f')}"
              f"{f('decode_tok_s', '12.2f')}{f('floor_tok_s', '11.1f')}"
              f"{f('peak_rss_mb', '13.0f')}")


def test_bench_model_2b(benchmark):
    """pytest-benchmark entry: times the r3mes packed load; prints the whole table."""
    from r3mes.core.checkpoint import load_model

    _, r3 = build()
    benchmark.pedantic(lambda: load_model(r3), rounds=3, iterations=1)
    print_table(table([1, 2], [0, 1, 3]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--experts", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--load-only", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads[0], args.experts[0],
                               not args.load_only)))
        return
    rows = table(args.threads, args.experts)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
