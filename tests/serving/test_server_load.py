"""Many clients at once against a real server on loopback: continuous batching under load,
clients that vanish mid-stream, and admission control (429 + Retry-After)."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import httpx
import psutil
import pytest
import tiny_assets
from serving_support import LiveServer

from r3mes import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the native module")

PROMPTS = ["merhaba dünya", "how do I sort a list", "the court ruled", "insülin direnci",
           "binary search tree", "contract law basics", "a b c d e f", "hello there"]


def _settings(assets, **inference):
    from r3mes.config import load_config

    overrides = {"model.path": str(assets["model"]), "model.experts_dir": str(assets["experts"]),
                 "generation.max_new_tokens": 24, "generation.temperature": 0.0,
                 "generation.repetition_penalty": 1.0, "rag.enabled": False,
                 "server.max_tokens_limit": 64, "server.max_concurrent_requests": 256}
    overrides.update({f"inference.{k}": v for k, v in inference.items()})
    return load_config(home=str(assets["home"]), overrides=overrides, environ={})


def _serve(assets, **inference) -> LiveServer:
    from r3mes.serving.inference_pipeline import PipelineConfig
    from r3mes.serving.server import create_app

    settings = _settings(assets, **inference)
    config = PipelineConfig.from_settings(settings, home=str(assets["home"]))
    return LiveServer(create_app(settings=settings, pipeline_config=config))


def _models() -> list[str]:
    e = tiny_assets.EXPERTS
    return ["base", e[0], f"{e[0]}+{e[1]}", e[1], f"{e[1]}+{e[2]}+{e[0]}"]


def _body(i: int, stream: bool) -> dict:
    models = _models()
    return {"model": models[i % len(models)], "stream": stream, "max_tokens": 24,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}


async def _stream(client: httpx.AsyncClient, url: str, body: dict,
                  leave_after: int | None) -> tuple[str, bool]:
    """The streamed text, and whether the stream ended with [DONE]; with ``leave_after``
    the client hangs up after that many content chunks."""
    pieces, chunks = [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                return "".join(pieces), True
            data = json.loads(line[len("data: "):])
            assert "error" not in data, data
            content = data["choices"][0]["delta"].get("content")
            if content:
                pieces.append(content)
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    return "".join(pieces), False  # closing the response hangs up
    return "".join(pieces), False


def _engine_idle(server: LiveServer) -> dict[str, float]:
    deadline = time.time() + 60
    while True:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith(("r3mes_engine_running", "r3mes_kv_cache_blocks",
                                      "r3mes_engine_packed"))}
        if values.get("r3mes_engine_running_requests") == 0 or time.time() > deadline:
            return values
        time.sleep(0.05)


def test_64_streaming_clients_some_hanging_up(assets) -> None:
    # Packed prefills up to 512 tokens: the chat prompts here are longer than the default
    # pass holds two of.
    with _serve(assets, max_batch_size=8, max_queue=128, max_prefill_tokens=512) as server:
        expected = {}
        for i in range(len(PROMPTS) * len(_models())):
            key = (i % len(PROMPTS), i % len(_models()))
            if key not in expected:
                r = httpx.post(server.url + "/v1/chat/completions", json=_body(i, False),
                               timeout=120)
                assert r.status_code == 200, r.text
                expected[key] = r.json()["choices"][0]["message"]["content"]

        async def storm(n: int, hang_up_every: int) -> list[tuple[int, str, bool]]:
            limits = httpx.Limits(max_connections=n + 8)
            async with httpx.AsyncClient(timeout=300, limits=limits) as client:
                async def one(i: int) -> tuple[int, str, bool]:
                    leave = 2 if hang_up_every and i % hang_up_every == 0 else None
                    text, done = await _stream(client, server.url, _body(i, True), leave)
                    return i, text, done
                return await asyncio.gather(*(one(i) for i in range(n)))

        asyncio.run(storm(16, 0))  # warm-up: the KV pool and buffers reach their size
        _engine_idle(server)
        gc.collect()
        idle_rss = psutil.Process().memory_info().rss
        results = asyncio.run(storm(64, 5))
        for i, text, done in results:
            want = expected[(i % len(PROMPTS), i % len(_models()))]
            if i % 5 == 0:
                assert want.startswith(text)  # what it saw before hanging up was right
            else:
                assert done and text == want, i  # every completed answer is whole
        metrics = _engine_idle(server)
        assert metrics["r3mes_engine_running_requests"] == 0
        assert metrics['r3mes_kv_cache_blocks{state="used"}'] == 0
        # Clients arriving together joined together: their prompts were prefilled in
        # packed passes, and every whole answer above is still the one it gets alone.
        assert metrics["r3mes_engine_packed_prefills_total"] > 0
        assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
        gc.collect()
        grown = psutil.Process().memory_info().rss - idle_rss
        assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB after the load"


def test_a_full_queue_answers_429_with_retry_after(assets) -> None:
    with _serve(assets, max_batch_size=1, max_queue=1) as server:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as client:
                body = {**_body(0, False), "max_tokens": 64}
                return await asyncio.gather(*(
                    client.post(server.url + "/v1/chat/completions", json=body)
                    for _ in range(8)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        # One row and one queue place: at most two are taken (one when the second arrives
        # before the first has left the queue), the rest are refused.
        assert 1 <= codes.count(200) <= 2 and set(codes) == {200, 429}, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        ok = [r.json()["choices"][0]["message"]["content"] for r in responses
              if r.status_code == 200]
        assert len(set(ok)) == 1  # the admitted ones answered, and alike (greedy)
