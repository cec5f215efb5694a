"""The safetensors format, read lazily and written as a stream.

Layout: 8 bytes little-endian header length N, N bytes of JSON header
({key: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the
data. The header alone gives every key, shape and dtype, so a plan can check a
10 GB merge by reading a few kilobytes. Tensors are read one at a time with
`readinto`; the writer knows every spec in advance (from the plan), writes the
header first and streams tensors after it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import io
import json
import os
import struct
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from merger.core.specs import TensorSpec

if TYPE_CHECKING:
    pass

from merger.io.safetensors_header import SafetensorsHeader, _bad_file

METADATA_KEY = "__metadata__"
#: json.dumps's own string writer (ensure_ascii), so that headers are the bytes json.dumps gives
_string: Callable[[str], str] = json.encoder.encode_basestring_ascii

ALIGNMENT = 8
WRITEBACK_BYTES = 64 * 1024 * 1024
SMALL_WRITE_BYTES = 64 * 1024  # writes smaller than this are gathered ...
PENDING_BYTES = 1024 * 1024  # ... into writes of about this size
PARALLEL_HASH_BYTES = 1024 * 1024  # writes at least this large are hashed while the kernel copies them
READ_AHEAD_BYTES = 1024 * 1024  # a small read fetches this much of the file, for the small reads that follow


class SafetensorsReader:
    """Reads one tensor at a time from a safetensors file."""

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._file: io.FileIO | None = None
        self._ahead = threading.local()  # per thread: (file offset, bytes) read ahead for small reads

    def _handle(self) -> io.FileIO:
        if self._file is None:
            self._file = io.FileIO(self.header.path, "rb")
        return self._file

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        """Bytes [start, stop) of tensor `key` read into `out`; returns the filled view.

        Uses positioned reads, so several threads may share one reader.
        """
        begin, end = self.header.offsets[key]
        small = end - begin < SMALL_WRITE_BYTES  # a span of a large tensor (a sample of it) reads only itself
        return self._read(self.header.data_start + begin + start, out[: stop - start], key, ahead=small)

    def read_tensors(self, keys: Sequence[str], sizes: Sequence[int], out: memoryview) -> memoryview:
        """Whole tensors `keys` (of `sizes` bytes) one after another into `out`: one read when the
        file holds them one after another (as merger writes them), else tensor by tensor."""
        offsets = self.header.offsets
        first, at = offsets[keys[0]][0], offsets[keys[0]][0]
        for key in keys:
            start, stop = offsets[key]
            if start != at:
                break
            at = stop
        else:
            if at - first == len(out) == sum(sizes):
                return self._read(self.header.data_start + first, out, keys[0])
        offset = 0
        for key, size in zip(keys, sizes, strict=True):
            self.read_into(key, 0, size, out[offset : offset + size])
            offset += size
        return out

    def _read(self, offset: int, view: memoryview, key: str, *, ahead: bool = True) -> memoryview:
        fd = self._handle().fileno()
        if ahead and len(view) < SMALL_WRITE_BYTES:  # a small tensor: served from the block read ahead (a MB a pread)
            at, block = getattr(self._ahead, "block", (0, b""))
            if not at <= offset or offset + len(view) > at + len(block):
                at, block = offset, os.pread(fd, max(READ_AHEAD_BYTES, len(view)), offset)
                self._ahead.block = (at, block)
            if offset + len(view) <= at + len(block):
                view[:] = block[offset - at : offset - at + len(view)]
                return view
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
    """Header bytes (length prefix included) for tensors laid out in `specs` order: the bytes of
    `json.dumps({"__metadata__": metadata, key: {dtype, shape, data_offsets}, ...}, separators=(",", ":"))`,
    padded with spaces to a multiple of ALIGNMENT."""
    if METADATA_KEY in specs:  # a tensor of that name takes the metadata's place in json.dumps's dict
        return _padded(_header_json(specs, metadata), min_length)
    return assemble_header(header_entries(specs), metadata, min_length=min_length)


def header_entries(specs: Mapping[str, TensorSpec]) -> str:
    """The tensors' part of a header, `"key":{"dtype":..,"shape":[..],"data_offsets":[b,e]}` comma-joined as
    json.dumps writes it (for specs without a `__metadata__` key); each distinct spec is written once."""
    known: dict[TensorSpec, tuple[str, int]] = {}
    parts: list[str] = []
    offset = 0
    for key, spec in specs.items():
        found = known.get(spec)
        if found is None:
            shape = json.dumps(list(spec.shape), separators=(",", ":"))
            found = known[spec] = (f'{{"dtype":{_string(spec.dtype)},"shape":{shape},"data_offsets":[', spec.nbytes)
        fragment, nbytes = found
        parts.append(f"{_string(key)}:{fragment}{offset},{offset + nbytes}]}}")
        offset += nbytes
    return ",".join(parts)


def assemble_header(entries: str, metadata: Mapping[str, str], *, min_length: int = 0) -> bytes:
    """Header bytes from `header_entries` and the metadata (what `build_header` gives)."""
    parts = [f'"{METADATA_KEY}":{json.dumps(dict(metadata), separators=(",", ":"))}'] if metadata else []
    if entries:
        parts.append(entries)
    return _padded("{" + ",".join(parts) + "}", min_length)


def _header_json(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> str:
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for key, spec in specs.items():
        header[key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    return json.dumps(header, separators=(",", ":"))


def _padded(text: str, min_length: int) -> bytes:
    data = text.encode()
    length = max(len(data), min_length)
    length += -(8 + length) % ALIGNMENT
    return struct.pack("<Q", length) + data.ljust(length, b" ")


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
        #: the tensors' part of the header, written again by `finish` with the final metadata
        self._entries = header_entries(self.specs) if METADATA_KEY not in self.specs else None
        self._header = self._build(metadata)
        self._sha = hashlib.sha256() if final_header else None
        self._hashing: concurrent.futures.ThreadPoolExecutor | None = None  # hashes large writes
        self._file = io.FileIO(path, "wb")
        self._flushed = 0
        self.bytes_written = 0
        self._pending = bytearray()  # small writes not made yet
        self._write(self._header)

    def _build(self, metadata: Mapping[str, str], *, min_length: int = 0) -> bytes:
        if self._entries is None:
            return build_header(self.specs, metadata, min_length=min_length)
        return assemble_header(self._entries, metadata, min_length=min_length)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Small writes (a model of many small tensors) are gathered and written together."""
        if len(data) < SMALL_WRITE_BYTES:
            self._pending += data
            if len(self._pending) < PENDING_BYTES:
                return
            data = self._pending
            self._pending = bytearray()
        elif self._pending:
            pending, self._pending = self._pending, bytearray()
            self._write_now(pending)
        self._write_now(data)

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            self._write_now(pending)

    def _write_now(self, data: bytes | bytearray | memoryview) -> None:
        """Write `data`; a large write is hashed on the hashing thread while the kernel copies it (the
        two run side by side, and both are done before the caller may reuse `data`)."""
        view = memoryview(data)
        hashing: concurrent.futures.Future[None] | None = None
        if self._sha is not None and len(view) >= PARALLEL_HASH_BYTES:
            if self._hashing is None:
                self._hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merger-sha")
            hashing = self._hashing.submit(self._sha.update, view)
        elif self._sha is not None:
            self._sha.update(view)
        try:
            done = 0
            while done < len(view):
                done += self._file.write(view[done:]) or 0
        finally:
            if hashing is not None:
                hashing.result()
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

    def write_tensors(self, keys: Sequence[str], data: bytes | bytearray | memoryview) -> None:
        """The whole next tensors `keys`, their bytes one after another in `data` (one write)."""
        if self._left:
            raise RuntimeError(f"writer got whole tensors while {self._left} bytes are due for {self._key!r}")
        specs, total = self.specs, 0
        for key in keys:
            expected = next(self._keys, None)
            if key != expected:
                raise RuntimeError(f"writer expected tensor {expected!r}, got {key!r}")
            total += specs[key].nbytes
        if total != len(data):
            raise RuntimeError(f"writer got {len(data)} bytes for {len(keys)} tensors of {total} bytes")
        self._write(memoryview(data).cast("B") if len(data) else b"")

    def finish(self, metadata: Mapping[str, str] | None = None) -> str:
        """Flush, patch the metadata if given, fsync, close; returns the file's sha256."""
        leftover = next(self._keys, None)
        if leftover is not None or self._left:
            raise RuntimeError(f"writer finished before tensor {leftover or self._key!r}")
        self._flush()
        sha = self._sha.hexdigest() if self._sha is not None else ""  # every update is done: see _write_now
        if metadata is not None:
            header = self._build(metadata, min_length=len(self._header) - 8)
            if len(header) != len(self._header):
                raise RuntimeError("patched safetensors header changed length")
            if header != self._header:
                os.pwrite(self._file.fileno(), header, 0)
                sha = ""
        os.fsync(self._file.fileno())
        self._close()
        return sha or file_sha256(self.path)

    def abort(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        self._file.close()
        if self._hashing is not None:
            self._hashing.shutdown(wait=True)
            self._hashing = None


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
