"""Content identifiers: parse, make and check the CIDs of blocks.

r3mes names what it distributes by CIDv1 (base32, ``bafy...``): the DAG-PB/UnixFS root of a
directory (see :mod:`r3mes.distribution.unixfs`), hashed with sha2-256. CIDs are handled by
the ``multiformats`` library; this module only adds the rules r3mes applies: every block that
comes from outside is hashed here and compared with the CID it was asked for before anything
reads it (:func:`verify_block`).
"""

from __future__ import annotations

import hashlib

from multiformats import CID, multihash

from r3mes.errors import R3mesError

__all__ = ["CID", "CIDError", "BlockVerificationError", "block_cid", "parse_cid",
           "verify_block", "ipfs_uri"]

# Blocks we accept: what kubo makes for files and directories (dag-pb, raw leaves).
_CODECS = ("dag-pb", "raw")


class CIDError(R3mesError, ValueError):
    """A string that is not a CID r3mes can fetch (bad syntax, unknown codec or hash)."""


class BlockVerificationError(R3mesError, ValueError):
    """A block whose bytes do not hash to the CID it was fetched for."""


def parse_cid(text: str | CID) -> CID:
    """``ipfs://CID``, ``/ipfs/CID`` or a bare CID (v0 or v1) as a CIDv1 (base32).

    Raises :class:`CIDError` naming the text when it is not a sha2-256 dag-pb or raw CID.
    """
    if isinstance(text, CID):
        cid = text
    else:
        s = text.strip()
        for prefix in ("ipfs://", "/ipfs/"):
            if s.startswith(prefix):
                s = s[len(prefix):]
        s = s.split("/", 1)[0].split("?", 1)[0]
        try:
            cid = CID.decode(s)
        except Exception as exc:  # multiformats raises several error types for bad input
            raise CIDError(f"{text!r} is not a CID ({exc})") from exc
    if cid.codec.name not in _CODECS:
        raise CIDError(f"{cid}: codec {cid.codec.name} is not one r3mes fetches "
                       f"({', '.join(_CODECS)})")
    if cid.hashfun.name != "sha2-256":
        raise CIDError(f"{cid}: hash {cid.hashfun.name} is not sha2-256")
    return cid.set(version=1, base="base32")


def block_cid(data: bytes, codec: str = "dag-pb") -> CID:
    """The CIDv1 (sha2-256) of one block's bytes."""
    return CID("base32", 1, codec, multihash.wrap(hashlib.sha256(data).digest(), "sha2-256"))


def verify_block(cid: CID, data: bytes) -> bytes:
    """Return ``data`` if it hashes to ``cid``; else raise :class:`BlockVerificationError`."""
    if hashlib.sha256(data).digest() != cid.raw_digest:
        raise BlockVerificationError(
            f"block {cid}: received {len(data)} bytes that do not hash to this CID "
            "(corrupted or substituted in transit); refused")
    return data


def ipfs_uri(cid: CID | str) -> str:
    """``ipfs://<CIDv1>``: how r3mes prints a CID for the user to pass back."""
    return f"ipfs://{parse_cid(cid)}"
