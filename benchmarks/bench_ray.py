"""r3mes on Ray Serve: 1 vs 2 engine replicas, and expert-aware placement on vs off.

    python benchmarks/bench_ray.py [--requests 48] [--clients 8] [--tokens 32]

One local Ray cluster on 127.0.0.1 (started and shut down here), the bundled demo model,
a fresh data directory. Three deployments of the same application, one after the other:

1. 1 replica, expert-aware placement   } CPU-bound load: ``--clients`` concurrent openai
2. 2 replicas, expert-aware placement  } clients, ``--requests`` chat requests over 6 expert
3. 2 replicas, placement "any"         } sets, greedy, ``--tokens`` tokens each.

Printed: requests/s, p50 and p99 latency, and from /metrics the multiplexing hit rate (a
request whose expert set its replica already held) and the replicas' tier-1 cache hit rate.
Each replica keeps 3 expert sets warm (Ray's multiplexing LRU) and a 6 MB tier 1: the
8 demo adapters (0.66 MB each) all fit in it, so the tier-1 rate shows little; the
expert-set hit rate is where placement shows: 2 replicas x 3 sets hold all 6 sets only if
each set keeps to one replica (a smaller tier 1 fails requests when 8 concurrent ones hold
more adapters than it has room for).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

SETS = ["coding_dora", "medical_dora", "legal_dora", "science_dora",
        "finance_dora+turkish_dora", "history_dora+general_dora"]
QUESTION = "Explain the main idea in two sentences."


def _settings(home: str):
    from r3mes.config import load_config

    return load_config(home=home, environ={}, overrides={
        "generation.temperature": 0.0, "server.max_tokens_limit": 256,
        "cache.tier1_vram.capacity_mb": 6.0})


def _prepare(home: str) -> None:
    from r3mes.serving.inference_pipeline import InferencePipeline, PipelineConfig

    async def init() -> None:
        pipe = InferencePipeline(PipelineConfig.from_settings(_settings(home), home=home))
        await pipe.initialize()
        await pipe.close()
    asyncio.run(init())


def _metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$",
                                                       text, re.M))


def run_load(url: str, requests: int, clients: int, tokens: int) -> dict[str, float]:
    import httpx
    from openai import OpenAI

    order = [SETS[(i * 7 + i // len(SETS)) % len(SETS)] for i in range(requests)]

    def one(i: int) -> float:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        t0 = time.perf_counter()
        client.chat.completions.create(model=order[i], max_tokens=tokens, seed=i,
                                       messages=[{"role": "user", "content": QUESTION}])
        return time.perf_counter() - t0

    # one warm-up request a set (Ray places it), not counted in the latencies
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: OpenAI(base_url=url + "/v1", api_key="u", max_retries=0)
                      .chat.completions.create(model=s, max_tokens=4, messages=[
                          {"role": "user", "content": QUESTION}]), SETS))
    time.sleep(2.0)
    before = httpx.get(url + "/metrics", timeout=30).text
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        lat = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    time.sleep(1.5)  # the replicas' last reports
    after = httpx.get(url + "/metrics", timeout=30).text

    def delta(name: str) -> float:
        return _metric_sum(after, name) - _metric_sum(before, name)
    hits, misses = (delta("r3mes_replica_expert_set_hits_total"),
                    delta("r3mes_replica_expert_set_misses_total"))
    t1h, t1m = delta("r3mes_replica_cache_hits_total"), delta("r3mes_replica_cache_misses_total")
    return {"rps": requests / wall, "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
            "set_hit": hits / max(1, hits + misses), "t1_hit": t1h / max(1, t1h + t1m)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))
    from serving_support import free_port

    from r3mes.serving import ray_app
    from r3mes.serving.inference_pipeline import PipelineConfig

    home = tempfile.mkdtemp(prefix="r3mes-bench-ray-")
    _prepare(home)
    settings = _settings(home)
    config = PipelineConfig.from_settings(settings, home=home)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas, placement in ((1, "experts"), (2, "experts"), (2, "any")):
            serve.run(ray_app.build_app(settings, config, replicas=replicas, replica_cpus=1.0,
                                        max_sets_per_replica=3, placement=placement),
                      name=ray_app.APP_NAME, route_prefix="/")
            result = run_load(url, args.requests, args.clients, args.tokens)
            rows.append((replicas, placement, result))
            print(f"  {replicas} replica(s), placement {placement}: {result}", file=sys.stderr)
            serve.delete(ray_app.APP_NAME)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print(f"\n{args.requests} requests, {args.clients} clients, {args.tokens} tokens, "
          f"{len(SETS)} expert sets, 3 sets and 6 MB tier 1 a replica\n")
    print("| replicas | placement | requests/s | p50 s | p99 s | expert-set hit rate "
          "| tier-1 hit rate |")
    print("|---|---|---|---|---|---|---|")
    for replicas, placement, r in rows:
        print(f"| {replicas} | {placement} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} "
              f"| {r['set_hit']:.0%} | {r['t1_hit']:.0%} |")
    base = rows[0][2]["rps"]
    print(f"\nthroughput 2 vs 1 replica (expert-aware): {rows[1][2]['rps'] / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
