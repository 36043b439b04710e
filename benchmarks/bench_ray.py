"""r3mes on Ray Serve: 1 vs 2 engine replicas, and expert-aware placement on vs off.

    python benchmarks/bench_ray.py [--requests 96] [--clients 16] [--tokens 64] [--rounds 2]
                                   [--batch 8 1]

One local Ray cluster on 127.0.0.1 (started and shut down here), the bundled demo model,
a fresh data directory. For each engine batch size (``--batch``: 8 is the default
continuous batching, 1 decodes one request a step, so every request's decode is its own
CPU work), deployments of the same application one after the other, all of them
``--rounds`` times in turn (so a slow minute of a shared machine lands on every row):

1. 1 replica, expert-aware placement   } ``--clients`` concurrent requests (one shared
2. 2 replicas, expert-aware placement  } openai client), ``--requests`` chat requests over
3. 2 replicas, placement "any"         } 6 expert sets, greedy, ``--tokens`` tokens each
   (at the first batch size only)      } (16 clients fill 8 rows on each of 2 replicas).

Every engine replica gets 1 CPU from Ray and runs its kernels (and torch, through Ray's
OMP_NUM_THREADS) on 1 thread in both cases, so 2 replicas have twice the engine threads
of 1 and nothing else changes. The ingress, the HTTP proxy and the registry reserve no
CPU: on a machine with as many cores as replicas they share those cores with the engines,
and so does this process (the clients).

Printed: requests/s, p50 and p99 latency, from /metrics the multiplexing hit rate (a
request whose expert set its replica already held) and the replicas' tier-1 hit rate, and
where the CPU went: CPU milliseconds a request in each process group (psutil, user + system,
over the timed load), the busiest engine replica's CPU seconds a second, ours in all, and
what the rest of the machine used meanwhile (other jobs on a shared machine: with 2 CPUs,
anything there takes a replica's core).

Each replica keeps 3 expert sets warm (Ray's multiplexing LRU) and a 6 MB tier 1: the
8 demo adapters (0.66 MB each) all fit in it, so the tier-1 rate shows little; the
expert-set hit rate is where placement shows: 2 replicas x 3 sets hold all 6 sets only if
each set keeps to one replica (a smaller tier 1 fails requests when 8 concurrent ones hold
more adapters than it has room for).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

SETS = ["coding_dora", "medical_dora", "legal_dora", "science_dora",
        "finance_dora+turkish_dora", "history_dora+general_dora"]
QUESTION = "Explain the main idea in two sentences."
# process groups for the CPU accounting, by the process title Ray gives its workers
GROUPS = (("engine", "R3mesEngine"), ("ingress", "R3mesIngress"), ("proxy", "ProxyActor"),
          ("registry", "R3mesRegistry"))
SHOWN = ("engine", "ingress", "proxy", "client", "ray")  # "ray": controller, GCS, raylet, ...


def _settings(home: str, max_batch: int = 8):
    from r3mes.config import load_config

    return load_config(home=home, environ={}, overrides={
        "generation.temperature": 0.0, "server.max_tokens_limit": 256,
        "cache.tier1_vram.capacity_mb": 6.0, "inference.max_batch_size": max_batch})


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


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (group, user + system CPU seconds)} of this process and every process under it
    (a local Ray cluster's GCS, raylet and workers are all started below the driver)."""
    import psutil

    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                title = " ".join(proc.cmdline()) or proc.name()
                times = proc.cpu_times()
        except psutil.Error:
            continue
        group = "client" if proc.pid == me.pid else next(
            (g for g, key in GROUPS if key in title), "ray")
        out[proc.pid] = (group, times.user + times.system)
    return out


def _machine_busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_load(url: str, requests: int, clients: int, tokens: int) -> dict[str, object]:
    import httpx
    from openai import OpenAI

    order = [SETS[(i * 7 + i // len(SETS)) % len(SETS)] for i in range(requests)]
    # one client for all threads: a client a request would add its setup (an SSL context)
    # to the client's CPU, which shares the machine with the replicas
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> float:
        t0 = time.perf_counter()
        client.chat.completions.create(model=order[i], max_tokens=tokens, seed=i,
                                       messages=[{"role": "user", "content": QUESTION}])
        return time.perf_counter() - t0

    # one warm-up request a set (Ray places it), not counted
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: client.chat.completions.create(
            model=s, max_tokens=4, messages=[{"role": "user", "content": QUESTION}]), SETS))
    time.sleep(2.0)
    before = httpx.get(url + "/metrics", timeout=30).text
    cpu0, busy0 = _cpu_seconds(), _machine_busy_seconds()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    cpu1, busy1 = _cpu_seconds(), _machine_busy_seconds()
    time.sleep(1.5)  # the replicas' last reports
    after = httpx.get(url + "/metrics", timeout=30).text

    def delta(name: str) -> float:
        return _metric_sum(after, name) - _metric_sum(before, name)
    cpu: collections.Counter[str] = collections.Counter()
    engines = []
    for pid, (group, seconds) in cpu1.items():
        used = seconds - cpu0.get(pid, (group, 0.0))[1]
        cpu[group] += used
        if group == "engine":
            engines.append(used)
    return {"requests": requests, "wall": wall, "lat": lat,
            "set_hits": delta("r3mes_replica_expert_set_hits_total"),
            "set_misses": delta("r3mes_replica_expert_set_misses_total"),
            "t1_hits": delta("r3mes_replica_cache_hits_total"),
            "t1_misses": delta("r3mes_replica_cache_misses_total"),
            "tokens": delta("r3mes_tokens_generated_total"),
            "steps": delta("r3mes_engine_decode_steps_total"),
            "cpu": dict(cpu), "engine_max": max(engines, default=0.0),
            "machine": busy1 - busy0}


def summarise(runs: list[dict]) -> dict[str, float]:
    """One row from the rounds of one deployment: requests/s over all of them, latency
    percentiles of all their requests, CPU a request and a second over all of them."""
    requests = sum(r["requests"] for r in runs)
    wall = sum(r["wall"] for r in runs)
    lat = sorted(x for r in runs for x in r["lat"])
    hits, misses = sum(r["set_hits"] for r in runs), sum(r["set_misses"] for r in runs)
    t1h, t1m = sum(r["t1_hits"] for r in runs), sum(r["t1_misses"] for r in runs)
    cpu = collections.Counter()
    for r in runs:
        cpu.update(r["cpu"])
    row = {"rps": requests / wall, "p50": statistics.median(lat),
           "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
           "rps_rounds": [r["requests"] / r["wall"] for r in runs],
           "set_hit": hits / max(1, hits + misses), "t1_hit": t1h / max(1, t1h + t1m),
           "rows": sum(r["tokens"] for r in runs) / max(1, sum(r["steps"] for r in runs)),
           "engine_busy": sum(r["engine_max"] for r in runs) / wall,
           "ours_busy": sum(cpu.values()) / wall,
           "machine_busy": sum(r["machine"] for r in runs) / wall}
    for group in (*SHOWN, "registry"):
        row[f"ms_{group}"] = 1e3 * cpu.get(group, 0.0) / requests
    row["ms_ours"] = 1e3 * sum(cpu.values()) / requests
    return row


def _plan(batches: list[int]) -> list[tuple[int, int, str]]:
    """(max batch rows, replicas, placement) of each deployment: 1 and 2 replicas at every
    batch size, and Ray's default placement beside the expert-aware one at the first."""
    plan = []
    for n, batch in enumerate(batches):
        plan += [(batch, 1, "experts"), (batch, 2, "experts")]
        if n == 0:
            plan.append((batch, 2, "any"))
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1],
                        help="engine max_batch_size values (8: the default continuous "
                             "batching; 1: a row a step, each request's decode its own)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))
    from serving_support import free_port

    from r3mes.serving import ray_app
    from r3mes.serving.inference_pipeline import PipelineConfig

    home = tempfile.mkdtemp(prefix="r3mes-bench-ray-")
    _prepare(home)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    plan = _plan(args.batch)
    runs: dict[tuple[int, int, str], list[dict]] = {c: [] for c in plan}
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for round_ in range(args.rounds):
            for batch, replicas, placement in plan:
                settings = _settings(home, batch)
                config = PipelineConfig.from_settings(settings, home=home)
                serve.run(ray_app.build_app(settings, config, replicas=replicas,
                                            replica_cpus=1.0, max_sets_per_replica=3,
                                            placement=placement),
                          name=ray_app.APP_NAME, route_prefix="/")
                result = run_load(url, args.requests, args.clients, args.tokens)
                runs[(batch, replicas, placement)].append(result)
                print(f"  round {round_ + 1}: batch {batch}, {replicas} replica(s), placement "
                      f"{placement}: {result['requests'] / result['wall']:.2f} req/s, CPU s "
                      f"{({k: round(v, 1) for k, v in result['cpu'].items()})}",
                      file=sys.stderr)
                serve.delete(ray_app.APP_NAME)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    rows = [(key, summarise(runs[key])) for key in plan]
    print(f"\n{args.requests} requests x {args.rounds} rounds a row, {args.clients} concurrent "
          f"clients, {args.tokens} tokens, {len(SETS)} expert sets, 3 sets and 6 MB tier 1 a "
          f"replica, {os.cpu_count()} CPUs\n")
    print("| batch rows | replicas | placement | requests/s (each round) | p50 s | p99 s "
          "| expert-set hit rate | tier-1 hit rate | tokens a decode step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (batch, replicas, placement), r in rows:
        rounds = ", ".join(f"{x:.2f}" for x in r["rps_rounds"])
        print(f"| {batch} | {replicas} | {placement} | {r['rps']:.2f} ({rounds}) "
              f"| {r['p50']:.2f} | {r['p99']:.2f} | {r['set_hit']:.0%} | {r['t1_hit']:.0%} "
              f"| {r['rows']:.1f} |")
    print("\nCPU ms a request by process group, and CPU seconds a second:\n")
    print("| batch rows | replicas | placement | " + " | ".join(SHOWN) + " | all of ours "
          "| busiest engine replica, CPU s/s | ours, CPU s/s | rest of the machine, CPU s/s |")
    print("|---|---|---|" + "---|" * (len(SHOWN) + 4))
    for (batch, replicas, placement), r in rows:
        print(f"| {batch} | {replicas} | {placement} | "
              + " | ".join(f"{r[f'ms_{g}']:.0f}" for g in SHOWN)
              + f" | {r['ms_ours']:.0f} | {r['engine_busy']:.2f} | {r['ours_busy']:.2f} "
                f"| {max(0.0, r['machine_busy'] - r['ours_busy']):.2f} |")
    cpus = os.cpu_count() or 1
    print()
    for batch in args.batch:
        one, two = dict(rows)[(batch, 1, "experts")], dict(rows)[(batch, 2, "experts")]
        # 1 replica: at most 1 / (engine CPU a request) on its one engine thread; 2 replicas:
        # at most twice that, and at most the machine's CPUs / (all CPU a request)
        bound = min(2e3 / one["ms_engine"], cpus * 1e3 / two["ms_ours"])
        print(f"batch {batch}: 2 vs 1 replica {two['rps'] / one['rps']:.2f}x; bound from "
              f"the CPU profile: 2 x the engine's {1e3 / one['ms_engine']:.2f} req/s, and "
              f"{cpus} CPUs / {two['ms_ours']:.0f} ms a request = "
              f"{cpus * 1e3 / two['ms_ours']:.2f} req/s: {bound / one['rps']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
