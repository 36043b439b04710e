"""Side by side on one stream: bitnet.cpp I2_S, llama.cpp TQ2_0 and TQ1_0, and r3mes.

Every engine runs the same random checkpoint in the exact BitNet-b1.58-2B-4T shape
(bench_serving's r3mes-format model and its GGUF exports), measured by its own benchmark
tool: llama-bench (``-p P -n N -t 2``, then ``-p 0 -n N -t 1``) for the ggml engines and
``r3mes bench --json`` (the same tests) for r3mes, one repetition a call. The engines take
turns within every repetition, their order rotated from one repetition to the next, so a
noisy moment on this shared VM hits all of them alike. Reported per engine: decode (tg)
tok/s at 2 and 1 threads and prefill (pp) tok/s at 2 threads (mean ± stdev over the
repetitions), the bytes one decoded token reads (every weight tensor, the head included;
for a GGUF whose output is tied to the embedding the whole embedding counts as the head),
the read bandwidth measured in the same run (before and after the engines, the higher) and
the floor it puts on decode, and the ratios of each r3mes model to bitnet.cpp and to
llama.cpp TQ2_0.

Build the anchors from source, then run (about 8 minutes at the defaults on 2 vCPUs)::

    bash benchmarks/build_llama_server.sh /tmp/r3mes-llama        # llama-bench, llama-quantize
    python benchmarks/export_gguf.py /tmp/r3mes-bench-serving/model /tmp/r3mes-llama \\
        --quantize TQ2_0 TQ1_0                                      # Q6_K head, as llama.cpp ships
    BITNET_SRC=/path/to/BitNet bash benchmarks/build_bitnet_cpp.sh /tmp/r3mes-bitnet   # I2_S
    r3mes convert --head int4 /tmp/r3mes-bench-serving/model /tmp/r3mes-bench-int4     # optional
    python benchmarks/bench_peers.py --repetitions 5 \\
        --r3mes-model /tmp/r3mes-bench-serving/model --r3mes-model /tmp/r3mes-bench-int4 \\
        --json-out peers.json

The r3mes model (/tmp/r3mes-bench-serving/model) comes first: bench_serving's build_assets
writes it, and this script calls that when it runs without ``--r3mes-model`` and finds none
(or, before the exports: ``python -c "import sys; sys.path[:0] = ['benchmarks'];
import bench_serving as b; b.build_assets(b.Path('/tmp/r3mes-bench-serving'))"``). An
engine whose binary or model file is missing is left out with a note; r3mes is always
measured. A quick check of the script: ``--repetitions 2 --prompt-tokens 16 --gen-tokens 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA_DIR = Path("/tmp/r3mes-llama")
BITNET_DIR = Path("/tmp/r3mes-bitnet")
R3MES_MODEL = Path("/tmp/r3mes-bench-serving/model")


# --------------------------------------------------------------------------- GGUF bytes
def _skip_value(f, vtype: int) -> None:
    """Skip one GGUF metadata value of type ``vtype`` (the GGUF v2/v3 encoding)."""
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype in fixed:
        f.seek(fixed[vtype], os.SEEK_CUR)
    elif vtype == 8:  # string
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, os.SEEK_CUR)
    elif vtype == 9:  # array
        etype, n = struct.unpack("<IQ", f.read(12))
        if etype in fixed:
            f.seek(fixed[etype] * n, os.SEEK_CUR)
        else:
            for _ in range(n):
                _skip_value(f, etype)
    else:
        raise ValueError(f"GGUF metadata value type {vtype} unknown")


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a GGUF, from the gaps between their data offsets, so a
    quantisation type this script does not know (bitnet.cpp's I2_S) is measured too."""
    with open(path, "rb") as f:
        magic, version = struct.unpack("<4sI", f.read(8))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a GGUF v2+ file")
        n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
        alignment = 32
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            key = f.read(klen).decode()
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == "general.alignment" and vtype == 4:
                (alignment,) = struct.unpack("<I", f.read(4))
            else:
                _skip_value(f, vtype)
        infos = []
        for _ in range(n_tensors):
            (nlen,) = struct.unpack("<Q", f.read(8))
            name = f.read(nlen).decode()
            (ndim,) = struct.unpack("<I", f.read(4))
            f.seek(8 * ndim + 4, os.SEEK_CUR)  # dims, type
            (offset,) = struct.unpack("<Q", f.read(8))
            infos.append((offset, name))
        data_start = -(-f.tell() // alignment) * alignment
    end = path.stat().st_size - data_start
    infos.sort()
    return {name: (infos[i + 1][0] if i + 1 < len(infos) else end) - off
            for i, (off, name) in enumerate(infos)}


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes a decoded token reads: every tensor, except that a separate ``output.weight``
    makes ``token_embd`` a row lookup (else the embedding is also the head, read whole)."""
    sizes = gguf_tensor_bytes(path)
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


# --------------------------------------------------------------------------- engines
@dataclass
class Engine:
    """One engine and model file; ``samples[test]`` holds tok/s, one per repetition."""

    name: str
    kind: str  # "llama-bench" or "r3mes"
    binary: str
    model: Path
    bytes_per_token: int | None = None
    head: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)

    def calls(self, prompt: int, gen: int) -> list[list[str]]:
        """One repetition: pp and tg at 2 threads, tg at 1 thread (llama-bench's -p 0)."""
        if self.kind == "llama-bench":
            base = [self.binary, "-m", str(self.model), "-r", "1", "-o", "json"]
            return [base + ["-p", str(prompt), "-n", str(gen), "-t", "2"],
                    base + ["-p", "0", "-n", str(gen), "-t", "1"]]
        base = [*self.binary.split(), "bench", "--json", "--model", str(self.model),
                "-r", "1", "--gen-tokens", str(gen)]
        return [base + ["--prompt-tokens", str(prompt), "--threads", "2"],
                base + ["--prompt-tokens", "0", "--threads", "1"]]

    def run_once(self, prompt: int, gen: int) -> None:
        for cmd in self.calls(prompt, gen):
            self.commands.append(cmd)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"{self.name}: {' '.join(cmd)} exited {res.returncode}: "
                                   f"{(res.stderr or res.stdout)[-2000:]}")
            for test, rate in self._parse(res.stdout).items():
                self.samples.setdefault(test, []).append(rate)

    def _parse(self, out: str) -> dict[str, float]:
        data = json.loads(out[out.index("["):] if self.kind == "llama-bench"
                          else out[out.index("{"):])
        rates = {}
        if self.kind == "llama-bench":
            for r in data:
                kind, n = ("pp", r["n_prompt"]) if r["n_prompt"] else ("tg", r["n_gen"])
                rates[f"{kind}{n}@{r['n_threads']}"] = float(r["avg_ts"])
            return rates
        m = data["model"]
        self.bytes_per_token = m["bytes_per_token"]
        self.head = f"{m['weight_bytes']['lm_head'] / 1e6:.0f} MB ({m['head']})"
        for r in data["results"]:
            rates[f"{r['test']}@{r['threads']}"] = float(r["tok_s_mean"])
        return rates

    def stat(self, test: str) -> tuple[float, float] | None:
        s = self.samples.get(test)
        if not s:
            return None
        return statistics.fmean(s), statistics.stdev(s) if len(s) > 1 else 0.0


def _engines(args: argparse.Namespace) -> tuple[list[Engine], list[str]]:
    engines, notes = [], []
    ggml = [("bitnet.cpp I2_S", args.bitnet_bench, args.bitnet_gguf),
            ("llama.cpp TQ2_0", args.llama_bench, args.tq2_gguf),
            ("llama.cpp TQ1_0", args.llama_bench, args.tq1_gguf)]
    for name, binary, model in ggml:
        missing = [str(p) for p in (binary, model) if not Path(p).is_file()]
        if missing:
            notes.append(f"{name} left out: {', '.join(missing)} missing")
            continue
        sizes = gguf_tensor_bytes(Path(model))
        tied = "output.weight" not in sizes
        head_mb = sizes["token_embd.weight" if tied else "output.weight"] / 1e6
        engines.append(Engine(name, "llama-bench", str(binary), Path(model),
                              gguf_bytes_per_token(Path(model)),
                              f"{head_mb:.0f} MB ({'tied embedding' if tied else 'output'})"))
    heads = []
    for model in args.r3mes_model:
        manifest = Path(model) / "r3mes_model.json"
        if not manifest.is_file():
            raise SystemExit(f"error: {model}: not an r3mes model directory")
        heads.append(json.loads(manifest.read_text()).get("head", "?"))
    for model, head in zip(args.r3mes_model, heads, strict=True):
        # Named by head kind, the variable compared; by directory too when heads repeat.
        name = f"r3mes {head}" + (f" ({Path(model).name})" if heads.count(head) > 1 else "")
        engines.append(Engine(name, "r3mes", args.r3mes, Path(model)))
    return engines, notes


def read_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: the best of five sums over a 1 GiB float32 array, on ``threads``."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    t = torch.from_numpy(np.ones(1 << 28, dtype=np.float32))
    t.sum()
    best = min(_timed(t.sum) for _ in range(5))
    return t.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- report
def report(engines: list[Engine], bandwidth: dict[int, float], prompt: int,
           gen: int) -> tuple[str, dict[str, Any]]:
    tg2, tg1, pp2 = f"tg{gen}@2", f"tg{gen}@1", f"pp{prompt}@2"

    def cell(e: Engine, test: str) -> str:
        st = e.stat(test)
        return "-" if st is None else f"{st[0]:.1f} ± {st[1]:.1f}"

    lines = [f"| engine | decode tok/s, 2 thr | decode, 1 thr | prefill pp{prompt}, 2 thr | "
             "MB read / token | head | floor tok/s, 2 thr | decode / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for e in engines:
        mb = floor = of_floor = "-"
        if e.bytes_per_token:
            mb = f"{e.bytes_per_token / 1e6:.0f}"
            floor_tok_s = bandwidth[2] * 1e9 / e.bytes_per_token
            floor = f"{floor_tok_s:.1f}"
            st = e.stat(tg2)
            of_floor = f"{st[0] / floor_tok_s:.0%}" if st else "-"
        lines.append(f"| {e.name} | {cell(e, tg2)} | {cell(e, tg1)} | {cell(e, pp2)} | {mb} | "
                     f"{e.head} | {floor} | {of_floor} |")
    anchors = {e.name: e for e in engines if e.kind == "llama-bench"}
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    lines += ["", "| r3mes model | vs | decode 2 thr | decode 1 thr | prefill 2 thr |",
              "|---|---|---|---|---|"]
    for e in (e for e in engines if e.kind == "r3mes"):
        for ref_name in ("bitnet.cpp I2_S", "llama.cpp TQ2_0"):
            ref = anchors.get(ref_name)
            if ref is None:
                continue
            r = {}
            for test in (tg2, tg1, pp2):
                a, b = e.stat(test), ref.stat(test)
                if a and b:
                    r[test] = round(a[0] / b[0], 3)
            ratios.setdefault(e.name, {})[ref_name] = r
            lines.append(f"| {e.name} | {ref_name} | "
                         + " | ".join(f"{r[t]:.2f}x" if t in r else "-"
                                      for t in (tg2, tg1, pp2)) + " |")
    data = {"bandwidth_gbs": bandwidth, "prompt_tokens": prompt, "gen_tokens": gen,
            "engines": [{"name": e.name, "kind": e.kind, "model": str(e.model),
                         "bytes_per_token": e.bytes_per_token, "head": e.head,
                         "tests": {t: {"samples_tok_s": s, "mean": e.stat(t)[0],
                                       "stdev": e.stat(t)[1]}
                                   for t, s in e.samples.items()},
                         "commands": [" ".join(c) for c in e.commands[:2]]}
                        for e in engines],
            "ratios": ratios}
    return "\n".join(lines), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repetitions", "-r", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--llama-bench", type=Path, default=LLAMA_DIR / "build/bin/llama-bench")
    ap.add_argument("--tq2-gguf", type=Path, default=LLAMA_DIR / "bench-tq2_0-q6k.gguf")
    ap.add_argument("--tq1-gguf", type=Path, default=LLAMA_DIR / "bench-tq1_0-q6k.gguf")
    ap.add_argument("--bitnet-bench", type=Path, default=BITNET_DIR / "build/bin/llama-bench")
    ap.add_argument("--bitnet-gguf", type=Path, default=BITNET_DIR / "bench-i2_s.gguf")
    ap.add_argument("--r3mes-model", type=Path, action="append", default=None,
                    help=f"r3mes model directory (repeatable; default {R3MES_MODEL})")
    ap.add_argument("--r3mes", default=f"{sys.executable} -m r3mes.cli",
                    help="the r3mes command (default: this Python's r3mes.cli)")
    ap.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if not args.r3mes_model:
        args.r3mes_model = [R3MES_MODEL]
        if not (R3MES_MODEL / "r3mes_model.json").is_file():
            from bench_serving import build_assets

            build_assets(R3MES_MODEL.parent)
    if args.repetitions < 1 or args.prompt_tokens < 1 or args.gen_tokens < 1:
        raise SystemExit("error: --repetitions, --prompt-tokens and --gen-tokens must be >= 1")
    engines, notes = _engines(args)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    before = {t: read_bandwidth_gbs(t) for t in (1, 2)}
    t0 = time.perf_counter()
    for rep in range(args.repetitions):
        shift = rep % len(engines)
        for e in engines[shift:] + engines[:shift]:
            e.run_once(args.prompt_tokens, args.gen_tokens)
        print(f"repetition {rep + 1}/{args.repetitions} done, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    # Measured before and after the engines; the higher is the machine's (a neighbour's
    # burst can only lower a reading).
    bandwidth = {t: round(max(before[t], read_bandwidth_gbs(t)), 2) for t in (1, 2)}
    table, data = report(engines, bandwidth, args.prompt_tokens, args.gen_tokens)
    data["notes"] = notes
    data["cpu"] = next((ln.split(":", 1)[1].strip() for ln in
                        Path("/proc/cpuinfo").read_text().splitlines()
                        if ln.startswith("model name")), "")
    print(f"read bandwidth {bandwidth[2]:.1f} GB/s (2 threads), {bandwidth[1]:.1f} GB/s "
          f"(1 thread); {args.repetitions} repetitions, engines interleaved\n")
    print(table)
    print()
    text = json.dumps(data, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
