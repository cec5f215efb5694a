"""The safetensors format, read lazily and written as a stream.

Layout: 8 bytes little-endian header length N, N bytes of JSON header
({key: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the
data. The header alone gives every key, shape and dtype, so a plan can check a
10 GB merge by reading a few kilobytes. Tensors are read one at a time with
`readinto`; the writer knows every spec in advance (from the plan), writes the
header first and streams tensors after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from merger.errors import MergerError
from merger.specs import DTYPE_SIZES, TensorSpec

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGNMENT = 8


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: specs in data order, byte ranges, metadata."""

    path: Path
    data_start: int
    tensors: dict[str, TensorSpec]
    offsets: dict[str, tuple[int, int]]
    metadata: dict[str, str]


def _bad_file(path: Path, why: str) -> MergerError:
    return MergerError(
        f"'{path}' is not a valid safetensors file: {why}",
        where=str(path),
        fix="check that the file was fully written (re-download or re-save it)",
    )


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad_file(path, "shorter than 8 bytes")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise _bad_file(path, f"header length {length} is implausible")
            raw = f.read(length)
            file_size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise MergerError(f"cannot read '{path}': {e.strerror}", where=str(path)) from None
    if len(raw) < length:
        raise _bad_file(path, "truncated header")
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad_file(path, f"header is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise _bad_file(path, "header is not a JSON object")
    metadata_raw = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise _bad_file(path, "__metadata__ is not a JSON object")
    metadata = {str(k): str(v) for k, v in metadata_raw.items()}
    data_start = 8 + length
    entries: list[tuple[int, str, TensorSpec, tuple[int, int]]] = []
    for key, info in parsed.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _bad_file(path, f"malformed entry for '{key}'") from None
        if any(d < 0 for d in shape) or end < begin:
            raise _bad_file(path, f"'{key}' has a negative dimension or byte range")
        if dtype not in DTYPE_SIZES:
            raise _bad_file(path, f"'{key}' has unsupported dtype {dtype}")
        spec = TensorSpec(dtype, shape)
        if end - begin != spec.nbytes or begin < 0 or data_start + end > file_size:
            raise _bad_file(path, f"'{key}' has byte range {begin}..{end} that does not fit")
        entries.append((begin, key, spec, (begin, end)))
    entries.sort()
    return SafetensorsHeader(
        path=path,
        data_start=data_start,
        tensors={key: spec for _, key, spec, _ in entries},
        offsets={key: rng for _, key, _, rng in entries},
        metadata=metadata,
    )


class SafetensorsReader:
    """Reads one tensor at a time from a safetensors file."""

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._file: io.FileIO | None = None

    def _handle(self) -> io.FileIO:
        if self._file is None:
            self._file = io.FileIO(self.header.path, "rb")
        return self._file

    def read_bytes(self, key: str) -> bytearray:
        begin, end = self.header.offsets[key]
        buffer = bytearray(end - begin)
        f = self._handle()
        f.seek(self.header.data_start + begin)
        view = memoryview(buffer)
        done = 0
        while done < len(buffer):
            n = f.readinto(view[done:])
            if not n:
                raise _bad_file(self.header.path, f"data of '{key}' is truncated")
            done += n
        return buffer

    def read_tensor(self, key: str) -> torch.Tensor:
        from merger.tensor_bytes import tensor_from_buffer

        spec = self.header.tensors[key]
        return tensor_from_buffer(self.read_bytes(key), spec.dtype, spec.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def build_header(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str], *, min_length: int = 0) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in `specs` order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, spec in specs.items():
        header[key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    length = max(len(text), min_length)
    length += -(8 + length) % ALIGNMENT
    return struct.pack("<Q", length) + text.ljust(length, b" ")


class SafetensorsWriter:
    """Streams tensors, in the order of `specs`, into a new safetensors file.

    The metadata may be replaced once at the end (`finish(metadata=...)`) as
    long as it does not grow: placeholders of the final length (e.g. a hash of
    zeros) keep the header's size. The file's sha256 is computed as it is
    written; a patched header costs one re-read.
    """

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> None:
        self.path = path
        self.specs = dict(specs)
        self._keys = iter(self.specs)
        self._header = build_header(self.specs, metadata)
        self._sha = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 (closed in finish/abort)
        self._write(self._header)
        self.bytes_written = len(self._header)

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha.update(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        from merger.tensor_bytes import dtype_code, tensor_memoryview

        expected_key = next(self._keys, None)
        spec = self.specs.get(key)
        if key != expected_key or spec is None:
            raise RuntimeError(f"writer expected tensor {expected_key!r}, got {key!r}")
        got = TensorSpec(dtype_code(tensor.dtype), tuple(tensor.shape))
        if got != spec:
            raise RuntimeError(f"tensor {key!r} is {got.describe()}, planned {spec.describe()}")
        tensor = tensor.contiguous()
        self._write(tensor_memoryview(tensor))
        self.bytes_written += spec.nbytes

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write a tensor given as raw bytes (already in the planned dtype)."""
        expected_key = next(self._keys, None)
        if key != expected_key or len(data) != self.specs[key].nbytes:
            raise RuntimeError(f"writer expected tensor {expected_key!r} bytes, got {key!r}")
        self._write(memoryview(data))
        self.bytes_written += len(data)

    def finish(self, metadata: Mapping[str, str] | None = None) -> str:
        """Flush, patch the metadata if given, fsync, close; returns the file's sha256."""
        leftover = next(self._keys, None)
        if leftover is not None:
            raise RuntimeError(f"writer finished before tensor {leftover!r}")
        sha = self._sha.hexdigest()
        if metadata is not None:
            header = build_header(self.specs, metadata, min_length=len(self._header) - 8)
            if len(header) != len(self._header):
                raise RuntimeError("patched safetensors header changed length")
            if header != self._header:
                self._file.seek(0)
                self._file.write(header)
                sha = ""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return sha or file_sha256(self.path)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()
