"""Remote sources: a local directory and a real HTTP server on loopback, digest-verified."""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from r3mes.cache.adapter_store import (
    AdapterNotFoundError,
    AdapterStore,
    DigestMismatchError,
    adapter_digest,
)
from r3mes.cache.fetchers import FetchError, HTTPFetcher, LocalDirectoryFetcher


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]
    truncate: set[str]

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name in self.truncate:
            # Promise the full length, send half, hang up: a truncated transfer.
            body = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, list[str], set[str]]]:
    """A static file server on 127.0.0.1 serving ``tmp_path/remote``."""
    root = tmp_path / "remote"
    root.mkdir()
    requests: list[str] = []
    truncate: set[str] = set()
    handler = type("Handler", (_Handler,), {"requests": requests, "truncate": truncate})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/experts", root, requests, truncate
    finally:
        server.shutdown()
        server.server_close()


def _publish(adapter_factory, root: Path, name: str, seed: int = 0) -> str:
    src = adapter_factory(seed=seed)
    shutil.copytree(src, root / "experts" / name)
    return adapter_digest(src)


def test_store_without_fetchers_never_fetches(home, served, adapter_factory):
    url, root, requests, _ = served
    _publish(adapter_factory, root, "legal_dora")
    store = AdapterStore(home)
    with pytest.raises(AdapterNotFoundError):
        store.ensure("legal_dora")
    assert requests == []


def test_http_fetcher_downloads_verifies_and_imports(home, served, adapter_factory):
    url, root, requests, _ = served
    digest = _publish(adapter_factory, root, "legal_dora")
    store = AdapterStore(home, fetchers=[HTTPFetcher(url, {"legal_dora": digest})])
    record = store.ensure("legal_dora")
    assert record.digest == digest and record.source == f"{url}/legal_dora/"
    assert sorted(requests) == ["/experts/legal_dora/adapter_config.json",
                                "/experts/legal_dora/adapter_model.safetensors"]
    assert all(r.ok for r in store.verify())
    store.ensure("legal_dora")  # already present: no second download
    assert len(requests) == 2


def test_http_download_with_the_wrong_digest_is_refused(home, served, adapter_factory):
    url, root, _, _ = served
    _publish(adapter_factory, root, "legal_dora", seed=1)
    other = adapter_digest(adapter_factory(seed=2))
    store = AdapterStore(home, fetchers=[HTTPFetcher(url, {"legal_dora": other})])
    with pytest.raises(AdapterNotFoundError, match="downloaded content has digest"):
        store.ensure("legal_dora")
    assert store.list() == [] and list(store.objects.iterdir()) == []
    with pytest.raises(DigestMismatchError):
        HTTPFetcher(url, {"legal_dora": other}).fetch("legal_dora", home / "scratch")


def test_http_fetcher_refuses_an_unverifiable_download(home, served, adapter_factory):
    url, root, requests, _ = served
    _publish(adapter_factory, root, "legal_dora")
    fetcher = HTTPFetcher(url)
    assert not fetcher.has("legal_dora")
    with pytest.raises(FetchError, match="no expected digest"):
        fetcher.fetch("legal_dora", home / "scratch")
    assert requests == []


def test_http_404_is_a_clear_error(home, served):
    url, _, _, _ = served
    store = AdapterStore(home, fetchers=[HTTPFetcher(url, {"missing": "0" * 64})])
    with pytest.raises(AdapterNotFoundError, match="HTTP 404"):
        store.ensure("missing")


def test_truncated_http_transfer_is_refused(home, served, adapter_factory):
    url, root, _, truncate = served
    digest = _publish(adapter_factory, root, "legal_dora")
    truncate.add("adapter_model.safetensors")
    with pytest.raises(FetchError, match="adapter_model.safetensors"):
        HTTPFetcher(url, {"legal_dora": digest}).fetch("legal_dora", home / "scratch")


def test_http_size_limit_is_enforced(home, served, adapter_factory):
    url, root, _, _ = served
    digest = _publish(adapter_factory, root, "legal_dora")
    fetcher = HTTPFetcher(url, {"legal_dora": digest}, max_bytes=100)
    with pytest.raises(FetchError, match="exceeds the limit"):
        fetcher.fetch("legal_dora", home / "scratch")


def test_local_directory_fetcher_imports_on_demand(home, tmp_path, adapter_factory):
    shared = tmp_path / "shared"
    digest = _publish(adapter_factory, shared, "finance_dora")
    store = AdapterStore(home, fetchers=[LocalDirectoryFetcher(shared / "experts")])
    assert store.ensure("finance_dora").digest == digest
    assert store.get("finance_dora").source == str(shared / "experts" / "finance_dora")


def test_local_directory_fetcher_checks_a_configured_digest(home, tmp_path, adapter_factory):
    shared = tmp_path / "shared"
    _publish(adapter_factory, shared, "finance_dora")
    fetcher = LocalDirectoryFetcher(shared / "experts", {"finance_dora": "f" * 64})
    store = AdapterStore(home, fetchers=[fetcher])
    with pytest.raises(AdapterNotFoundError, match="does not match the expected"):
        store.ensure("finance_dora")
    assert not fetcher.has("../etc")


def test_http_fetcher_rejects_non_http_urls():
    with pytest.raises(ValueError, match="http"):
        HTTPFetcher("ftp://example.org")


def test_cache_fetches_through_the_store_on_a_tier3_miss(home, served, adapter_factory):
    import asyncio

    from r3mes.cache.tiered_cache import TieredDoRACache

    url, root, requests, _ = served
    digest = _publish(adapter_factory, root, "legal_dora")
    store = AdapterStore(home, fetchers=[HTTPFetcher(url, {"legal_dora": digest})])

    async def main():
        cache = TieredDoRACache(store, tier1_capacity_mb=1, tier2_capacity_mb=1)
        adapter = await cache.get_adapter("legal_dora")
        await cache.close()
        return adapter

    assert asyncio.run(main()).digest == digest
    assert len(requests) == 2
