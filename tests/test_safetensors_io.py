"""merger.io.safetensors_file: header parsing, lazy reads, the streaming writer, malformed files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merger.core.limits import MAX_JSON_DEPTH, MAX_TENSORS
from merger.core.specs import TensorSpec
from merger.errors import MergerError
from merger.io.safetensors_file import SafetensorsReader, SafetensorsWriter
from merger.io.safetensors_header import read_header
from tests.conftest import expect_error, read_tensor, spec_of, tiny_state_dict, write_tensor


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-1000, 1000, (4,), generator=g, dtype=torch.int64),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
    }


def _raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors-like file with an arbitrary header (for malformed cases)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(text) if length is None else length)
    path.write_bytes(prefix + text + data)
    return path


# --- read_header on files written by the official library -----------------------------------------


def test_read_header_specs_match_official_file(tmp_path: Path) -> None:
    sd = _mixed_state_dict()
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    header = read_header(path)
    assert header.path == path
    assert header.tensors == {
        "f32": TensorSpec("F32", (3, 4)),
        "f16": TensorSpec("F16", (5,)),
        "bf16": TensorSpec("BF16", (2, 3)),
        "i64": TensorSpec("I64", (4,)),
        "scalar": TensorSpec("F32", ()),
        "empty": TensorSpec("F32", (0, 3)),
    }
    for key, tensor in sd.items():
        spec = header.tensors[key]
        assert spec.shape == tuple(tensor.shape)
        assert spec.nbytes == tensor.numel() * tensor.element_size()
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header.data_start == 8 + length
    assert header.metadata == {}


def test_read_header_orders_tensors_by_data_offset(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_mixed_state_dict(), path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    parsed = json.loads(raw[8 : 8 + length])
    parsed.pop("__metadata__", None)
    by_offset = sorted(parsed, key=lambda k: (parsed[k]["data_offsets"][0], parsed[k]["data_offsets"][1]))
    header = read_header(path)
    assert list(header.tensors) == by_offset
    assert list(header.offsets) == by_offset
    for key in by_offset:
        assert header.offsets[key] == tuple(parsed[key]["data_offsets"])
    begins = [header.offsets[k][0] for k in header.tensors]
    assert begins == sorted(begins)


def test_read_header_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", "note": "héllo"})
    assert read_header(path).metadata == {"format": "pt", "note": "héllo"}


# --- SafetensorsReader ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["f32", "f16", "bf16", "i64", "scalar", "empty"])
def test_reader_matches_official_load(tmp_path: Path, key: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_mixed_state_dict(), path)
    expected = load_file(path)[key]
    reader = SafetensorsReader(read_header(path))
    try:
        got = read_tensor(reader, key)
    finally:
        reader.close()
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_reader_reads_many_keys_in_any_order(tmp_path: Path) -> None:
    sd = tiny_state_dict(3)
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    reader = SafetensorsReader(read_header(path))
    try:
        for key in reversed(list(sd)):
            assert torch.equal(read_tensor(reader, key), sd[key])
        assert torch.equal(read_tensor(reader, "conv_first.bias"), sd["conv_first.bias"])
    finally:
        reader.close()


def test_reader_data_truncated_after_header_was_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(16), "b": torch.ones(16)}, path)
    header = read_header(path)
    last = max(header.offsets, key=lambda k: header.offsets[k][0])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    reader = SafetensorsReader(header)
    try:
        error = expect_error(lambda: read_tensor(reader, last))
    finally:
        reader.close()
    assert "truncated" in error.what
    assert last in error.what


# --- SafetensorsWriter ------------------------------------------------------------------------------


def test_writer_round_trip_read_by_official_library(tmp_path: Path) -> None:
    sd = _mixed_state_dict()
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, spec_of(sd), {"a": "1", "b": "two"})
    for key, tensor in sd.items():
        write_tensor(writer, key, tensor)
    sha = writer.finish()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_file(path)
    assert set(back) == set(sd)
    for key, tensor in sd.items():
        assert back[key].dtype == tensor.dtype
        assert torch.equal(back[key], tensor)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"a": "1", "b": "two"}
    # and our own reader agrees, in the writer's order
    header = read_header(path)
    assert list(header.tensors) == list(sd)
    assert header.data_start % 8 == 0


def test_writer_write_bytes_and_non_contiguous(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = base.t()  # not contiguous
    raw = torch.arange(5, dtype=torch.int64)
    sliced = base[1:]  # contiguous, but at an offset into its storage
    specs = {"t": TensorSpec("F32", (4, 3)), "s": TensorSpec("F32", (2, 4)), "raw": TensorSpec("I64", (5,))}
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, specs, {})
    write_tensor(writer, "t", transposed)
    write_tensor(writer, "s", sliced)
    write_tensor(writer, "raw", raw.numpy().tobytes())
    sha = writer.finish()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_file(path)
    assert torch.equal(back["t"], transposed)
    assert torch.equal(back["s"], sliced)
    assert torch.equal(back["raw"], raw)


def test_writer_finish_patches_same_length_metadata(tmp_path: Path) -> None:
    sd = tiny_state_dict(1)
    path = tmp_path / "out.safetensors"
    placeholder = {"merger.key": "0" * 64, "merger.note": "pending"}
    writer = SafetensorsWriter(path, spec_of(sd), placeholder)
    for key, tensor in sd.items():
        write_tensor(writer, key, tensor)
    final = {"merger.key": "ab" * 32, "merger.note": "done!!!"}
    sha = writer.finish(metadata=final)
    data = path.read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == final
    back = load_file(path)
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor)
    assert read_header(path).metadata == final


def test_writer_finish_with_unchanged_metadata_returns_file_sha(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    meta = {"k": "v"}
    writer = SafetensorsWriter(path, {"w": TensorSpec("F32", (3,))}, meta)
    write_tensor(writer, "w", torch.tensor([1.0, 2.0, 3.0]))
    sha = writer.finish(metadata=dict(meta))
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_header(path).metadata == meta


def test_writer_finish_patch_with_shorter_metadata(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, {"w": TensorSpec("F32", (3,))}, {"k": "x" * 40})
    write_tensor(writer, "w", torch.tensor([1.0, 2.0, 3.0]))
    sha = writer.finish(metadata={"k": "short"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "short"}
        assert torch.equal(f.get_tensor("w"), torch.tensor([1.0, 2.0, 3.0]))


def test_writer_finish_metadata_that_grows_raises(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, {"w": TensorSpec("F32", (2,))}, {"k": "0" * 8})
    write_tensor(writer, "w", torch.zeros(2))
    with pytest.raises(RuntimeError, match="length"):
        writer.finish(metadata={"k": "0" * 200})
    writer.abort()
    assert not path.exists()


def test_writer_keys_out_of_order_raises(tmp_path: Path) -> None:
    specs = {"a": TensorSpec("F32", (2,)), "b": TensorSpec("F32", (2,))}
    writer = SafetensorsWriter(tmp_path / "out.safetensors", specs, {})
    with pytest.raises(RuntimeError, match="'a'"):
        write_tensor(writer, "b", torch.zeros(2))
    writer.abort()


def test_writer_unknown_key_raises(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "out.safetensors", {"a": TensorSpec("F32", (2,))}, {})
    with pytest.raises(RuntimeError, match="'zzz'"):
        write_tensor(writer, "zzz", torch.zeros(2))
    writer.abort()


def test_writer_wrong_dtype_raises(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "out.safetensors", {"a": TensorSpec("F32", (2,))}, {})
    with pytest.raises(RuntimeError, match=r"F16\[2\].*F32\[2\]"):
        write_tensor(writer, "a", torch.zeros(2, dtype=torch.float16))
    writer.abort()


def test_writer_wrong_shape_raises(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "out.safetensors", {"a": TensorSpec("F32", (2, 3))}, {})
    with pytest.raises(RuntimeError, match=r"F32\[3, 2\].*F32\[2, 3\]"):
        write_tensor(writer, "a", torch.zeros(3, 2))
    writer.abort()


def test_writer_finish_before_all_tensors_raises(tmp_path: Path) -> None:
    specs = {"a": TensorSpec("F32", (2,)), "b": TensorSpec("F32", (2,))}
    writer = SafetensorsWriter(tmp_path / "out.safetensors", specs, {})
    write_tensor(writer, "a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="'b'"):
        writer.finish()
    writer.abort()


def test_writer_abort_removes_file(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, {"a": TensorSpec("F32", (2,)), "b": TensorSpec("F32", (2,))}, {})
    write_tensor(writer, "a", torch.zeros(2))
    assert path.exists()
    writer.abort()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


# --- malformed files --------------------------------------------------------------------------------


def test_malformed_shorter_than_8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    error = expect_error(lambda: read_header(path))
    assert "shorter than 8 bytes" in error.what
    assert str(path) in error.what


def test_malformed_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    error = expect_error(lambda: read_header(path))
    assert "shorter than 8 bytes" in error.what


def test_malformed_absurd_header_length(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "huge.safetensors", {}, length=2**62)
    error = expect_error(lambda: read_header(path))
    assert str(2**62) in error.what
    assert "implausible" in error.what


def test_malformed_header_longer_than_file(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "cut.safetensors", b'{"a": 1}', length=4096)
    error = expect_error(lambda: read_header(path))
    assert "truncated header" in error.what


def test_malformed_header_not_json(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "garbage.safetensors", b"this is not json at all!")
    error = expect_error(lambda: read_header(path))
    assert "not JSON" in error.what


def test_malformed_header_not_utf8(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "binary.safetensors", b"\xff\xfe\x00\x80" * 4)
    error = expect_error(lambda: read_header(path))
    assert "not JSON" in error.what


def test_malformed_header_json_array(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "array.safetensors", [1, 2, 3])
    error = expect_error(lambda: read_header(path))
    assert "not a JSON object" in error.what


def test_malformed_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    error = expect_error(lambda: read_header(path))
    assert "'w'" in error.what
    assert "does not fit" in error.what


def test_malformed_offsets_past_the_end(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [100, 116]}}
    path = _raw_file(tmp_path / "past.safetensors", header, b"\0" * 16)
    error = expect_error(lambda: read_header(path))
    assert "'w'" in error.what
    assert "100..116" in error.what


def test_malformed_offsets_disagree_with_shape(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    path = _raw_file(tmp_path / "short_range.safetensors", header, b"\0" * 16)
    error = expect_error(lambda: read_header(path))
    assert "'w'" in error.what
    assert "0..8" in error.what


def test_malformed_unsupported_dtype(tmp_path: Path) -> None:
    header = {"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}
    path = _raw_file(tmp_path / "complex.safetensors", header, b"\0" * 16)
    error = expect_error(lambda: read_header(path))
    assert "unsupported dtype C64" in error.what
    assert "'w'" in error.what


def test_malformed_entry_missing_fields(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2]}}
    path = _raw_file(tmp_path / "nooffsets.safetensors", header, b"\0" * 8)
    error = expect_error(lambda: read_header(path))
    assert "malformed entry for 'w'" in error.what


def test_malformed_metadata_not_a_mapping(tmp_path: Path) -> None:
    header = {"__metadata__": ["not", "a", "dict"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = _raw_file(tmp_path / "badmeta.safetensors", header, b"\0" * 4)
    error = expect_error(lambda: read_header(path))
    assert "__metadata__" in error.what or "metadata" in error.what


def test_malformed_negative_dimension(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, -4]}}
    path = _raw_file(tmp_path / "negative.safetensors", header, b"\0" * 8)
    error = expect_error(lambda: read_header(path))
    assert "'w'" in error.what


def test_malformed_error_has_fix_and_where(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\0")
    error = expect_error(lambda: read_header(path))
    assert error.where == str(path)
    assert error.fix and "re-save" in error.fix


# --- what the safetensors library refuses, merger refuses: one message per case -------------------

F32_2 = b'{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


def _why(tmp_path: Path, header: bytes, data: bytes = b"", *, length: int | None = None, library: bool = True) -> str:
    """The reason read_header gives for refusing a file with this raw header and data
    (which the library refuses too, unless `library` is false)."""
    path = _raw_file(tmp_path / "case.safetensors", header, data, length=length)
    error = expect_error(lambda: read_header(path))
    prefix = f"'{path}' is not a valid safetensors file: "
    assert error.what.startswith(prefix)
    assert error.where == str(path)
    if library:
        with pytest.raises(Exception):  # noqa: B017 - the library raises SafetensorError
            safe_open(str(path), framework="numpy").__enter__()
    else:
        safe_open(str(path), framework="numpy").__enter__()
    return error.what[len(prefix) :]


@pytest.mark.parametrize(
    ("header", "data", "why"),
    [
        # numbers: not finite, not integers, out of range
        (
            b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}',
            8,
            "header is not JSON: NaN is not a JSON number",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}',
            8,
            "header is not JSON: Infinity is not a JSON number",
        ),
        (b'{"__metadata__":{"k":-Infinity}}', 0, "header is not JSON: -Infinity is not a JSON number"),
        (b'{"w":{"dtype":"F32","shape":[1e999],"data_offsets":[0,8]}}', 8, "header has a number out of range: 1e999"),
        (
            b'{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}',
            8,
            "'w' has dimension 2.0, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}',
            8,
            "'w' has dimension 2.0, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}',
            4,
            "'w' has dimension true, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[null],"data_offsets":[0,4]}}',
            4,
            "'w' has dimension null, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[2,-0],"data_offsets":[0,0]}}',
            0,
            "'w' has dimension -0.0, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}',
            0,
            "'w' has dimension -1, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}',
            0,
            "'w' has dimension 1.8446744073709552e+19, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8]}}',
            8,
            "'w' has data offset 0.0, not an integer in 0..2**64-1",
        ),
        (
            b'{"w":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}',
            0,
            "'w' has shape [4294967296, 4294967296, 0], whose size overflows 64 bits",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}}',
            0,
            "'w' has shape [4611686018427387904], whose size overflows 64 bits",
        ),
        # byte ranges: overlaps, holes, bytes after the last tensor
        (
            b'{"a":' + F32_2 + b',"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
            12,
            "'b' has byte range 4..12, which overlaps 'a' (0..8)",
        ),
        (b'{"a":' + F32_2 + b',"b":' + F32_2 + b"}", 8, "'b' has byte range 0..8, which overlaps 'a' (0..8)"),
        (
            b'{"a":' + F32_2 + b',"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}',
            8,
            "'b' has byte range 4..4, which overlaps 'a' (0..8)",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
            12,
            "'w' has byte range 4..12, but the data before it ends at 0: a hole",
        ),
        (
            b'{"a":' + F32_2 + b',"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}',
            16,
            "'b' has byte range 12..16, but the data before it ends at 8: a hole",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}',
            4,
            "'w' has byte range 4..0, which ends before it begins",
        ),
        (b'{"w":' + F32_2 + b"}", 9, "1 byte after the last tensor's data (not in the header)"),
        (b'{"w":' + F32_2 + b"}", 13, "5 bytes after the last tensor's data (not in the header)"),
        (b"{}", 3, "3 bytes after the last tensor's data (not in the header)"),
        (b'{"w":' + F32_2 + b"}", 7, "'w' has byte range 0..8 that does not fit in the 7 bytes of data"),
        # duplicate keys, at every level
        (
            b'{"__metadata__":{},"__metadata__":{},"w":' + F32_2 + b"}",
            8,
            "header repeats the key '__metadata__' in one object",
        ),
        (
            b'{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
            8,
            "header repeats the key 'dtype' in one object",
        ),
        # encodings
        (b'{"\xff":' + F32_2 + b"}", 8, "header is not JSON: not UTF-8 (byte 0xff at offset 2)"),
        (
            '{"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'.encode("utf-16"),
            0,
            "header is not JSON: not UTF-8 (byte 0xff at offset 0)",
        ),
        (
            "{}".encode("utf-16-le"),
            0,
            "header is not JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        (b"\xef\xbb\xbf{}", 0, "header is not JSON: it starts with a UTF-8 byte-order mark"),
        (
            b'{"\\ud800":' + F32_2 + b"}",
            8,
            "header is not JSON: lone UTF-16 surrogate \\ud800 (no character) at offset 2",
        ),
        (b'{"a\x01":' + F32_2 + b"}", 8, "header is not JSON: Invalid control character at line 1 column 4"),
        (b"", 0, "header is not JSON: Expecting value at line 1 column 1"),
        (b"{}\x00", 0, "header is not JSON: Extra data at line 1 column 3"),
        (b"tensors", 0, "header is not JSON: Expecting value at line 1 column 1"),
        # metadata: a map of strings to strings
        (b'{"__metadata__":{"k":1}}', 0, "__metadata__ value of 'k' is the number 1, not a string"),
        (b'{"__metadata__":{"k":{"nested":"x"}}}', 0, "__metadata__ value of 'k' is an object, not a string"),
        (b'{"__metadata__":{"k":null}}', 0, "__metadata__ value of 'k' is null, not a string"),
        (b'{"__metadata__":{"k":true}}', 0, "__metadata__ value of 'k' is true, not a string"),
        (b'{"__metadata__":[]}', 0, "__metadata__ is a list of 0 items, not a JSON object"),
        (b'{"__metadata__":""}', 0, "__metadata__ is the string '', not a JSON object"),
        # entries
        (b'{"w":null}', 0, "malformed entry for 'w': null, not an object with dtype, shape, data_offsets"),
        (
            b'{"w":["F32",[2]]}',
            8,
            "malformed entry for 'w': a list of 2 items, not an object with dtype, shape, data_offsets",
        ),
        (b'{"w":{"dtype":"F32","shape":[0]}}', 0, "malformed entry for 'w': it has no data_offsets"),
        (
            b'{"w":{"dtype":["F32"],"shape":[0],"data_offsets":[0,0]}}',
            0,
            "malformed entry for 'w': its dtype is a list of 1 item, not a string",
        ),
        (
            b'{"w":{"dtype":{"F32":[]},"shape":[0],"data_offsets":[0,0]}}',
            0,
            "malformed entry for 'w': its dtype is an object, not a string",
        ),
        (b'{"w":{"dtype":"f32","shape":[0],"data_offsets":[0,0]}}', 0, "'w' has unknown dtype 'f32'"),
        (
            b'{"w":{"dtype":"F32","shape":{"0":2},"data_offsets":[0,8]}}',
            8,
            "malformed entry for 'w': its shape is an object, not a list",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}',
            8,
            "malformed entry for 'w': its data_offsets are a list of 3 items, not [begin, end]",
        ),
        (
            b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}',
            8,
            "'w' has byte range 0..8 (8 bytes), but F32[4] takes 16 bytes",
        ),
        (b"[]", 0, "header is a list of 0 items, not a JSON object"),
    ],
)
def test_refused_like_the_library(tmp_path: Path, header: bytes, data: int, why: str) -> None:
    assert _why(tmp_path, header, bytes(data)) == why


def test_refused_header_length(tmp_path: Path) -> None:
    from merger.core.limits import MAX_HEADER_BYTES

    assert (
        _why(tmp_path, b"{}", length=2**62) == f"header length {2**62} is implausible (over {MAX_HEADER_BYTES} bytes)"
    )
    assert _why(tmp_path, b"{}", length=4096) == "truncated header (4096 bytes declared, 2 in the file)"


@pytest.mark.parametrize(
    ("header", "data"),
    [
        (b'{"w":["F32",[2],[0,8]]}', 8),  # serde reads a struct from the list of its fields
        (b'{"w":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', 8),  # and an enum from {"variant": null}
        (b'{"w":{"shape":[2],"extra":[1.5,-0,{"x":null}],"data_offsets":[0,8],"dtype":"F32"}}', 8),  # unknown fields
        (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 60 + b"]" * 60 + b"}}", 8),
        (
            b'\t\r\n {"__metadata__":null,"\\u0077":{"d\\u0074ype":"F\\u0033\\u0032",'
            b'"shape":[2],"data_offsets":[0,8]}}  ',
            8,
        ),
        (b'{"w":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}}', 0),  # 0 first: no overflow
        (
            b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
            0,
        ),
        (b'{"\\ud83d\\ude00":' + F32_2 + b',"__metadata__":{"k":"\\u00e9\\\\ud800"}}', 8),
        (b"{}", 0),
    ],
)
def test_read_like_the_library(tmp_path: Path, header: bytes, data: int) -> None:
    path = _raw_file(tmp_path / "case.safetensors", header, bytes(data))
    ours = read_header(path)
    with safe_open(str(path), framework="numpy") as f:
        assert list(ours.tensors) == sorted(f.keys(), key=lambda k: (*ours.offsets[k], k))
        for key in f.keys():  # noqa: SIM118 - safe_open is no mapping
            assert (ours.tensors[key].dtype, list(ours.tensors[key].shape)) == (
                f.get_slice(key).get_dtype(),
                f.get_slice(key).get_shape(),
            )
        assert ours.metadata == (f.metadata() or {})


def test_duplicate_keys_the_library_reads(tmp_path: Path) -> None:
    """The library keeps the last of two equal keys (except __metadata__ and the fields of an
    entry); merger refuses them all: which tensor a name means must not depend on the reader."""
    assert _why(tmp_path, b'{"w":' + F32_2 + b',"w":' + F32_2 + b"}", bytes(8), library=False) == (
        "header repeats the key 'w' in one object"
    )
    twice = b'{"\\u001b[2J":' + F32_2 + b',"\\u001b[2J":' + F32_2 + b"}"
    assert _why(tmp_path, twice, bytes(8), library=False) == "header repeats the key '\\x1b[2J' in one object"
    metadata = b'{"__metadata__":{"k":"1","k":"2"}}'
    assert _why(tmp_path, metadata, library=False) == "header repeats the key 'k' in one object"


def test_unsupported_dtype_the_library_reads(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "c64.safetensors", b'{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', bytes(8))
    with safe_open(str(path), framework="numpy") as f:
        assert f.get_slice("w").get_dtype() == "C64"
    assert "'w' has unsupported dtype C64 (merger reads F64, F32," in expect_error(lambda: read_header(path)).what


def test_deep_nesting_is_refused_without_recursion(tmp_path: Path) -> None:
    for depth in (63, 1000, 200_000):
        nest = b"[" * depth + b"]" * depth
        header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + nest + b"}}"
        # the library allows 127 levels (serde_json's limit), merger MAX_JSON_DEPTH
        assert _why(tmp_path, header, bytes(8), library=depth > 125) == (
            f"header nests {depth + 2} levels deep, more than the {MAX_JSON_DEPTH} allowed (MAX_JSON_DEPTH)"
        )
        metadata = b'{"__metadata__":{"k":' + nest + b"}}"
        assert _why(tmp_path, metadata).startswith(f"header nests {depth + 2} levels deep")
    unbalanced = b'{"__metadata__":' + b'{"k":' * 500_000
    assert _why(tmp_path, unbalanced).startswith("header nests 500001 levels deep")


def test_tensor_limit_refused_before_parsing(tmp_path: Path) -> None:
    import tracemalloc

    entries = b",".join(b'"%d":["F32",[0],[0,0]]' % i for i in range(MAX_TENSORS + 1))
    path = _raw_file(tmp_path / "many.safetensors", b'{"__metadata__":{},' + entries + b"}")
    size = path.stat().st_size
    tracemalloc.start()
    start = time.perf_counter()
    error = expect_error(lambda: read_header(path))
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert error.what.endswith(
        f"header declares about {MAX_TENSORS + 1} tensors, more than the {MAX_TENSORS} allowed (MAX_TENSORS)"
    )
    # the header's bytes and a few copies of them, never a million parsed entries
    assert peak < 5 * size, (peak, size)
    assert elapsed < 3, elapsed


def test_tensor_limit_is_not_off_by_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import merger.io.safetensors_header as safetensors_file

    monkeypatch.setattr(safetensors_file, "MAX_TENSORS", 100)
    for count, metadata in ((100, b'"__metadata__":{},'), (100, b""), (101, b'"__metadata__":{"k":"v"},')):
        entries = b",".join(b'"%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(count))
        path = _raw_file(tmp_path / "many.safetensors", b"{" + metadata + entries + b"}")
        if count <= 100:
            assert len(read_header(path).tensors) == count
        else:
            with pytest.raises(
                MergerError, match=r"declares about 101 tensors, more than the 100 allowed \(MAX_TENSORS\)"
            ):
                read_header(path)


def test_os_errors_are_merger_errors(tmp_path: Path) -> None:
    error = expect_error(lambda: read_header(tmp_path))
    assert error.what == f"cannot read '{tmp_path}': not a regular file (a FIFO, a device or a socket?)"
    os.mkfifo(tmp_path / "fifo.safetensors")  # would block a plain open forever
    error = expect_error(lambda: read_header(tmp_path / "fifo.safetensors"))
    assert "not a regular file" in error.what
    error = expect_error(lambda: read_header(tmp_path / "absent.safetensors"))
    assert error.what == f"cannot read '{tmp_path / 'absent.safetensors'}': No such file or directory"
