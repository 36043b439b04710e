"""Pipeline overhead and server throughput.

    python -m pytest benchmarks/bench_pipeline.py -q -s

1. **Overhead**: for the seed's two example queries, everything but token generation
   (routing, retrieval, prefetch, adapter loading, prompt building, post-processing, queueing)
   against a 64-token generation; p50 over the runs. Target: overhead p50 <= 10% of the
   generation on the demo model.
2. **Server throughput**: 8 concurrent clients against ``r3mes serve`` over loopback, each
   sending chat completions of 16 tokens; requests/s and generated tokens/s.

The model is the bundled demo model when it is installed, else the tiny random model of the
serving tests (which generates so fast that the overhead share is pessimistic). The table is
printed; copy it into BENCHMARKS.md with this command.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

import tiny_assets  # noqa: E402

QUERIES = ["Diyabet hastalarında insülin direnci nasıl tedavi edilir?",
           "How to implement a binary search tree in Python?"]
RUNS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from r3mes.serving.inference_pipeline import assets_dir

    root = tmp_path_factory.mktemp("bench")
    demo = assets_dir() / "demo_model"
    if demo.is_dir():
        return {"model": None, "experts": None, "home": root / "home", "label": "demo model"}
    model = tiny_assets.write_model(root / "model")
    experts = tiny_assets.write_experts(root / "experts")
    from r3mes.rag import Document, RagStore

    store = RagStore(root / "home")
    for index, docs in tiny_assets.DOCUMENTS.items():
        store.index(index).add_documents(Document(d, t, m) for d, t, m in docs)
        store.save(index)
    return {"model": str(model), "experts": str(experts), "home": root / "home",
            "label": "tiny random model (2 layers, hidden 64)"}


def _pipeline(setup, **kw):
    from r3mes.serving import create_pipeline

    return create_pipeline(home=str(setup["home"]), model_path=setup["model"],
                           experts_dir=setup["experts"], **kw)


def test_pipeline_overhead_vs_64_token_generation(benchmark, setup):
    async def measure():
        pipe = _pipeline(setup, max_new_tokens=64)
        await pipe.load_model()
        for q in QUERIES:  # warm: models loaded, experts in tier 1
            await pipe.run(q, vram_gb=24)
        rows = []
        for run in range(RUNS):
            for q in QUERIES:
                # A new text every run: no query-embedding cache hit flatters the overhead.
                r = await pipe.run(f"{q} ({run})", vram_gb=24)
                assert r.success, r.error
                rows.append(r.metrics)
        await pipe.close()
        return rows

    rows = benchmark.pedantic(lambda: asyncio.run(measure()), rounds=1, iterations=1)
    overhead = statistics.median(m.overhead_ms for m in rows)
    inference = statistics.median(m.inference_time_ms for m in rows)
    tokens = statistics.median(m.tokens_generated for m in rows)
    stages = {k: statistics.median(getattr(m, k) for m in rows)
              for k in ("routing_time_ms", "rag_time_ms", "loading_time_ms",
                        "postprocess_time_ms", "queue_time_ms")}
    print(f"\nmodel: {setup['label']}")
    print("| measure | p50 |")
    print("|---|---|")
    print(f"| overhead (total - generation) | {overhead:.2f} ms |")
    print(f"| generation ({tokens:.0f} tokens) | {inference:.2f} ms |")
    print(f"| overhead / generation | {100 * overhead / inference:.1f}% |")
    for k, v in stages.items():
        print(f"| {k} | {v:.2f} ms |")
    benchmark.extra_info.update(overhead_ms=overhead, inference_ms=inference,
                                ratio=overhead / inference, model=setup["label"])


def test_server_throughput_with_8_clients(benchmark, setup):
    import importlib.util

    # The serving tests' loopback server helper (benchmarks/ has a conftest of its own).
    path = Path(__file__).resolve().parents[1] / "tests" / "serving" / "conftest.py"
    spec = importlib.util.spec_from_file_location("r3mes_serving_test_conftest", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    LiveServer = helpers.LiveServer  # noqa: N806

    from r3mes.config import load_config
    from r3mes.serving.inference_pipeline import PipelineConfig
    from r3mes.serving.server import create_app

    overrides = {"model.path": setup["model"], "model.experts_dir": setup["experts"],
                 "generation.max_new_tokens": 16}
    settings = load_config(home=str(setup["home"]), overrides=overrides, environ={})
    app = create_app(settings=settings, pipeline_config=PipelineConfig.from_settings(
        settings, home=str(setup["home"])))
    clients, per_client = 8, 6

    async def load(url: str) -> tuple[float, int, int]:
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(c: int) -> int:
                tokens = 0
                for i in range(per_client):
                    r = await client.post(url + "/v1/chat/completions", json={
                        "model": "auto", "max_tokens": 16, "messages": [
                            {"role": "user", "content": f"{QUERIES[(c + i) % 2]} ({c}.{i})"}]})
                    r.raise_for_status()
                    tokens += r.json()["usage"]["completion_tokens"]
                return tokens
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(c) for c in range(clients)))
            return time.perf_counter() - t0, clients * per_client, sum(counts)

    with LiveServer(app) as server:
        asyncio.run(load(server.url))  # warm
        seconds, requests, tokens = benchmark.pedantic(lambda: asyncio.run(load(server.url)),
                                                       rounds=1, iterations=1)
        batches = httpx.get(server.url + "/metrics").text
    print(f"\nmodel: {setup['label']}; {clients} clients x {per_client} requests, 16 tokens")
    print("| measure | value |")
    print("|---|---|")
    print(f"| requests/s | {requests / seconds:.2f} |")
    print(f"| generated tokens/s | {tokens / seconds:.1f} |")
    for line in batches.splitlines():
        if line.startswith(("r3mes_generation_batches_total", "r3mes_generation_batched_jobs")):
            print(f"| {line.split()[0]} | {line.split()[1]} |")
    benchmark.extra_info.update(requests_per_s=requests / seconds,
                                tokens_per_s=tokens / seconds)
