"""The one safetensors reader and writer of r3mes (checkpoints, adapters, the expert cache).

A safetensors file is ``<u64 little-endian n><n bytes of JSON header><data>``; the header
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
the data section) plus an optional ``"__metadata__"`` object of strings.

:func:`read_header` validates a header as the ``safetensors`` library does before it maps a
file (header size bounded, known dtypes, shapes of non-negative integers, offsets that tile
the data section exactly, no byte before or after) but without mapping or reading any
tensor data, so an untrusted file (an adapter handed to the store, a damaged checkpoint) is
refused with an error that names the file and the tensor, and a file this module accepts is
one the library accepts too. Tensor data is then read three ways:

* :class:`SafetensorsFile` maps the file copy-on-write and returns zero-copy torch tensors
  (checkpoints, whose tensors may stay mapped for the model's lifetime);
* :func:`tensors_from_buffer` views a file already read into one uint8 buffer (the expert
  cache reads an adapter in one ``readinto``);
* the library's own ``safetensors.torch.load_file`` where a plain copy is wanted
  (:mod:`r3mes.core.peft_config`'s full validation).

:func:`write_safetensors` streams tensors out atomically with every tensor naturally aligned.
Nothing here unpickles anything. ``torch`` is imported only by the functions that make
tensors, so the adapter store and the CLI can validate headers without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from r3mes.errors import R3mesError
from r3mes.utils.atomic import atomic_open

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "MAX_HEADER_BYTES",
    "SafetensorsFile",
    "SafetensorsFormatError",
    "SafetensorsHeader",
    "TensorSpec",
    "parse_header",
    "read_header",
    "tensors_from_buffer",
    "torch_dtype",
    "write_safetensors",
]

#: Bytes per element of each dtype r3mes reads (the names the safetensors header uses).
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
#: The safetensors library refuses larger headers; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFormatError(R3mesError, ValueError):
    """A file is not a valid safetensors file; the message names the file and the tensor."""


class TensorSpec(NamedTuple):
    """One header entry; ``begin``/``end`` are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: ``data_start`` is where the data section begins in the file, and
    the tensors tile ``data_start .. data_start + data_bytes``, the end of the file."""

    path: Path
    data_start: int
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)


ErrorType = type[ValueError]


def parse_header(head: bytes | bytearray | memoryview, file_size: int, path: str | os.PathLike[str],
                 error: ErrorType = SafetensorsFormatError) -> SafetensorsHeader:
    """Validate the header of a ``file_size``-byte safetensors file whose first bytes are
    ``head`` (at least the 8-byte length and the header itself; more is ignored).

    Raises ``error`` naming ``path`` and, for a bad entry, the tensor.
    """
    where = Path(path)
    if file_size < 8 or len(head) < 8:
        raise error(f"{where}: truncated ({file_size} bytes; a safetensors file starts with an "
                    "8-byte header length)")
    (n,) = struct.unpack("<Q", bytes(head[:8]))
    if n > file_size - 8 or n > MAX_HEADER_BYTES or len(head) < 8 + n:
        raise error(f"{where}: truncated or not a safetensors file (header of {n} bytes, file "
                    f"of {file_size})")
    try:
        header = json.loads(bytes(head[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{where}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise error(f"{where}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error(f"{where}: corrupt safetensors header (__metadata__ must map strings to "
                    "strings)")
    data_start = 8 + n
    tensors: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            itemsize = DTYPE_SIZES[dtype]
            shape = tuple(_non_negative_int(s) for s in entry["shape"])
            begin, end = (_non_negative_int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise error(f"{where}: tensor {name!r}: bad header entry {entry!r} (known dtypes: "
                        f"{', '.join(DTYPE_SIZES)})") from None
        if end - begin != math.prod(shape) * itemsize:
            raise error(f"{where}: tensor {name!r}: offsets {begin}..{end} do not match shape "
                        f"{list(shape)} {dtype}")
        if data_start + end > file_size:
            raise error(f"{where}: truncated: tensor {name!r} needs bytes up to "
                        f"{data_start + end}, the file has {file_size}")
        tensors[name] = TensorSpec(dtype, shape, begin, end)
    # The library's rule: tensors tile the data section in offset order, with no overlap
    # (two names aliasing one buffer) and no gap or tail (bytes nothing accounts for).
    covered = 0
    for name, spec in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if spec.begin != covered:
            raise error(f"{where}: tensor {name!r} starts at data offset {spec.begin}, expected "
                        f"{covered} (tensors overlap or leave a gap)")
        covered = spec.end
    if data_start + covered != file_size:
        raise error(f"{where}: truncated or padded: the header describes "
                    f"{data_start + covered} bytes, the file has {file_size}")
    return SafetensorsHeader(where, data_start, tensors, metadata)


def _non_negative_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


def read_header(path: str | os.PathLike[str], error: ErrorType = SafetensorsFormatError
                ) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path`` (no tensor data is
    read). Raises ``error`` naming the file (missing, truncated, corrupt)."""
    where = Path(path)
    try:
        with open(where, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) == 8:
                (n,) = struct.unpack("<Q", prefix)
                if n <= min(size - 8, MAX_HEADER_BYTES):
                    prefix += handle.read(n)
    except FileNotFoundError:
        raise error(f"{where}: missing") from None
    except IsADirectoryError:
        raise error(f"{where}: a directory, not a safetensors file") from None
    return parse_header(prefix, size, where, error)


# --------------------------------------------------------------------------- torch side


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (one of :data:`DTYPE_SIZES`)."""
    return _torch_dtypes()[name]


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
        "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    }


class SafetensorsFile:
    """A validated, memory-mapped safetensors file; :meth:`get` returns zero-copy tensors.

    The header is checked completely on open (:func:`read_header`), so a truncated or
    corrupt file fails here with the file and tensor named, as ``error``.
    """

    def __init__(self, path: str | os.PathLike[str],
                 error: ErrorType = SafetensorsFormatError) -> None:
        self.path = Path(path)
        self.error = error
        header = read_header(self.path, error)
        self.metadata = header.metadata
        self.data_start = header.data_start
        #: name -> (dtype name, shape, begin, end), offsets into the data section
        self.entries: dict[str, TensorSpec] = header.tensors
        self._mm: mmap.mmap | None = None
        if header.data_start + header.data_bytes > 0:
            with open(self.path, "rb") as f:
                # Copy-on-write private map: tensors are writable views, the file is never
                # modified, and untouched pages cost no memory.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return torch_dtype(self.entries[name].dtype)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, backed by the memory map (no copy)."""
        import torch

        try:
            spec = self.entries[name]
        except KeyError:
            raise self.error(f"{self.path}: missing tensor {name!r}") from None
        dtype = torch_dtype(spec.dtype)
        count = spec.nbytes // DTYPE_SIZES[spec.dtype]
        if count == 0:
            return torch.empty(spec.shape, dtype=dtype)
        t = torch.frombuffer(self._mm, dtype=dtype, count=count,
                             offset=self.data_start + spec.begin)
        return t.view(spec.shape)

    def release_pages(self, begin: int, end: int) -> None:
        """Drop the whole pages of file bytes ``begin .. end`` from this process: clean
        copy-on-write pages of a file opened read-only, so touching them again only means a
        re-read."""
        page = mmap.PAGESIZE
        lo = -(-begin // page) * page
        hi = end // page * page
        if self._mm is not None and hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def tensors_from_buffer(buffer: torch.Tensor, path: str | os.PathLike[str],
                        error: ErrorType = SafetensorsFormatError) -> dict[str, torch.Tensor]:
    """The tensors of a whole safetensors file held in ``buffer`` (1-D uint8), validated as
    :func:`read_header` does; each is a view of ``buffer`` when its offset is aligned to its
    element size, else a copy (never a misaligned view)."""
    raw = buffer.numpy()
    header = parse_header(memoryview(raw), buffer.numel(), path, error)
    tensors: dict[str, torch.Tensor] = {}
    for key, spec in header.tensors.items():
        start = header.data_start + spec.begin
        part = buffer[start:header.data_start + spec.end]
        if start % DTYPE_SIZES[spec.dtype]:
            part = part.clone()
        tensors[key] = part.view(torch_dtype(spec.dtype)).view(spec.shape)
    return tensors


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> tuple[str, int]:
    """Stream ``tensors`` into a safetensors file atomically; returns (sha256, size).

    Widest dtype first so every tensor is naturally aligned; the data starts 64-aligned.
    """
    names = {dtype: name for name, dtype in _torch_dtypes().items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % 64)
    digest = hashlib.sha256()
    with atomic_open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for name in order:
            t = tensors[name].detach().contiguous()
            if t.numel() == 0:
                continue
            # Raw bytes through a uint8 view: works for bf16, which numpy lacks.
            buf = memoryview(t.view(-1).view(torch_dtype("U8")).numpy())
            for s in range(0, len(buf), 1 << 26):
                part = buf[s:s + (1 << 26)]
                f.write(part)
                digest.update(part)
    return digest.hexdigest(), 8 + len(raw) + offset
