"""The one safetensors reader: a header is validated as the safetensors library validates it,
with the file and the tensor named, and tensors are read without pickle or misaligned views."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r3mes.utils.safetensors_io import (
    MAX_HEADER_BYTES,
    SafetensorsFile,
    SafetensorsFormatError,
    read_header,
    tensors_from_buffer,
    write_safetensors,
)


def _raw(path, header, data=b"", pad=True):
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_written_file_reads_back_aligned_and_the_library_agrees(tmp_path):
    tensors = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(2, 5),
               "c": torch.randn(4).to(torch.bfloat16), "empty": torch.zeros(0, 3)}
    digest, size = write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    assert size == (tmp_path / "x.safetensors").stat().st_size and len(digest) == 64
    sf = SafetensorsFile(tmp_path / "x.safetensors")
    assert sf.metadata == {"format": "pt"} and sf.data_start % 64 == 0
    for name, t in tensors.items():
        assert torch.equal(sf.get(name), t)
        assert (sf.data_start + sf.entries[name].begin) % t.element_size() == 0
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as lib:
        assert sorted(lib.keys()) == sorted(tensors)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8),
     r"tensor 't': offsets 0..8 do not match shape \[3\] F32"),
    ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "'t': bad header"),
    ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "'t': bad header"),
    ({"t": F32_2}, bytes(4), r"truncated: tensor 't' needs bytes up to"),
    ({"t": F32_2}, bytes(12), "truncated or padded"),
    ({"t": F32_2, "u": F32_2}, bytes(8), "starts at data offset 0, expected 8"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12),
     "starts at data offset 4, expected 0"),
    ({"__metadata__": {"n": 1}, "t": F32_2}, bytes(8), "__metadata__ must map strings"),
    ([1, 2], b"", "not a JSON object"),
])
def test_malformed_headers_are_refused_as_the_library_refuses_them(tmp_path, header, data,
                                                                   message):
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsFormatError, match=message) as info:
        read_header(path)
    assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(SafetensorError), safe_open(str(path), framework="pt"):
        pass


def test_an_oversized_header_length_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="truncated or not a safetensors file"):
        read_header(path)


def test_short_and_missing_files_are_refused_naming_them(tmp_path):
    (tmp_path / "short").write_bytes(b"\1\2")
    with pytest.raises(SafetensorsFormatError, match="short: truncated"):
        read_header(tmp_path / "short")
    with pytest.raises(SafetensorsFormatError, match="nope: missing"):
        read_header(tmp_path / "nope")


def test_the_caller_chooses_the_error_class(tmp_path):
    class MyError(ValueError):
        pass

    with pytest.raises(MyError):
        SafetensorsFile(tmp_path / "nope", MyError)


def test_buffer_tensors_are_views_when_aligned_and_copies_when_not(tmp_path):
    # The library writes a 1-byte tensor before a 4-byte one when names order them so:
    # craft one at an odd offset by hand.
    header = {"odd": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    data = b"\7" + struct.pack("<2f", 1.5, -2.0)
    path = _raw(tmp_path / "odd.safetensors", header, data)
    buffer = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    got = tensors_from_buffer(buffer, path)
    assert got["f"].tolist() == [1.5, -2.0] and got["odd"].tolist() == [7]
    shared = buffer.untyped_storage().data_ptr()
    assert got["odd"].untyped_storage().data_ptr() == shared  # a view
    assert got["f"].untyped_storage().data_ptr() != shared  # copied: a view would misalign
    save_file({"g": torch.arange(4.0)}, str(tmp_path / "ok.safetensors"))
    ok = torch.frombuffer(bytearray((tmp_path / "ok.safetensors").read_bytes()),
                          dtype=torch.uint8)
    g = tensors_from_buffer(ok, tmp_path / "ok.safetensors")["g"]
    assert g.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert g.untyped_storage().data_ptr() == ok.untyped_storage().data_ptr()  # a view
