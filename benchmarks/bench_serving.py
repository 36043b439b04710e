"""Many users at once through the real HTTP server: continuous batching on the 2B-4T shape.

Builds (once, in ``--workdir``) a model directory with the exact BitNet-b1.58-2B-4T shapes
and random weights in the r3mes format, the demo model's tokenizer, and eight random
rank-16 DoRA experts (PEFT format); starts ``r3mes serve`` on it in a subprocess
(``R3MES_NUM_THREADS`` threads, no RAG) and drives it with the ``openai`` client:

1. ``streams``: N concurrent streaming chat completions (N = 1, 2, 4, 8, 16), each stream
   with its own 1-3 expert mix (``model: "x1+x4"``), ``--tokens`` tokens each. Reported:
   aggregate tok/s over the run, decode tok/s per stream, and the aggregate's ratio to
   one stream.
2. ``poisson``: requests arriving as a Poisson process at 50% and 90% of the capacity
   measured at 8 streams: time to first token and inter-token latency, p50 / p99.
3. ``join``: with 7 streams decoding, an 8th request arrives: its time to first token
   against its own prefill time (measured alone) plus two decode steps at 8 rows.

With ``--llama-server BIN --gguf FILE`` the same stream and Poisson runs go to a real
``llama-server`` (upstream llama.cpp, continuous batching, 8 slots) on the same machine,
in the same run (see ``benchmarks/build_llama_server.sh``).

    python benchmarks/bench_serving.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

EXPERTS = [f"x{i}" for i in range(8)]
TEXT_VOCAB = 8192  # the demo tokenizer's; head rows past it are zero so every token is text
PROMPTS = ["Explain how a hash map handles collisions.", "What causes insulin resistance?",
           "Summarise the rules of contract formation.", "How do I reverse a linked list?",
           "Describe the water cycle in simple words.", "Osmanlı İmparatorluğu ne zaman kuruldu?",
           "Write a short poem about the sea.", "What is a good way to learn statistics?"]


# --------------------------------------------------------------------------- assets
def build_assets(root: Path) -> Path:
    """The 2B-4T-shaped model directory (with tokenizer) and eight experts under ``root``."""
    model_dir, experts_dir = root / "model", root / "experts"
    if (model_dir / "r3mes_model.json").is_file() and (experts_dir / EXPERTS[-1]).is_dir():
        return root
    import torch
    from bench_decode import CONFIG, RANK, build_model

    from r3mes.core.adapter_io import save_peft_adapter
    from r3mes.core.checkpoint import save_model
    from r3mes.core.model import BitNetConfig
    from r3mes.serving.inference_pipeline import assets_dir

    cfg = BitNetConfig.from_dict({**CONFIG.to_dict(), "tie_word_embeddings": False,
                                  "bos_token_id": 0, "eos_token_id": [1], "pad_token_id": 2})
    model = build_model(cfg, head_rows=TEXT_VOCAB)
    g = torch.Generator().manual_seed(0)
    save_model(model, model_dir, source="bench_serving random 2B-4T shape")
    demo = assets_dir() / "demo_model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(demo / name, model_dir / name)
    for name in EXPERTS:
        for module in model.linear_modules().values():
            module.load_adapter(name, torch.randn(RANK, module.in_features, generator=g) * 0.01,
                                torch.randn(module.out_features, RANK, generator=g) * 0.01,
                                torch.rand(module.out_features, generator=g) + 0.5,
                                scaling=2.0)
        save_peft_adapter(model, name, experts_dir / name)
        for module in model.linear_modules().values():
            module.remove_adapter(name)
    return root


def mix_for(i: int) -> str:
    """Stream i's expert mix: 1, 2 or 3 experts, a different set for every stream."""
    k = 1 + i % 3
    return "+".join(EXPERTS[(i * 3 + j) % len(EXPERTS)] for j in range(k))


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str], health: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{argv[0]} did not start")

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_r3mes(root: Path, threads: int, max_batch: int, max_prefill_tokens: int = 64) -> Server:
    home = root / "home"
    config = root / "serve.yaml"
    config.write_text(json.dumps({
        "inference": {"backend": "bitnet_cpp", "max_batch_size": max_batch, "max_queue": 256,
                      "kv_cache_tokens": 16384, "max_prefill_tokens": max_prefill_tokens},
        "generation": {"temperature": 0.0, "repetition_penalty": 1.0},
        "server": {"max_tokens_limit": 4096, "max_concurrent_requests": 512},
        "cache": {"tier1_vram": {"capacity_mb": 4096, "preload": []}},
        "rag": {"enabled": False}, "model": {"experts_dir": str(root / "experts")}}))
    port = free_port()
    env = {**os.environ, "R3MES_NUM_THREADS": str(threads)}
    argv = [str(Path(sys.executable).parent / "r3mes"), "serve", "--model", str(root / "model"),
            "--home", str(home), "--config", str(config), "--port", str(port), "--no-rag",
            "--log-level", "warning"]
    return Server(argv, port, env, "/health")


def start_llama(binary: str, gguf: str, threads: int, slots: int) -> Server:
    port = free_port()
    argv = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(slots), "-c", str(slots * 1024), "-cb"]
    return Server(argv, port, dict(os.environ), "/health")


# --------------------------------------------------------------------------- clients
@dataclass
class Stream:
    submitted: float = 0.0
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.submitted

    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def run_stream(base_url: str, model: str, prompt: str, tokens: int, out: Stream) -> None:
    """One streamed text completion (``/v1/completions``: both servers speak it the same
    way; llama-server's chat endpoint needs a chat template the bench GGUF does not carry).
    Every streamed chunk before the last is one token's arrival."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    out.submitted = time.perf_counter()
    try:
        stream = client.completions.create(
            model=model, prompt=prompt, max_tokens=tokens, temperature=0.0, stream=True,
            extra_body={"ignore_eos": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].finish_reason is None:
                out.chunks.append(now)
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
            extra = (chunk.model_extra or {}).get("r3mes") or {}
            if not out.tokens and extra.get("metrics", {}).get("tokens_generated"):
                out.tokens = extra["metrics"]["tokens_generated"]
    except Exception as exc:  # reported in the table, never hidden
        out.error = f"{type(exc).__name__}: {exc}"
    if not out.tokens:
        out.tokens = len(out.chunks)


def concurrent(base_url: str, n: int, tokens: int, mixes: bool) -> dict[str, float]:
    streams = [Stream() for _ in range(n)]
    threads = [threading.Thread(target=run_stream, args=(
        base_url, mix_for(i) if mixes else "auto", PROMPTS[i % len(PROMPTS)], tokens,
        streams[i])) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed: {errors[0]}")
    total = sum(s.tokens for s in streams)
    decode = [(len(s.chunks) - 1) / (s.chunks[-1] - s.chunks[0]) for s in streams
              if len(s.chunks) > 1]
    return {"streams": n, "aggregate": total / wall,
            "per_stream_decode": statistics.median(decode), "wall_s": wall,
            "ttft_p50_ms": statistics.median(s.ttft for s in streams) * 1e3}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def poisson(base_url: str, rate: float, count: int, tokens: int, mixes: bool,
            seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    streams = [Stream() for _ in range(count)]
    threads = []
    for i in range(count):
        t = threading.Thread(target=run_stream, args=(
            base_url, mix_for(i) if mixes else "auto", PROMPTS[i % len(PROMPTS)], tokens,
            streams[i]))
        t.start()
        threads.append(t)
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join()
    ok = [s for s in streams if not s.error and s.chunks]
    itl = [x for s in ok for x in s.itl()]
    return {"rate": rate, "requests": count, "failed": count - len(ok),
            "ttft_p50_ms": pct([s.ttft for s in ok], 0.5) * 1e3,
            "ttft_p99_ms": pct([s.ttft for s in ok], 0.99) * 1e3,
            "itl_p50_ms": pct(itl, 0.5) * 1e3, "itl_p99_ms": pct(itl, 0.99) * 1e3}


def join_latency(base_url: str, tokens: int, repeats: int) -> dict[str, float]:
    """TTFT of a request joining 7 running streams vs its prefill alone + 2 decode steps."""
    alone_ms = []
    for _ in range(3):  # its own prefill time: the median of three, not one noisy sample
        alone = Stream()
        run_stream(base_url, mix_for(7), PROMPTS[7], 2, alone)
        alone_ms.append(alone.ttft * 1e3)
    prefill_ms = statistics.median(alone_ms)
    ttfts, steps = [], []
    for r in range(repeats):
        running = [Stream() for _ in range(7)]
        threads = [threading.Thread(target=run_stream, args=(
            base_url, mix_for(i), PROMPTS[i], tokens, running[i])) for i in range(7)]
        for t in threads:
            t.start()
        while sum(len(s.chunks) > 2 for s in running) < 7:
            time.sleep(0.01)
        time.sleep(0.05 * r)  # arrive at different points of a step
        late = Stream()
        run_stream(base_url, mix_for(7), PROMPTS[7], 4, late)
        ttfts.append(late.ttft * 1e3)
        for t in threads:
            t.join()
        steps += [x for s in running for x in s.itl()]
    step_ms = statistics.median(steps) * 1e3
    return {"prefill_alone_ms": prefill_ms, "decode_step_8_rows_ms": step_ms,
            "bound_ms": prefill_ms + 2 * step_ms, "join_ttft_p50_ms": pct(ttfts, 0.5),
            "join_ttft_p99_ms": pct(ttfts, 0.99)}


# --------------------------------------------------------------------------- main
def table(title: str, rows: list[dict[str, float]]) -> str:
    keys = list(rows[0])
    out = [f"### {title}", "", "| " + " | ".join(keys) + " |",
           "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k])
                                     for k in keys) + " |")
    return "\n".join(out) + "\n"


def bench(url: str, name: str, streams: list[int], tokens: int, mixes: bool,
          poisson_requests: int, join: bool) -> str:
    if mixes:  # warm-up: every expert loaded (and kept: the cache holds all eight)
        for expert in EXPERTS:
            run_stream(url, expert, PROMPTS[0], 2, Stream())
    concurrent(url, 2, 4, mixes)
    rows = [concurrent(url, n, tokens, mixes) for n in streams]
    one = next((r["aggregate"] for r in rows if r["streams"] == 1), rows[0]["aggregate"])
    for r in rows:
        r["x_one_stream"] = r["aggregate"] / one
    text = table(f"{name}: concurrent streams, {tokens} tokens each", rows)
    at8 = next((r for r in rows if r["streams"] == 8), rows[-1])
    capacity = at8["aggregate"] / tokens  # requests a second
    if poisson_requests:
        loads = [poisson(url, frac * capacity, poisson_requests, tokens, mixes)
                 for frac in (0.5, 0.9)]
        text += "\n" + table(f"{name}: Poisson arrivals at 50% and 90% of "
                             f"{capacity:.2f} req/s", loads)
    if join:
        text += "\n" + table(f"{name}: a request joining 7 running streams",
                             [join_latency(url, tokens, 8)])
    print(text, flush=True)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "r3mes-bench-serving"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--poisson-requests", type=int, default=24)
    ap.add_argument("--llama-server", help="llama-server binary to compare with")
    ap.add_argument("--skip-r3mes", action="store_true", help="only the llama-server runs")
    ap.add_argument("--gguf", help="the same model as GGUF (TQ2_0) for llama-server")
    ap.add_argument("--max-prefill-tokens", type=int, default=64,
                    help="r3mes: prompt tokens of joining requests prefilled in one pass "
                         "(0: each alone)")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    sys.path.insert(0, str(Path(__file__).parent))
    root = build_assets(Path(args.workdir))
    text = ""
    if not args.skip_r3mes:
        server = start_r3mes(root, args.threads, args.max_batch, args.max_prefill_tokens)
        try:
            text += bench(server.url, "r3mes", streams, args.tokens, True,
                          args.poisson_requests, True)
        finally:
            server.close()
    if args.llama_server and args.gguf:
        llama = start_llama(args.llama_server, args.gguf, args.threads, 8)
        try:
            text += bench(llama.url, "llama-server", streams, args.tokens, False,
                          args.poisson_requests, False)
        finally:
            llama.close()
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
