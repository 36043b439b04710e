"""Remote sources for the adapter store (the seed's "IPFS tier"), behind one small interface.

A :class:`Fetcher` knows a set of adapter ids and can materialise one as a PEFT adapter
directory. The store (:meth:`AdapterStore.ensure`) then imports that directory exactly as a
local ``add`` would: copied, hashed, validated, checked against the expected digest.

Nothing is fetched unless a fetcher is passed to the store explicitly. The HTTP fetcher
refuses to download an adapter whose digest it was not told in advance, and verifies the
digest of what it received before handing it over.

Remote layout served by :class:`HTTPFetcher` (any static file server works)::

    <base_url>/<adapter_id>/adapter_config.json
    <base_url>/<adapter_id>/adapter_model.safetensors
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from r3mes.cache.adapter_store import (
    ADAPTER_FILES,
    AdapterStoreError,
    DigestMismatchError,
    adapter_digest,
    tree_digest,
)

_CHUNK = 1 << 20


class FetchError(AdapterStoreError):
    """A remote source failed (network, HTTP status, truncated body, size limit)."""


class Fetcher(ABC):
    """A source of adapters that the store does not hold yet."""

    @abstractmethod
    def has(self, adapter_id: str) -> bool:
        """Whether this source claims to provide ``adapter_id`` (no network access)."""

    def digest_for(self, adapter_id: str) -> str | None:
        """The digest this source was configured to expect for ``adapter_id``, if any."""
        return None

    @abstractmethod
    def fetch(self, adapter_id: str, dest: Path, *, expected_digest: str | None = None) -> Path:
        """Materialise ``adapter_id``; return the directory holding its two files.

        ``dest`` is an empty scratch directory the fetcher may write into; the returned
        directory may be ``dest`` or a read-only source. Raises :class:`FetchError` or
        :class:`DigestMismatchError` (when ``expected_digest`` or the configured digest does
        not match the content).
        """

    @abstractmethod
    def describe(self, adapter_id: str) -> str:
        """Where ``adapter_id`` comes from, for records and error messages."""


class LocalDirectoryFetcher(Fetcher):
    """Adapters laid out as ``<root>/<adapter_id>/`` (a shared disk, a mounted bucket).

    ``digests`` optionally pins the expected content of each id.
    """

    def __init__(self, root: str | os.PathLike[str],
                 digests: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.digests = dict(digests or {})

    def has(self, adapter_id: str) -> bool:
        return _safe_id(adapter_id) and (self.root / adapter_id / ADAPTER_FILES[0]).is_file()

    def digest_for(self, adapter_id: str) -> str | None:
        return self.digests.get(adapter_id)

    def fetch(self, adapter_id: str, dest: Path, *, expected_digest: str | None = None) -> Path:
        if not _safe_id(adapter_id):
            raise FetchError(f"invalid adapter id {adapter_id!r}")
        source = self.root / adapter_id
        if not source.is_dir():
            raise FetchError(f"{source}: no such adapter directory")
        expected = expected_digest or self.digests.get(adapter_id)
        if expected is not None:
            got = adapter_digest(source)
            if got != expected:
                raise DigestMismatchError(
                    f"{source}: content digest {got} does not match the expected {expected}")
        return source

    def describe(self, adapter_id: str) -> str:
        return str(self.root / adapter_id)


class HTTPFetcher(Fetcher):
    """Adapters served over HTTP(S) as ``<base_url>/<adapter_id>/<file>``, digest-verified.

    Args:
        base_url: e.g. ``https://experts.example.org/r3mes``.
        digests: id -> expected adapter digest. With ``require_digest`` (the default) only
            ids listed here are fetched: an unverifiable download is refused.
        timeout_s: per-request timeout.
        max_bytes: refuse any file larger than this (protects the disk from a bad server).
    """

    def __init__(
        self,
        base_url: str,
        digests: Mapping[str, str] | None = None,
        *,
        require_digest: bool = True,
        timeout_s: float = 30.0,
        max_bytes: int = 4 * 1024**3,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.digests = dict(digests or {})
        self.require_digest = require_digest
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def has(self, adapter_id: str) -> bool:
        return _safe_id(adapter_id) and (adapter_id in self.digests or not self.require_digest)

    def digest_for(self, adapter_id: str) -> str | None:
        return self.digests.get(adapter_id)

    def describe(self, adapter_id: str) -> str:
        return f"{self.base_url}/{adapter_id}/"

    def fetch(self, adapter_id: str, dest: Path, *, expected_digest: str | None = None) -> Path:
        import httpx

        if not _safe_id(adapter_id):
            raise FetchError(f"invalid adapter id {adapter_id!r}")
        expected = expected_digest or self.digests.get(adapter_id)
        if expected is None and self.require_digest:
            raise FetchError(
                f"refusing to download {self.describe(adapter_id)}: no expected digest is "
                "configured for it")
        dest.mkdir(parents=True, exist_ok=True)
        file_digests: dict[str, str] = {}
        with httpx.Client(timeout=self.timeout_s, follow_redirects=True) as client:
            for name in ADAPTER_FILES:
                url = f"{self.base_url}/{adapter_id}/{name}"
                file_digests[name] = self._download(client, url, dest / name)
        got = tree_digest(file_digests)
        if expected is not None and got != expected:
            raise DigestMismatchError(
                f"{self.describe(adapter_id)}: downloaded content has digest {got}, expected "
                f"{expected}")
        return dest

    def _download(self, client: object, url: str, target: Path) -> str:
        import httpx

        assert isinstance(client, httpx.Client)
        digest = hashlib.sha256()
        received = 0
        try:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise FetchError(f"{url}: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and int(declared) > self.max_bytes:
                    raise FetchError(f"{url}: {declared} bytes exceeds the limit {self.max_bytes}")
                with open(target, "wb") as out:
                    for chunk in response.iter_bytes(_CHUNK):
                        received += len(chunk)
                        if received > self.max_bytes:
                            raise FetchError(f"{url}: body exceeds the limit {self.max_bytes}")
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as exc:
            # Includes a connection closed before Content-Length bytes arrived.
            raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
        if declared is not None and received != int(declared):
            raise FetchError(f"{url}: truncated body ({received} of {declared} bytes)")
        return digest.hexdigest()


def _safe_id(adapter_id: str) -> bool:
    # Ids become path and URL components: no separators, no parent references.
    return (bool(adapter_id) and "/" not in adapter_id and "\\" not in adapter_id
            and adapter_id not in (".", "..") and not adapter_id.startswith("."))
