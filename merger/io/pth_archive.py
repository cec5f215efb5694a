"""Reading a PyTorch checkpoint's archive: torch's zip format and its legacy pre-1.6 format, the
pickle bounded by the file's real size and unpickled by merger's restricted unpickler
(merger.io.pickle_safe); each storage located by its offset and size in the file, never read here.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

from merger.core.limits import MIB, PICKLE_BASE_BYTES, PICKLE_BYTES_PER_STORAGE
from merger.errors import Location, MergerError, shown
from merger.io.pickle_safe import (
    WORK_PER_BYTE,
    DType,
    PickleCorrupt,
    PickleDict,
    PickleRefused,
    RestrictedUnpickler,
    StorageRef,
)

DEFLATE_FACTOR = 8  # a compressed data.pkl may unpack to this many times its size, plus 1 MiB
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_VERSION = 1001
_READABLE = "check that the path names a readable checkpoint file"
RESAVE = "re-save the weights in a current PyTorch: torch.save(model.state_dict(), 'weights.pth')"
_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError, OverflowError,
    RuntimeError, MemoryError, AssertionError, struct.error, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
)  # fmt: skip


def _unreadable(path: Path, detail: str, fix: str | None = None) -> MergerError:
    return MergerError(
        f"cannot read '{path}' as a PyTorch checkpoint: {detail}",
        where=Location(model=str(path)),
        fix=fix or "check that the file is a complete torch.save() checkpoint (re-download or re-save it)",
    )


def _detail(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "its pickle ends early (the file is truncated or not a checkpoint)"
    if isinstance(error, MemoryError):
        return "out of memory while reading its pickle"
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return f"it is damaged ({shown(text if len(text) <= 200 else text[:200] + '...')})"


def load_archive(path: Path, fd: int) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The unpickled object and each storage's (file offset, bytes); every failure a MergerError."""
    collecting = gc.isenabled()
    gc.disable()  # the unpickler makes many small containers and no cycles worth collecting meanwhile
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 512, 0)
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                return _read_zip(f, fd, size)
            if head[257:262] == b"ustar":
                raise PickleCorrupt(
                    "it is in PyTorch's old tar format", "re-save it with torch.save in a current PyTorch"
                )
            return _read_legacy(f, fd, size)
    except MergerError:
        raise
    except PickleRefused as e:
        raise MergerError(f"refused to load '{path}': {e.what}", where=Location(model=str(path)), fix=e.fix) from None
    except PickleCorrupt as e:
        raise _unreadable(path, str(e), e.fix) from None
    except OSError as e:
        raise MergerError(
            f"cannot read '{path}': {e.strerror or e}", where=Location(model=str(path)), fix=_READABLE
        ) from None
    except _ERRORS as e:
        raise _unreadable(path, _detail(e)) from None
    finally:
        if collecting:
            gc.enable()


# --- torch's zip format ---------------------------------------------------------------------------------


def _read_zip(f: IO[bytes], fd: int, file_size: int) -> tuple[Any, dict[str, tuple[int, int]]]:
    try:
        archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile:
        raise PickleCorrupt("its zip archive is truncated or damaged (no central directory)") from None
    members = {info.filename: info for info in archive.infolist()}
    pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise PickleCorrupt("a zip archive without one <archive>/data.pkl: not a torch.save() checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "constants.pkl" in members:
        raise PickleCorrupt(
            "it is a TorchScript module (torch.jit.save), not a torch.save() checkpoint",
            "load it with torch.jit.load and save its weights: torch.save(module.state_dict(), 'weights.pth')",
        )
    byteorder = _small_record(archive, members.get(prefix + "byteorder"))
    if byteorder == b"big":
        raise PickleRefused(
            "it was saved on a big-endian machine; merger reads little-endian tensors",
            "load it with torch and save it again on a little-endian (x86, ARM) machine",
        )
    if byteorder not in (None, b"little"):
        raise PickleCorrupt("its byteorder record is neither 'little' nor 'big'")
    records = {name[len(prefix) + 5 :]: info for name, info in members.items() if name.startswith(prefix + "data/")}
    # the allowance per storage cannot exceed the file's real bytes (empty records must not buy pickle room),
    # and a compressed data.pkl (torch never compresses it) may unpack to a small multiple of its size only
    limit = PICKLE_BASE_BYTES + min(PICKLE_BYTES_PER_STORAGE * len(records), file_size)
    if members[pickles[0]].compress_type != zipfile.ZIP_STORED:
        limit = min(limit, DEFLATE_FACTOR * members[pickles[0]].compress_size + MIB)
    data = _bounded_member(archive, members[pickles[0]], limit, len(records))
    located: dict[str, tuple[int, int]] = {}

    def resolve(key: str, dtype: DType, numel: int, view: Any) -> StorageRef:
        if view is not None:
            raise PickleCorrupt("a legacy storage view inside a zip checkpoint")
        if key not in located:
            if key not in records:
                raise PickleCorrupt(f"its pickle names storage '{shown(key)}', which the archive lacks")
            located[key] = _stored_record(fd, records[key], file_size)
        nbytes = numel * dtype.size
        if nbytes > located[key][1]:
            raise PickleCorrupt(f"storage '{shown(key)}' should hold {nbytes} bytes but holds {located[key][1]}")
        return StorageRef(key, dtype, 0, nbytes)

    root = RestrictedUnpickler(io.BytesIO(data), resolve=resolve, work_limit=WORK_PER_BYTE * limit).load()
    return root, located


def _small_record(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> bytes | None:
    if info is None:
        return None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
        raise PickleCorrupt(
            f"record '{shown(info.filename)}' is encrypted or compressed with method {info.compress_type}"
        )
    with archive.open(info) as member:
        return member.read(64)


def _bounded_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, storages: int) -> bytes:
    """data.pkl, decompressed no further than `limit` bytes whatever its header claims."""
    too_big = PickleRefused(
        f"its data.pkl unpacks to more than {limit} bytes (at most {PICKLE_BASE_BYTES} plus"
        f" {PICKLE_BYTES_PER_STORAGE} for each of its {storages} storages, within the file's size, and"
        f" {DEFLATE_FACTOR}x its compressed size); a state dict's pickle is far smaller",
        RESAVE,
    )
    if info.file_size > limit:
        raise too_big
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
        raise PickleCorrupt(f"its data.pkl is encrypted or compressed with method {info.compress_type}", RESAVE)
    chunks, total = [], 0
    with archive.open(info) as member:
        while total <= limit and (chunk := member.read(min(MIB, limit + 1 - total))):
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise too_big
    return b"".join(chunks)


def _stored_record(fd: int, info: zipfile.ZipInfo, file_size: int) -> tuple[int, int]:
    """(offset of the data in the file, bytes) of an uncompressed record, from its local header."""
    name = shown(info.filename)
    header = os.pread(fd, 30, info.header_offset)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise PickleCorrupt(f"the zip header of '{name}' is damaged")
    (method,), (name_length, extra_length) = struct.unpack_from("<H", header, 8), struct.unpack_from("<HH", header, 26)
    if info.compress_type != zipfile.ZIP_STORED or method != zipfile.ZIP_STORED or info.flag_bits & 1:
        raise PickleCorrupt(
            f"storage record '{name}' is compressed (method {info.compress_type or method}); torch stores them"
            " uncompressed and merger reads them in place",
            "re-save it with torch.save (do not re-zip a checkpoint with compression)",
        )
    if info.compress_size != info.file_size:
        raise PickleCorrupt(f"storage record '{name}' has two sizes")
    start = info.header_offset + 30 + name_length + extra_length
    if start + info.file_size > file_size:
        raise PickleCorrupt(f"the file is truncated: '{name}' ends at byte {start + info.file_size} of {file_size}")
    return start, info.file_size


# --- torch's legacy format ------------------------------------------------------------------------------


class _BoundedReader:
    """A file for the unpickler that refuses to read past `limit` bytes (the limit grows per storage)."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self.f = f
        self.limit = limit
        self.used = 0

    def _count(self, data: bytes) -> bytes:
        self.used += len(data)
        if self.used > self.limit:
            raise PickleRefused(
                f"its pickle is longer than {self.limit} bytes ({PICKLE_BASE_BYTES} plus"
                f" {PICKLE_BYTES_PER_STORAGE} per storage); a state dict's pickle is far smaller",
                RESAVE,
            )
        return data

    def read(self, n: int) -> bytes:
        return self._count(self.f.read(min(n, self.limit - self.used + 1)))

    def readline(self) -> bytes:
        return self._count(self.f.readline(self.limit - self.used + 1))


def _read_legacy(f: IO[bytes], fd: int, file_size: int) -> tuple[Any, dict[str, tuple[int, int]]]:
    reader = _BoundedReader(f, PICKLE_BASE_BYTES)
    try:
        magic, version, sys_info = (_header_pickle(reader) for _ in range(3))
    except (PickleCorrupt, PickleRefused, *_ERRORS):
        magic = version = sys_info = None
    if type(magic) is not int or magic != LEGACY_MAGIC or version != LEGACY_VERSION:
        raise PickleCorrupt("not a PyTorch checkpoint (neither torch's zip format nor its legacy format)")
    if not isinstance(sys_info, PickleDict):
        raise PickleCorrupt("its sys_info record is damaged")
    if sys_info.get("little_endian") is False:
        raise PickleRefused(
            "it was saved on a big-endian machine; merger reads little-endian tensors",
            "load it with torch and save it again on a little-endian (x86, ARM) machine",
        )
    unpickler = RestrictedUnpickler(reader, resolve=None, work_limit=WORK_PER_BYTE * PICKLE_BASE_BYTES)
    roots: dict[str, tuple[int, int]] = {}  # key -> (bytes, element size)

    def resolve(key: str, dtype: DType, numel: int, view: Any) -> StorageRef:
        nbytes = numel * dtype.size
        if key not in roots:
            roots[key] = (nbytes, dtype.size)
            reader.limit += PICKLE_BYTES_PER_STORAGE
            unpickler.work_limit += WORK_PER_BYTE * PICKLE_BYTES_PER_STORAGE
        elif roots[key][0] != nbytes:
            raise PickleCorrupt(f"storage '{shown(key)}' is given two sizes")
        if view is None:
            return StorageRef(key, dtype, 0, nbytes)
        if (
            type(view) is not tuple
            or len(view) != 3
            or type(view[0]) is not str
            or any(type(v) is not int for v in view[1:])
        ):
            raise PickleCorrupt("a malformed storage view")
        base, length = view[1] * dtype.size, view[2] * dtype.size
        if base < 0 or length < 0 or base + length > nbytes:
            raise PickleCorrupt(f"a view of storage '{shown(key)}' lies outside it")
        return StorageRef(key, dtype, base, length)

    unpickler.resolve = resolve
    root = unpickler.load()
    keys = _header_pickle(reader)
    if (
        type(keys) is not list
        or any(type(k) is not str or k not in roots for k in keys)
        or len(set(keys)) != len(roots)
    ):
        raise PickleCorrupt("its list of storage keys does not match its tensors")
    storages: dict[str, tuple[int, int]] = {}
    offset = f.tell()
    for key in keys:
        nbytes, element_size = roots[key]
        head = os.pread(fd, 8, offset)
        if len(head) < 8:
            raise PickleCorrupt(f"the file is truncated: storage '{shown(key)}' is missing")
        if struct.unpack("<q", head)[0] * element_size != nbytes:
            raise PickleCorrupt(f"storage '{shown(key)}' holds a different size than its pickle says")
        storages[key] = (offset + 8, nbytes)
        offset += 8 + nbytes
    if offset > file_size:
        raise PickleCorrupt(f"the file is truncated: its storages end at byte {offset} of {file_size}")
    return root, storages


def _header_pickle(reader: _BoundedReader) -> Any:
    return RestrictedUnpickler(reader, resolve=None, work_limit=PICKLE_BASE_BYTES).load()


# --- unwrapping and checking the state dict --------------------------------------------------------------
