"""Issue 26, items 3, 4 and 8 over a real server on loopback: documents written by the CLI
beside a running server survive its uploads; same-named files from two folders are two
documents; the API's edges answer 4xx in OpenAI's shape; citations only when asked; and an
OpenAPI-driven fuzzer finds no 5xx."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from test_first_hour_experts import MEDICAL_TR

from r3mes.cli import main
from r3mes.rag import RagStore


def _chat(server, **body) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    body.setdefault("max_tokens", 4)
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def _server_errors(server) -> float:
    """How many requests this server has answered with a 5xx so far."""
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("r3mes_http_requests_total") and 'status="5' in line)


# --------------------------------------------------------------------------- item 3


def _upload(server, doc_id: str, text: str) -> None:
    r = httpx.post(server.url + "/api/v1/rag/documents", timeout=60, json={
        "index": "user", "documents": [{"doc_id": doc_id, "text": text}]})
    assert r.status_code == 200, r.text


def _search(server, query: str) -> list[str]:
    r = httpx.post(server.url + "/api/v1/rag/search", timeout=60, json={
        "query": query, "indices": ["user"], "mode": "sparse", "top_k": 10})
    assert r.status_code == 200, r.text
    return [h["doc_id"] for h in r.json()["hits"]]


def test_cli_documents_survive_uploads_to_a_running_server(server, tmp_path, capsys):
    _upload(server, "penguins", "Penguins huddle together through the polar winter.")
    note = tmp_path / "zebras.txt"
    note.write_text("Zebras sleep standing up on the open savanna.", encoding="utf-8")
    assert main(["index", "add", str(note), "--index", "user", "--home", str(server.home),
                 "--json"]) == 0
    capsys.readouterr()
    assert "zebras.txt" in _search(server, "zebras sleep standing savanna")  # seen by it
    _upload(server, "owls", "Owls hunt at night with silent feathers.")
    kept = set(RagStore(server.home).index("user").docs)
    assert {"penguins", "zebras.txt", "owls"} <= kept


# --------------------------------------------------------------------------- item 4


def test_same_file_name_in_two_folders_is_two_documents(tmp_path, capsys):
    home = str(tmp_path / "home")
    for folder, text in (("a", "Alpha project: build with make."),
                         ("b", "Beta project: build with cargo.")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "README.md").write_text(text, encoding="utf-8")
    added = []
    for folder in ("a", "b", "a"):
        assert main(["index", "add", str(tmp_path / folder / "README.md"), "--index", "user",
                     "--home", home, "--json"]) == 0
        added.append(json.loads(capsys.readouterr().out))
    assert [a["replaced"] for a in added] == [0, 0, 1]  # only re-adding a/ replaces
    docs = RagStore(home).index("user").docs
    assert len(docs) == 2 and "README.md" in docs


# --------------------------------------------------------------------------- item 8


def test_out_of_range_or_mistyped_numbers_are_a_400(server):
    errors = _server_errors(server)
    for body in ({"seed": 2**70}, {"max_tokens": True}, {"temperature": "0.5"},
                 {"stream": "yes"}):
        r = _chat(server, **body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _chat(server, seed=-1).status_code == 200
    assert _server_errors(server) == errors


def _count(server, path: str, status: int) -> float:
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    key = f'r3mes_http_requests_total{{path="{path}",status="{status}"}} '
    return sum(float(line[len(key):]) for line in metrics.splitlines() if line.startswith(key))


def test_a_half_sent_body_is_no_server_error(server, caplog):
    path = "/v1/chat/completions"
    before, errors = _count(server, path, 400), _server_errors(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                     b'{"messages": [{"role": "user", ')
    deadline = time.time() + 10  # the server notices the hang-up on its own schedule
    while _count(server, path, 400) == before and _server_errors(server) == errors:
        assert time.time() < deadline, "the server never finished the half-sent request"
        time.sleep(0.1)
    assert _server_errors(server) == errors
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_unknown_paths_and_models_answer_in_openai_shape(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, server.url + path, timeout=10)
        assert r.status_code == status
        assert r.json()["error"]["message"] and "detail" not in r.json()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("auto").id == "auto"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_sources_are_a_field_and_in_the_text_only_when_asked(server):
    plain = _chat(server, messages=[{"role": "user", "content": MEDICAL_TR}])
    asked = _chat(server, messages=[{"role": "user", "content": MEDICAL_TR}], citations=True)
    for r in (plain, asked):
        assert r.status_code == 200, r.text
        assert r.json()["r3mes"]["sources"]  # retrieval ran: the sources are a field
    assert "Sources:" not in plain.json()["choices"][0]["message"]["content"]
    assert "Sources:" in asked.json()["choices"][0]["message"]["content"]
    stream = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": MEDICAL_TR}], "max_tokens": 4,
        "stream": True, "citations": True})
    pieces = [json.loads(line[6:]) for line in stream.text.splitlines()
              if line.startswith("data: {")]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces)
    assert "Sources:" in text


def test_an_openapi_fuzzer_finds_no_server_error(server):
    """schemathesis generates valid and invalid requests from the server's /openapi.json;
    every answer must be below 500 (bounded: a few hundred requests)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.openapi import from_url

    errors = _server_errors(server)
    schema = from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions",
                                              "/api/v1/rag/search", "/api/v1/rag/documents"}
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                       for mode in GenerationMode])
    failures: list[str] = []

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def call(case) -> None:
        response = case.call(base_url=server.url, timeout=60)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} {case.body!r}: "
                            f"{response.status_code} {response.text[:200]}")

    call()
    assert not failures, "\n".join(failures[:5])
    assert _server_errors(server) == errors
