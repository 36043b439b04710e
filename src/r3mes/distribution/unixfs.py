"""UnixFS over DAG-PB: the block layout kubo's ``ipfs add`` gives files and directories.

r3mes computes the CIDs of what it publishes locally, block for block as kubo does with its
default importer settings (``--cid-version=1 --raw-leaves=false``: 256 KiB chunks, balanced
DAG of at most 174 links a node, every node DAG-PB), so the CID ``r3mes adapters list``
prints is the one a kubo node returns for the same directory, and a pull can tell from a CID
alone which blocks it already holds.

Wire formats (protobuf, written out here because they are three small messages and the
bytes must be exactly kubo's; the CID/multihash side uses ``multiformats``)::

    PBNode { repeated PBLink Links = 2; optional bytes Data = 1; }   Links written first
    PBLink { optional bytes Hash = 1; optional string Name = 2; optional uint64 Tsize = 3; }
    UnixFS Data { Type = 1 (1 directory, 2 file); Data = 2; filesize = 3; blocksizes = 4 }

A file leaf is ``PBNode{Data: UnixFS{File, Data: chunk, filesize}}``; an inner node links its
children (``Tsize`` = the bytes of the child's whole subtree) with ``UnixFS{File, filesize,
blocksizes}``; a directory is ``PBNode{Links: entries sorted by name, Data: UnixFS{Dir}}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from r3mes.distribution.cid import CID, block_cid
from r3mes.errors import R3mesError

CHUNK_SIZE = 262144  # kubo's default chunker, size-262144
MAX_LINKS = 174  # kubo's balanced layout: links per node
TYPE_DIRECTORY = 1
TYPE_FILE = 2

__all__ = ["CHUNK_SIZE", "MAX_LINKS", "DagNode", "Link", "UnixFSError", "build_dag",
           "decode_node", "file_leaf", "LocalDag", "read_varint"]


class UnixFSError(R3mesError, ValueError):
    """A DAG-PB block that is not well-formed UnixFS (or a kind r3mes does not read)."""


# -- protobuf ---------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint(num << 3 | wire)


def _bytes_field(num: int, value: bytes) -> bytes:
    return _field(num, 2) + _varint(len(value)) + value


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """An unsigned LEB128 varint (protobuf, multiformats, CAR framing) at ``pos``; returns
    ``(value, next position)``."""
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise UnixFSError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message (varint and length-delimited only)."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
            yield num, value
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            if pos + n > len(buf):
                raise UnixFSError("length-delimited field runs past the block")
            yield num, buf[pos:pos + n]
            pos += n
        else:
            raise UnixFSError(f"protobuf wire type {wire} is not used by DAG-PB/UnixFS")


# -- nodes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """A DAG-PB link: child CID, entry name ('' inside a file) and cumulative size."""

    cid: CID
    name: str
    tsize: int


@dataclass
class DagNode:
    """A decoded DAG-PB/UnixFS node."""

    links: list[Link]
    type: int
    data: bytes = b""
    filesize: int = 0
    blocksizes: list[int] = field(default_factory=list)


def _unixfs(kind: int, data: bytes | None = None, filesize: int | None = None,
            blocksizes: tuple[int, ...] | list[int] = ()) -> bytes:
    out = _field(1, 0) + _varint(kind)
    if data is not None:
        out += _bytes_field(2, data)
    if filesize is not None:
        out += _field(3, 0) + _varint(filesize)
    for size in blocksizes:
        out += _field(4, 0) + _varint(size)
    return out


def _pbnode(links: list[Link], data: bytes) -> bytes:
    out = b""
    for link in links:
        body = (_bytes_field(1, link.cid.digest) + _bytes_field(2, link.name.encode())
                + _field(3, 0) + _varint(link.tsize))
        out += _bytes_field(2, body)
    return out + _bytes_field(1, data)


def file_leaf(chunk: bytes) -> bytes:
    """The block of one file chunk (a leaf, as kubo writes it without raw leaves)."""
    return _pbnode([], _unixfs(TYPE_FILE, chunk, len(chunk)))


def decode_node(block: bytes) -> DagNode:
    """Decode a DAG-PB block holding a UnixFS file or directory node.

    Raises :class:`UnixFSError` for anything else (HAMT shards, symlinks, malformed bytes).
    """
    links: list[Link] = []
    unixfs: bytes | None = None
    for num, value in _fields(block):
        if num == 2 and isinstance(value, bytes):
            h, name, tsize = None, "", 0
            for n, v in _fields(value):
                if n == 1 and isinstance(v, bytes):
                    h = v
                elif n == 2 and isinstance(v, bytes):
                    name = v.decode("utf-8", errors="strict")
                elif n == 3 and isinstance(v, int):
                    tsize = v
            if h is None:
                raise UnixFSError("DAG-PB link without a hash")
            try:
                links.append(Link(CID.decode(h), name, tsize))
            except Exception as exc:
                raise UnixFSError(f"DAG-PB link with a bad CID ({exc})") from exc
        elif num == 1 and isinstance(value, bytes):
            unixfs = value
        else:
            raise UnixFSError(f"unexpected DAG-PB field {num}")
    if unixfs is None:
        raise UnixFSError("DAG-PB node without UnixFS data")
    node = DagNode(links=links, type=0)
    for num, value in _fields(unixfs):
        if num == 1 and isinstance(value, int):
            node.type = value
        elif num == 2 and isinstance(value, bytes):
            node.data = value
        elif num == 3 and isinstance(value, int):
            node.filesize = value
        elif num == 4 and isinstance(value, int):
            node.blocksizes.append(value)
    if node.type not in (TYPE_DIRECTORY, TYPE_FILE):
        raise UnixFSError(f"UnixFS node type {node.type} is not a plain file or directory")
    if node.type == TYPE_FILE and len(node.blocksizes) != len(links):
        raise UnixFSError("UnixFS file node: blocksizes and links disagree")
    return node


# -- building ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeafSpan:
    """Where a leaf's chunk lives in a local file (the block is rebuilt from it on demand)."""

    path: Path
    offset: int
    length: int

    def block(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(self.length)
        if len(chunk) != self.length:
            raise OSError(f"{self.path}: shorter than when it was indexed")
        return file_leaf(chunk)


class LocalDag:
    """The UnixFS DAG of local files and directories, built without storing any block twice.

    ``roots`` maps the CID of every file and directory added to its path (a subtree a pull can
    copy instead of fetching); ``leaves`` maps each leaf CID to its chunk's place in a file;
    ``inner`` holds the (small) inner and directory blocks, so :meth:`block` can serve every
    block of the DAG.
    """

    def __init__(self) -> None:
        self.roots: dict[str, Path] = {}
        self.leaves: dict[str, LeafSpan] = {}
        self.inner: dict[str, bytes] = {}

    def __contains__(self, cid: object) -> bool:
        key = str(cid)
        return key in self.roots or key in self.leaves or key in self.inner

    def block(self, cid: CID | str) -> bytes | None:
        """The bytes of block ``cid`` if it is part of this DAG, else None."""
        key = str(cid)
        if key in self.inner:
            return self.inner[key]
        span = self.leaves.get(key)
        return span.block() if span is not None else None

    def add(self, path: str | os.PathLike[str]) -> tuple[CID, int]:
        """Add a file or directory; return its root CID and cumulative size (``Tsize``)."""
        p = Path(path)
        cid, tsize = self._add_dir(p) if p.is_dir() else self._add_file(p)
        self.roots[str(cid)] = p
        return cid, tsize

    def _add_file(self, path: Path) -> tuple[CID, int]:
        # (cid, tsize, content bytes) of each leaf, read one chunk at a time
        leaves: list[tuple[CID, int, int]] = []
        offset = 0
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(CHUNK_SIZE)
                if not chunk and leaves:
                    break
                block = file_leaf(chunk) if chunk else _pbnode([], _unixfs(TYPE_FILE, None, 0))
                cid = block_cid(block)
                if chunk:
                    self.leaves[str(cid)] = LeafSpan(path, offset, len(chunk))
                else:
                    self.inner[str(cid)] = block  # the empty file: one node, no data
                leaves.append((cid, len(block), len(chunk)))
                offset += len(chunk)
                if len(chunk) < CHUNK_SIZE:
                    break
        if len(leaves) == 1:
            return leaves[0][0], leaves[0][1]
        depth, cap = 1, MAX_LINKS
        while cap < len(leaves):
            depth, cap = depth + 1, cap * MAX_LINKS
        cid, tsize, _ = self._inner(leaves, depth)
        return cid, tsize

    def _inner(self, children: list[tuple[CID, int, int]], depth: int
               ) -> tuple[CID, int, int]:
        """The balanced layout: a node of ``depth`` over up to 174 full subtrees of
        ``depth - 1`` (the last one possibly partial), as kubo fills it left to right."""
        if depth == 0:
            return children[0]
        per = MAX_LINKS ** (depth - 1)
        subs = [self._inner(children[i:i + per], depth - 1)
                for i in range(0, len(children), per)]
        links = [Link(c, "", t) for c, t, _ in subs]
        sizes = [s for _, _, s in subs]
        block = _pbnode(links, _unixfs(TYPE_FILE, None, sum(sizes), sizes))
        cid = block_cid(block)
        self.inner[str(cid)] = block
        return cid, len(block) + sum(t for _, t, _ in subs), sum(sizes)

    def _add_dir(self, path: Path) -> tuple[CID, int]:
        links = []
        # kubo sorts entries by their UTF-8 bytes; symlinks and special files are skipped
        for entry in sorted(os.scandir(path), key=lambda e: e.name.encode()):
            if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
                continue
            cid, tsize = self.add(entry.path)
            links.append(Link(cid, entry.name, tsize))
        block = _pbnode(links, _unixfs(TYPE_DIRECTORY))
        cid = block_cid(block)
        self.inner[str(cid)] = block
        return cid, len(block) + sum(link.tsize for link in links)


def build_dag(path: str | os.PathLike[str]) -> tuple[CID, LocalDag]:
    """The UnixFS root CID of a file or directory, with the DAG that serves its blocks."""
    dag = LocalDag()
    cid, _ = dag.add(path)
    return cid, dag
