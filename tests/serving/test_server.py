"""The HTTP server over real loopback HTTP: OpenAI-compatible endpoints, limits, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serving_support import CODING_EN, MEDICAL_TR, LiveServer, server_settings


def chat(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120, **kw)


def test_health_and_models_list_base_and_experts(live_server):
    health = httpx.get(live_server.url + "/health").json()
    assert health["status"] == "ok" and "medical_dora" in health["experts"]
    ids = [m["id"] for m in httpx.get(live_server.url + "/v1/models").json()["data"]]
    assert {"auto", "base", "r3mes-bitnet", "medical_dora", "coding_dora"} <= set(ids)


def test_chat_completion_routes_and_reports_experts_and_sources(live_server):
    r = chat(live_server, {"model": "auto", "vram_gb": 8,
                           "messages": [{"role": "user", "content": MEDICAL_TR}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0
    assert body["r3mes"]["experts_used"] == [{"id": "medical_dora", "weight": 1.0}]
    assert body["r3mes"]["fast_path"] is True
    assert body["r3mes"]["sources"][0]["doc_id"] == "med_metformin"


def test_streamed_chat_equals_the_non_streamed_answer(live_server):
    msg = {"model": "coding_dora", "messages": [{"role": "user", "content": CODING_EN}]}
    full = chat(live_server, msg).json()["choices"][0]["message"]["content"]
    pieces, final = [], None
    with httpx.stream("POST", live_server.url + "/v1/chat/completions",
                      json={**msg, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: "):])
        delta = chunk["choices"][0]["delta"]
        pieces.append(delta.get("content") or "")
        if chunk["choices"][0]["finish_reason"]:
            final = chunk
    assert "".join(pieces) == full
    assert final["r3mes"]["experts_used"] == [{"id": "coding_dora", "weight": 1.0}]


def test_text_completions_stream_and_batch(live_server):
    r = httpx.post(live_server.url + "/v1/completions", timeout=120,
                   json={"model": "base", "prompt": ["merhaba", "hello"], "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(x["experts_used"] == [] for x in body["r3mes"])
    single = httpx.post(live_server.url + "/v1/completions", timeout=120,
                        json={"model": "base", "prompt": "merhaba", "max_tokens": 4}).json()
    with httpx.stream("POST", live_server.url + "/v1/completions", timeout=120,
                      json={"model": "base", "prompt": "merhaba", "max_tokens": 4,
                            "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == single["choices"][0]["text"]


def test_the_openai_client_library_works_against_the_server(live_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused")
    out = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": CODING_EN}], max_tokens=6)
    assert out.choices[0].message.content is not None
    assert out.usage.completion_tokens <= 6
    stream = client.chat.completions.create(
        model="medical_dora", messages=[{"role": "user", "content": MEDICAL_TR}],
        max_tokens=6, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    again = client.chat.completions.create(
        model="medical_dora", messages=[{"role": "user", "content": MEDICAL_TR}],
        max_tokens=6)
    assert text == again.choices[0].message.content
    assert "medical_dora" in [m.id for m in client.models.list().data]


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "wizard_dora", "messages": [{"role": "user", "content": "hi"}]})
     .encode(), 404, "wizard_dora"),
    (json.dumps({"max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]})
     .encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 400,
     "limit"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"temperature": -1, "messages": [{"role": "user", "content": "hi"}]})
     .encode(), 400, "temperature"),
])
def test_bad_requests_get_clear_4xx(live_server, body, status, needle):
    r = httpx.post(live_server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_oversized_bodies_are_refused_with_413(live_server):
    big = json.dumps({"messages": [{"role": "user", "content": "a" * 70000}]}).encode()
    r = httpx.post(live_server.url + "/v1/chat/completions", content=big, timeout=60)
    assert r.status_code == 413

    def chunked():
        for _ in range(80):
            yield b"a" * 1000

    r = httpx.post(live_server.url + "/v1/chat/completions", content=chunked(), timeout=60)
    assert r.status_code == 413
    assert httpx.get(live_server.url + "/health").status_code == 200


def test_fifty_concurrent_requests_are_all_answered(live_server):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(
                live_server.url + "/v1/chat/completions",
                json={"model": "auto" if i % 2 else "general_dora", "max_tokens": 3,
                      "rag": False, "messages": [{"role": "user", "content": f"soru {i}"}]})
                for i in range(50)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 50
    assert all(r.json()["choices"][0]["message"]["content"] is not None for r in responses)


def test_rag_search_and_document_upload(live_server):
    r = httpx.post(live_server.url + "/api/v1/rag/documents", timeout=120, json={
        "index": "user", "documents": [{"doc_id": "u1", "text": "Penguins cannot fly but swim.",
                                        "metadata": {"title": "Penguins"}}]})
    assert r.status_code == 200, r.text
    assert r.json()["chunks"] == 1
    hits = httpx.post(live_server.url + "/api/v1/rag/search", timeout=60,
                      json={"query": "can penguins fly", "top_k": 1, "indices": ["user"]})
    assert hits.status_code == 200 and hits.json()["hits"][0]["doc_id"] == "u1"
    bad = httpx.post(live_server.url + "/api/v1/rag/search", timeout=60,
                     json={"query": "x", "indices": ["nowhere"]})
    assert bad.status_code == 400 and "nowhere" in bad.json()["error"]["message"]


def test_metrics_are_prometheus_text(live_server):
    httpx.get(live_server.url + "/v1/models")
    text = httpx.get(live_server.url + "/metrics").text
    assert "# TYPE r3mes_http_requests_total counter" in text
    assert 'r3mes_http_requests_total{path="/v1/models",status="200"}' in text
    assert "r3mes_router_fast_path_rate" in text


def test_an_api_key_is_required_when_configured(assets):
    from r3mes.serving.inference_pipeline import PipelineConfig
    from r3mes.serving.server import create_app

    settings = server_settings(assets, api_key="s3cret")
    app = create_app(settings=settings, pipeline_config=PipelineConfig.from_settings(
        settings, home=str(assets["home"])))
    body = {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with LiveServer(app) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert chat(server, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert chat(server, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
