"""Retrieval from a trustless HTTP gateway (IPFS's "trustless gateway" spec), verified here.

For nodes that run no IPFS daemon: blocks come from ``GET /ipfs/CID?format=raw``
(``application/vnd.ipld.raw``), or a whole DAG at once as a CAR from ``?format=car``
(``application/vnd.ipld.car``, CARv1: a varint-framed DAG-CBOR header naming the roots, then
varint-framed ``CID || block`` sections). A gateway is never trusted: every block is hashed
against its CID (:func:`r3mes.distribution.cid.verify_block`) before anything reads it, and a
CAR's blocks are checked the same way when they are used.
"""

from __future__ import annotations

import dag_cbor
import httpx

from r3mes.distribution.cid import CID, parse_cid, verify_block
from r3mes.distribution.kubo import IpfsError
from r3mes.distribution.unixfs import UnixFSError, read_varint

__all__ = ["TrustlessGateway", "read_car"]


class TrustlessGateway:
    """Blocks from a trustless gateway at ``url`` (e.g. ``http://127.0.0.1:8080``)."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout_s, trust_env=False, follow_redirects=False)

    def describe(self) -> str:
        return f"gateway {self.url}"

    def close(self) -> None:
        self._http.close()

    def _get(self, cid: CID, fmt: str, params: dict[str, str] | None = None) -> bytes:
        try:
            r = self._http.get(f"{self.url}/ipfs/{cid}", params={"format": fmt, **(params or {})},
                               headers={"Accept": f"application/vnd.ipld.{fmt}"})
        except httpx.HTTPError as exc:
            raise IpfsError(f"gateway {self.url} unreachable ({exc})") from exc
        if r.status_code != 200:
            raise IpfsError(f"gateway {self.url}: {cid} ({fmt}) failed ({r.status_code}: "
                            f"{r.text.strip()[:200]})")
        return r.content

    def get_block(self, cid: CID) -> bytes:
        """The bytes the gateway returns for block ``cid`` (not verified here)."""
        return self._get(cid, "raw")

    def get_car(self, cid: CID) -> dict[str, bytes]:
        """Every block of the DAG under ``cid`` as one CAR, verified: ``{cid: bytes}``.

        Raises :class:`BlockVerificationError` for any block that does not match its CID.
        """
        return read_car(self._get(cid, "car", {"dag-scope": "all"}), expect_root=cid)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varint(buf, pos)
    except UnixFSError as exc:
        raise IpfsError(f"CAR: {exc}") from exc


def read_car(data: bytes, expect_root: CID | None = None) -> dict[str, bytes]:
    """Parse a CARv1 and verify every block against its CID; ``{CIDv1 string: bytes}``."""
    n, pos = _varint(data, 0)
    try:
        header = dag_cbor.decode(data[pos:pos + n])
    except Exception as exc:  # dag_cbor raises its own error types
        raise IpfsError(f"CAR: unreadable header ({exc})") from exc
    pos += n
    if not isinstance(header, dict) or header.get("version") != 1:
        raise IpfsError(f"CAR: not a version 1 CAR (header {header!r:.100})")
    roots = [parse_cid(str(r)) for r in header.get("roots", [])]
    if expect_root is not None and parse_cid(expect_root) not in roots:
        raise IpfsError(f"CAR: root {expect_root} not among its roots")
    blocks: dict[str, bytes] = {}
    while pos < len(data):
        n, pos = _varint(data, pos)
        section = data[pos:pos + n]
        if len(section) != n:
            raise IpfsError("CAR: truncated block section")
        pos += n
        cid, rest = _split_cid(section)
        blocks[str(cid)] = verify_block(cid, rest)
    return blocks


def _split_cid(section: bytes) -> tuple[CID, bytes]:
    if section[:2] == b"\x12\x20":  # CIDv0: a bare sha2-256 multihash
        return parse_cid(CID.decode(section[:34])), section[34:]
    pos = 0
    for _ in range(3):  # version, codec, hash function
        _, pos = _varint(section, pos)
    length, pos = _varint(section, pos)
    end = pos + length
    return parse_cid(CID.decode(section[:end])), section[end:]
