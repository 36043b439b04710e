"""r3mes on Ray Serve (serving/ray_app.py), end to end over loopback.

One real local Ray cluster for the module (head on 127.0.0.1, 3 logical CPUs): the bundled
demo model on 2 engine replicas of 1 CPU each, spoken to with the ``openai`` client, next to
the single-process ``r3mes serve`` app on a data directory of its own. The cluster is shut
down after the module, failures included. ``pytest -m ray`` runs only these.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra r3mes[ray]")

from serving_support import CODING_EN, MEDICAL_TR, LiveServer, free_port  # noqa: E402

pytestmark = pytest.mark.ray

TAMPERED = "history_dora"  # its stored bytes are altered after the manifest records them
LEGAL_TR = "Kira sözleşmesinin feshi için hangi koşullar gerekir?"


def _settings(home: Path):
    from r3mes.config import load_config

    return load_config(home=str(home), environ={}, overrides={
        "generation.max_new_tokens": 16, "server.max_tokens_limit": 64,
        # sampling, so "the same seed" means something
        "generation.temperature": 0.8, "generation.top_p": 0.95})


def _prepare_home(home: Path) -> None:
    """Import the bundled experts and knowledge as r3mes serve does at start."""
    import asyncio

    from r3mes.serving.inference_pipeline import InferencePipeline, PipelineConfig

    async def init() -> None:
        pipe = InferencePipeline(PipelineConfig.from_settings(_settings(home), home=str(home)))
        await pipe.initialize()
        await pipe.close()
    asyncio.run(init())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process server (r3mes serve's app) on its own data directory."""
    from r3mes.serving.inference_pipeline import PipelineConfig
    from r3mes.serving.server import create_app

    home = tmp_path_factory.mktemp("single_home")
    settings = _settings(home)
    app = create_app(settings=settings,
                     pipeline_config=PipelineConfig.from_settings(settings, home=str(home)))
    with LiveServer(app) as server:
        yield server.url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The Ray Serve application: ``{"url", "home"}``."""
    from ray import serve

    from r3mes.cache import AdapterStore
    from r3mes.serving import ray_app
    from r3mes.serving.inference_pipeline import PipelineConfig

    home = tmp_path_factory.mktemp("ray_home")
    _prepare_home(home)
    # Damage one stored adapter after the store recorded its digest: replicas must refuse it.
    record = AdapterStore(home).get(TAMPERED)
    weights = AdapterStore(home).objects / record.digest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    os.chmod(weights, 0o644)
    weights.write_bytes(bytes(data))

    port = free_port()
    ray.init(address="local", num_cpus=3, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = _settings(home)
        config = PipelineConfig.from_settings(settings, home=str(home))
        serve.run(ray_app.build_app(settings, config, replicas=2, replica_cpus=1.0,
                                    max_sets_per_replica=2),
                  name=ray_app.APP_NAME, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "home": home}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)


def _chat(url: str, model: str, text: str, seed: int = 7, stream: bool = False):
    client = _client(url)
    kwargs = {"model": model, "messages": [{"role": "user", "content": text}],
              "seed": seed, "max_tokens": 16, "temperature": 0.8}
    if not stream:
        return client.chat.completions.create(**kwargs)
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(stream=True, **kwargs) if c.choices]
    return "".join(pieces)


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def _served(url: str) -> dict[str, dict[str, float]]:
    """{expert_set: {replica: requests}} from /metrics."""
    out: dict[str, dict[str, float]] = {}
    for labels, n in _samples(_metrics(url), "r3mes_replica_expert_set_requests_total"):
        out.setdefault(labels["expert_set"], {})[labels["replica"]] = n
    return out


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --------------------------------------------------------------------------- tests


def test_single_machine_path_does_not_import_ray():
    code = ("import sys, r3mes.cli, r3mes.serving.server, r3mes.serving.cli; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("model,text", [("auto", CODING_EN), ("auto", MEDICAL_TR),
                                        ("legal_dora", LEGAL_TR), ("base", CODING_EN),
                                        ("coding_dora+medical_dora", MEDICAL_TR)])
def test_answers_equal_the_single_process_server_for_the_same_seed(cluster, single, model,
                                                                    text):
    ours, theirs = _chat(cluster["url"], model, text), _chat(single, model, text)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens > 0
    ext, ref = ours.model_extra["r3mes"], theirs.model_extra["r3mes"]
    assert ext["experts_used"] == ref["experts_used"]
    assert ext["fast_path"] == ref["fast_path"]
    assert [s["doc_id"] for s in ext["sources"]] == [s["doc_id"] for s in ref["sources"]]


def test_a_stream_equals_the_whole_answer(cluster):
    whole = _chat(cluster["url"], "auto", CODING_EN, seed=11).choices[0].message.content
    assert _chat(cluster["url"], "auto", CODING_EN, seed=11, stream=True) == whole


def test_requests_land_on_the_replica_that_holds_their_expert_set(cluster):
    url = cluster["url"]
    sets = {"science_dora": "What is the speed of light in vacuum?",
            "finance_dora+turkish_dora": "Enflasyon faiz oranlarını nasıl etkiler?"}
    keys = {}
    for model, text in sets.items():  # first request of each set: Ray places it
        before = _served(url)
        _chat(url, model, text)
        new = _wait_for(lambda before=before: [k for k in _served(url) if k not in before],
                        30, f"{model} in the replica metrics")
        keys[model] = new[0]
    time.sleep(2.0)  # the replicas' held sets reach the ingress's router (pushed every 0.1 s)
    for round_ in range(4):
        for model, text in sets.items():
            _chat(url, model, text, seed=round_)
    served = _wait_for(lambda: (s := _served(url)) and all(
        sum(s.get(k, {}).values()) == 5 for k in keys.values()) and s, 30, "5 requests a set")
    for model, key in keys.items():
        by_replica = served[key]
        assert len([r for r, n in by_replica.items() if n]) == 1, (model, by_replica)
    hits = {labels["replica"]: n for labels, n in
            _samples(_metrics(url), "r3mes_replica_expert_set_hits_total")}
    holders = {next(iter(served[k])) for k in keys.values()}
    assert sum(hits[r] for r in holders) >= 8  # 4 repeats of each set found it held


def test_a_replica_refuses_an_adapter_whose_digest_does_not_match(cluster):
    from openai import APIStatusError

    with pytest.raises(APIStatusError) as caught:
        _chat(cluster["url"], TAMPERED, CODING_EN)
    assert caught.value.status_code >= 400
    assert "does not match" in caught.value.message
    # the other experts still answer
    assert _chat(cluster["url"], "coding_dora", CODING_EN).choices[0].finish_reason


def _engine_actors() -> dict[str, str]:
    """{replica id: actor name} of the live engine replicas (a killed one's name is freed)."""
    return {a["name"].rsplit("#", 1)[-1]: a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "R3mesEngine" in a["name"]}


def test_killing_a_replica_mid_load_loses_no_request_silently(cluster):
    from openai import APIConnectionError, APIStatusError
    from ray import serve

    url = cluster["url"]
    texts = [CODING_EN, MEDICAL_TR, LEGAL_TR, "What is the speed of light in vacuum?"]

    def one(i: int):
        try:
            r = _client(url).chat.completions.create(
                model="auto", messages=[{"role": "user", "content": texts[i % len(texts)]}],
                seed=i, max_tokens=64, temperature=0.8)
            return ("ok", r.choices[0].finish_reason)
        except APIStatusError as exc:  # a clean error: a status and OpenAI's error body
            return ("error", exc.status_code, exc.body)
        except APIConnectionError as exc:  # a dropped connection is not a clean error
            return ("lost", repr(exc))

    lost_before = sum(n for _, n in _samples(_metrics(url), "r3mes_ingress_replica_lost_total"))
    before = _engine_actors()
    assert len(before) == 2, before
    victim = sorted(before)[0]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(36)]  # about 4 s of work
        time.sleep(0.8)  # the requests are decoding on both replicas
        ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
        outcomes = [f.result(timeout=300) for f in futures]
    assert all(o[0] in ("ok", "error") for o in outcomes), outcomes
    for o in outcomes:
        if o[0] == "ok":
            assert o[1] in ("stop", "length")
        else:
            assert o[1] in (429, 500, 503) and o[2] and o[2].get("message"), o
    lost = sum(n for _, n in _samples(_metrics(url), "r3mes_ingress_replica_lost_total"))
    assert lost > lost_before  # the kill did hit requests in flight

    # Recovered: Serve noticed the death (its health check), started a new replica, and the
    # new one finished starting (it reports to the registry as its constructor's last step)
    # and is RUNNING. Counting RUNNING replicas alone can pass before Serve has noticed.
    def replaced() -> str | None:
        app = serve.status().applications["r3mes"]
        running = app.deployments["R3mesEngine"].replica_states.get("RUNNING", 0)
        new = set(_engine_actors()) - set(before)
        reporting = {labels["replica"] for labels, _ in
                     _samples(_metrics(url), "r3mes_replica_requests_total")}
        if app.status == "RUNNING" and running == 2 and len(new) == 1 and new <= reporting:
            return next(iter(new))
        return None
    replacement = _wait_for(replaced, 240, "Serve to replace the killed replica")
    assert victim not in _engine_actors()
    # An expert set no replica has served goes to the replica holding the fewest sets: the
    # new one, which answers it with the adapters it fetched by digest.
    def experts(key: str) -> list[str]:
        return [part.split("@", 1)[0] for part in key.split("+")]
    seen = [experts(k) for k in _served(url)]
    fresh = next(e for e in ("turkish_dora", "general_dora", "finance_dora", "science_dora")
                 if [e] not in seen)
    answer = _chat(url, fresh, MEDICAL_TR)
    assert answer.choices[0].finish_reason in ("stop", "length")

    def by_replica() -> dict[str, float]:
        return next((r for k, r in _served(url).items() if experts(k) == [fresh]), {})
    served = _wait_for(by_replica, 30, f"the {fresh} request in the replica metrics")
    assert served == {replacement: 1}, served


def test_the_readme_serve_deploy_config_is_valid_and_builds(tmp_path):
    """The YAML the README documents parses as Ray Serve's deploy schema and its
    import_path builds the application (no cluster needed)."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```yaml\n(# r3mes-serve.yaml\n.*?)```", readme, re.S)
    assert block, "the README's serve deploy config"
    config = ServeDeploySchema.model_validate(yaml.safe_load(block.group(1)))
    app = config.applications[0]
    module, name = app.import_path.split(":")
    args = dict(app.args, home=str(tmp_path))
    built = getattr(importlib.import_module(module), name)(args)
    engine = built._bound_deployment if hasattr(built, "_bound_deployment") else None
    assert engine is not None and engine.name == "R3mesIngress"
