"""The safetensors format, read lazily and written as a stream.

Layout: 8 bytes little-endian header length N, N bytes of JSON header
({key: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the
data. The header alone gives every key, shape and dtype, so a plan can check a
10 GB merge by reading a few kilobytes. Tensors are read one at a time with
`readinto`; the writer knows every spec in advance (from the plan), writes the
header first and streams tensors after it.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from merger.core.specs import TensorSpec

if TYPE_CHECKING:
    pass

from merger.io.safetensors_header import SafetensorsHeader, _bad_file

ALIGNMENT = 8
WRITEBACK_BYTES = 64 * 1024 * 1024


class SafetensorsReader:
    """Reads one tensor at a time from a safetensors file."""

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._file: io.FileIO | None = None

    def _handle(self) -> io.FileIO:
        if self._file is None:
            self._file = io.FileIO(self.header.path, "rb")
        return self._file

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        """Bytes [start, stop) of tensor `key` read into `out`; returns the filled view.

        Uses positioned reads, so several threads may share one reader.
        """
        begin, _ = self.header.offsets[key]
        view = out[: stop - start]
        fd = self._handle().fileno()
        offset = self.header.data_start + begin + start
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                raise _bad_file(self.header.path, f"data of '{key}' is truncated")
            done += n
        return view

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

    Each tensor's bytes may come in several chunks (`write_chunk`), in order.
    The metadata may be replaced once at the end (`finish(metadata=...)`) as
    long as it does not grow: placeholders of the final length (e.g. a hash of
    zeros) keep the header's size. The file's sha256 is computed as it is
    written, unless `final_header` is false (the header will be patched, so
    the file is hashed once at the end instead). Written data is handed to the
    kernel for write-back as it goes, so the final fsync finds little to do.
    """

    def __init__(
        self, path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str], *, final_header: bool = True
    ) -> None:
        self.path = path
        self.specs = dict(specs)
        self._keys = iter(self.specs)
        self._key: str | None = None
        self._left = 0  # bytes still due for the current key
        self._header = build_header(self.specs, metadata)
        self._sha = hashlib.sha256() if final_header else None
        self._file = io.FileIO(path, "wb")
        self._flushed = 0
        self.bytes_written = 0
        self._write(self._header)

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += self._file.write(view[done:]) or 0
        if self._sha is not None:
            self._sha.update(view)
        self.bytes_written += len(view)
        if self.bytes_written - self._flushed >= WRITEBACK_BYTES:
            start_writeback(self._file.fileno(), self._flushed, self.bytes_written - self._flushed)
            self._flushed = self.bytes_written

    def write_chunk(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of tensor `key` (in the planned dtype); tensors come in spec order."""
        if self._left == 0:
            expected = next(self._keys, None)
            if key != expected:
                raise RuntimeError(f"writer expected tensor {expected!r}, got {key!r}")
            self._key, self._left = key, self.specs[key].nbytes
        if key != self._key or len(data) > self._left:
            raise RuntimeError(f"writer got {len(data)} bytes for {key!r}, {self._left} due for {self._key!r}")
        self._write(memoryview(data).cast("B") if len(data) else b"")
        self._left -= len(data)

    def finish(self, metadata: Mapping[str, str] | None = None) -> str:
        """Flush, patch the metadata if given, fsync, close; returns the file's sha256."""
        leftover = next(self._keys, None)
        if leftover is not None or self._left:
            raise RuntimeError(f"writer finished before tensor {leftover or self._key!r}")
        sha = self._sha.hexdigest() if self._sha is not None else ""
        if metadata is not None:
            header = build_header(self.specs, metadata, min_length=len(self._header) - 8)
            if len(header) != len(self._header):
                raise RuntimeError("patched safetensors header changed length")
            if header != self._header:
                os.pwrite(self._file.fileno(), header, 0)
                sha = ""
        os.fsync(self._file.fileno())
        self._file.close()
        return sha or file_sha256(self.path)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: function(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


_START_WRITEBACK = _sync_file_range() if sys.platform.startswith("linux") else None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting (Linux)."""
    if _START_WRITEBACK is not None:
        _START_WRITEBACK(fd, offset, length)


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()
