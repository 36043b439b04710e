"""Client of the Kubo RPC API (``/api/v0``) of an IPFS node the user runs.

Only what publishing and pulling need: ``add`` a directory (kubo's default import, pinned),
``block/get`` one block, ``swarm/connect``, ``id`` and ``repo/stat``. Every block read here is
verified against its CID by the caller (:mod:`r3mes.distribution.pull`) before use: the node is
trusted to serve bytes, never to have checked them.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

from r3mes.distribution.cid import CID, parse_cid
from r3mes.errors import R3mesError

__all__ = ["IpfsError", "KuboRPC"]


class IpfsError(R3mesError, RuntimeError):
    """An IPFS node or gateway could not be reached or refused a request (named in the text)."""


class KuboRPC:
    """Kubo RPC client over HTTP. ``api``: ``http://127.0.0.1:5001`` or the multiaddr form
    ``/ip4/127.0.0.1/tcp/5001`` that kubo writes to ``$IPFS_PATH/api``."""

    def __init__(self, api: str, timeout_s: float = 60.0) -> None:
        self.api = _api_url(api)
        self._http = httpx.Client(base_url=self.api, timeout=timeout_s, trust_env=False)

    def describe(self) -> str:
        return f"kubo RPC {self.api}"

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, params: dict[str, Any] | None = None, **kw: Any
              ) -> httpx.Response:
        try:
            r = self._http.post(f"/api/v0/{path}", params=params, **kw)
        except httpx.HTTPError as exc:
            raise IpfsError(f"IPFS node at {self.api} unreachable ({exc}); is it running, "
                            "and is [ipfs] api right?") from exc
        if r.status_code != 200:
            try:
                message = r.json().get("Message", r.text)
            except ValueError:
                message = r.text
            raise IpfsError(f"IPFS node at {self.api}: {path} failed ({r.status_code}: "
                            f"{message.strip()[:300]})")
        return r

    def id(self) -> dict[str, Any]:
        return self._post("id").json()

    def connect(self, multiaddr: str) -> None:
        self._post("swarm/connect", {"arg": multiaddr})

    def repo_stat(self) -> dict[str, Any]:
        return self._post("repo/stat").json()

    def get_block(self, cid: CID) -> bytes:
        """The raw bytes the node returns for block ``cid`` (not verified here)."""
        return self._post("block/get", {"arg": str(cid)}).content

    def add(self, path: str | os.PathLike[str]) -> CID:
        """Add a file or directory with kubo's default import (CIDv0 DAG, 256 KiB chunks,
        balanced), pinned; return the root as CIDv1."""
        root = Path(path)
        files: list[tuple[str, tuple[str, Any, str]]] = []
        handles = []
        try:
            entries = [root] + (sorted(root.rglob("*")) if root.is_dir() else [])
            for p in entries:
                rel = p.relative_to(root.parent).as_posix()
                name = urllib.parse.quote(rel, safe="")
                if p.is_dir():
                    files.append(("file", (name, b"", "application/x-directory")))
                elif p.is_file() and not p.is_symlink():
                    fh = open(p, "rb")  # noqa: SIM115 - closed below, after the upload
                    handles.append(fh)
                    files.append(("file", (name, fh, "application/octet-stream")))
            r = self._post("add", {"pin": "true", "cid-version": "0", "raw-leaves": "false",
                                   "quieter": "true"}, files=files)
        finally:
            for fh in handles:
                fh.close()
        lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        if not lines or "Hash" not in lines[-1]:
            raise IpfsError(f"IPFS node at {self.api}: add returned no CID ({r.text[:200]})")
        return parse_cid(lines[-1]["Hash"])


def _api_url(api: str) -> str:
    api = api.strip()
    if api.startswith("/"):
        parts = api.strip("/").split("/")
        if len(parts) >= 4 and parts[0] in ("ip4", "ip6", "dns", "dns4", "dns6") \
                and parts[2] == "tcp":
            host = f"[{parts[1]}]" if parts[0] == "ip6" else parts[1]
            return f"http://{host}:{parts[3]}"
        raise ValueError(f"[ipfs] api: {api!r} is not a /ip4|ip6|dns/HOST/tcp/PORT multiaddr")
    if not api.startswith(("http://", "https://")):
        raise ValueError(f"[ipfs] api: {api!r} is neither a URL nor a multiaddr")
    return api.rstrip("/")
