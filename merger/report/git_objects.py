"""Read objects from a git repository's object store, in pure Python and within bounds.

What: `ObjectStore(objects_dir, algorithm).read(oid)` gives `(kind, content)` of one object
("commit", "tree", "blob" or "tag"), or None. It finds loose objects (`objects/xx/yyyy…`, zlib
with a `<kind> <size>\\0` header) and packed ones (`objects/pack/*.idx` version 2 with their
`.pack`, including OFS_DELTA and REF_DELTA entries, whose bases it resolves), in the objects
directory and in those that `objects/info/alternates` names.

How: files are read with `read_capped`/`open_regular` (regular files only: a FIFO or device planted
in the repository is refused, never opened for a blocking read); pack indexes are binary-searched with
seeks, not loaded; zlib streams are inflated with an output cap. Every object read is checked against
its id (the hash of its header and content), so corrupt or forged data makes an object unreadable
(None), never a wrong answer.

Why: `merger.gitinfo` reports whether a recipe file differs from HEAD. Asking `git` for that ran
commands that the repository's configuration names (core.fsmonitor, filter drivers, …), chosen by
whoever wrote the repository. Reading the files starts no process, but the repository is still
untrusted input, hence the bounds below: an object inflates to at most MAX_OBJECT_SIZE, delta chains
are at most MAX_DELTA_DEPTH deep, alternates at most MAX_ALTERNATE_DEPTH, and one store inflates at
most MAX_INFLATED_TOTAL bytes and applies at most MAX_DELTA_OPS delta instructions in all.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

MAX_OBJECT_SIZE = 64 << 20
MAX_DELTA_DEPTH = 64
MAX_ALTERNATE_DEPTH = 5
MAX_OBJECT_DIRS = 16
MAX_PACKS = 256  # each keeps two files open
MAX_INFLATED_TOTAL = 256 << 20
MAX_DELTA_OPS = 4_000_000
MAX_LOOKUPS = 20_000  # object lookups and pack entries visited by one store: bounds any delta graph
_ALTERNATES_CAP = 64 << 10
_CHUNK = 1 << 16

HASH_SIZES = {"sha1": 20, "sha256": 32}
_KINDS = {1: "commit", 2: "tree", 3: "blob", 4: "tag"}
_OFS_DELTA, _REF_DELTA = 6, 7


class BudgetSpent(Exception):
    """A store's work budget is spent: the whole read gives up (not one pack: see ObjectStore.read)."""


class GitFormatError(ValueError):
    """Malformed, truncated, oversized or otherwise unusable repository content."""


# What reading an untrusted repository may raise; callers turn these into "unknown" (None).
FAILURES: tuple[type[BaseException], ...] = (
    ValueError,  # GitFormatError, UnicodeDecodeError, bad numbers
    OSError,
    LookupError,  # IndexError on truncated data
    zlib.error,
    struct.error,
    OverflowError,
    MemoryError,
    RecursionError,
)


def open_regular(path: Path) -> BinaryIO | None:
    """Open `path` for reading if it is a regular file; None when it is absent or a directory.

    Anything else (FIFO, socket, device) raises GitFormatError without being opened, so that a
    special file in a hostile repository cannot block or have side effects; O_NONBLOCK and the
    fstat check cover a file swapped in between the stat and the open.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(mode):
        return None
    if not stat.S_ISREG(mode):
        raise GitFormatError(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GitFormatError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: Path, cap: int) -> bytes | None:
    """The bytes of the regular file `path` (None when absent); GitFormatError when over `cap` bytes."""
    f = open_regular(path)
    if f is None:
        return None
    with f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise GitFormatError(f"{path} is larger than {cap} bytes")
    return data


def object_id(kind: str, content: bytes, algorithm: str) -> bytes:
    """The git object id of `content`: the hash of `<kind> <size>\\0<content>`."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    h.update(b"%s %d\0" % (kind.encode("ascii"), len(content)))
    h.update(content)
    return h.digest()


def _inflate(chunks: Iterator[bytes], limit: int) -> bytes:
    """Inflate one zlib stream read from `chunks`; GitFormatError beyond `limit` bytes or when truncated.

    `decompress(data, max_length)` never produces more than asked, so a zlib bomb costs at most
    `limit` bytes; each turn consumes input (finite) or produces output (capped), so the loop ends.
    """
    d = zlib.decompressobj()
    out = bytearray()
    while not d.eof:
        data = d.unconsumed_tail or next(chunks, b"")
        piece = d.decompress(data, limit + 1 - len(out))
        if not data and not piece and not d.eof:
            raise GitFormatError("truncated zlib stream")
        out += piece
        if len(out) > limit:
            raise GitFormatError(f"object inflates beyond {limit} bytes")
    return bytes(out)


def _read_chunks(f: BinaryIO, offset: int, cap: int) -> Iterator[bytes]:
    """At most `cap` bytes of `f` from `offset`, in chunks."""
    f.seek(offset)
    while cap > 0:
        data = f.read(min(_CHUNK, cap))
        if not data:
            return
        cap -= len(data)
        yield data


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    """Exactly `size` bytes of `f` at `offset` (GitFormatError when the file is shorter)."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise GitFormatError("truncated file")
    return data


def _delta_size(delta: bytes, pos: int) -> tuple[int, int]:
    """A delta header's size (7 bits a byte, little-endian, at most 10 bytes) and the position after it."""
    value = shift = 0
    for _ in range(10):
        byte = delta[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
    raise GitFormatError("delta size too long")


class _Pack:
    """One `pack-*.idx` (version 2) with its `.pack`; `find` binary-searches the index with seeks."""

    def __init__(self, idx_path: Path, hash_size: int) -> None:
        self.hash_size = hash_size
        self.idx: BinaryIO | None = None
        self.pack: BinaryIO | None = None
        try:
            self.idx = open_regular(idx_path)
            self.pack = open_regular(idx_path.with_suffix(".pack"))
            if self.idx is None or self.pack is None:
                raise GitFormatError(f"{idx_path}: missing index or pack")
            header = _read_at(self.idx, 0, 8 + 256 * 4)
            if header[:8] != b"\xfftOc\x00\x00\x00\x02":
                raise GitFormatError(f"{idx_path}: not a version 2 pack index")
            self.fanout = struct.unpack(">256I", header[8:])
            if any(a > b for a, b in itertools.pairwise(self.fanout)):
                raise GitFormatError(f"{idx_path}: fan-out table not sorted")
            self.count = self.fanout[255]
            idx_size = os.fstat(self.idx.fileno()).st_size
            self.names_at = 8 + 256 * 4
            self.offsets_at = self.names_at + self.count * (hash_size + 4)
            self.large_at = self.offsets_at + self.count * 4
            self.large_count = (idx_size - self.large_at - 2 * hash_size) // 8
            if self.large_count < 0:
                raise GitFormatError(f"{idx_path}: truncated index")
            self.pack_size = os.fstat(self.pack.fileno()).st_size
            pack_header = _read_at(self.pack, 0, 12)
            version, objects = struct.unpack(">II", pack_header[4:])
            if pack_header[:4] != b"PACK" or version not in (2, 3) or objects != self.count:
                raise GitFormatError(f"{idx_path}: pack header does not match its index")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for f in (self.idx, self.pack):
            if f is not None:
                f.close()

    def find(self, oid: bytes) -> int | None:
        """The offset of `oid` in the pack, or None when the index does not list it."""
        assert self.idx is not None
        lo = self.fanout[oid[0] - 1] if oid[0] else 0
        hi = self.fanout[oid[0]]
        while lo < hi:
            mid = (lo + hi) // 2
            name = _read_at(self.idx, self.names_at + mid * self.hash_size, self.hash_size)
            if name == oid:
                (offset,) = struct.unpack(">I", _read_at(self.idx, self.offsets_at + mid * 4, 4))
                if offset & 0x80000000:
                    large = offset & 0x7FFFFFFF
                    if large >= self.large_count:
                        raise GitFormatError("large offset out of range")
                    (offset,) = struct.unpack(">Q", _read_at(self.idx, self.large_at + large * 8, 8))
                if not 12 <= offset < self.pack_size:
                    raise GitFormatError("pack offset out of range")
                return int(offset)
            if name < oid:
                lo = mid + 1
            else:
                hi = mid
        return None

    def entry(self, offset: int) -> tuple[int, int, int]:
        """The (type, inflated size, position of the data) of the entry header at `offset`."""
        assert self.pack is not None
        head = self.pack_read(offset, 16)
        byte = head[0]
        kind, size, shift, pos = (byte >> 4) & 7, byte & 0x0F, 4, 1
        while byte & 0x80:
            if pos >= 11:
                raise GitFormatError("pack entry size too long")
            byte = head[pos]
            size |= (byte & 0x7F) << shift
            shift += 7
            pos += 1
        if size > MAX_OBJECT_SIZE:
            raise GitFormatError(f"packed object larger than {MAX_OBJECT_SIZE} bytes")
        return kind, size, offset + pos

    def pack_read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes of the pack at `offset` (fewer at its end)."""
        assert self.pack is not None
        if not 0 <= offset < self.pack_size:
            raise GitFormatError("pack offset out of range")
        self.pack.seek(offset)
        return self.pack.read(size)


class ObjectStore:
    """The objects of one repository (objects dir, its packs and alternates); use as a context manager.

    `read` verifies each object's hash, so it returns the right object or None. The budgets
    (MAX_INFLATED_TOTAL, MAX_DELTA_OPS) bound the work of the whole store, whatever the repository holds.
    """

    def __init__(self, objects_dir: Path, algorithm: str) -> None:
        if algorithm not in HASH_SIZES:
            raise GitFormatError(f"unsupported object format {algorithm!r}")
        self.algorithm = algorithm
        self.hash_size = HASH_SIZES[algorithm]
        self._dirs = _object_dirs(objects_dir)
        self._packs: list[_Pack] | None = None
        self._inflated = 0
        self._delta_ops = 0
        self._lookups = 0

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for pack in self._packs or ():
            pack.close()
        self._packs = []

    def read(self, oid: bytes) -> tuple[str, bytes] | None:
        """`(kind, content)` of object `oid`, or None when it is absent, malformed or over a bound."""
        try:
            return self._read(oid, 0)
        except BudgetSpent:
            return None
        except FAILURES:
            return None

    def _visit(self) -> None:
        """Count one lookup or pack entry: a hostile pack's delta bases can fan out exponentially."""
        self._lookups += 1
        if self._lookups > MAX_LOOKUPS:
            raise BudgetSpent(f"more than {MAX_LOOKUPS} object lookups")

    def _read(self, oid: bytes, depth: int) -> tuple[str, bytes] | None:
        self._visit()
        if len(oid) != self.hash_size:
            raise GitFormatError("object id of the wrong length")
        if depth > MAX_DELTA_DEPTH:
            raise GitFormatError(f"delta chain deeper than {MAX_DELTA_DEPTH}")
        for pack in self._all_packs():
            try:
                offset = pack.find(oid)
                found = None if offset is None else self._read_packed(pack, offset, depth)
            except FAILURES:
                found = None  # a damaged copy: another pack or a loose copy may still be good
            if found is not None and object_id(*found, self.algorithm) == oid:
                return found
        hex_id = oid.hex()
        for directory in self._dirs:
            try:
                raw = read_capped(directory / hex_id[:2] / hex_id[2:], MAX_OBJECT_SIZE + (MAX_OBJECT_SIZE >> 6))
                found = None if raw is None else self._parse_loose(raw)
            except FAILURES:
                found = None
            if found is not None and object_id(*found, self.algorithm) == oid:
                return found
        return None

    def _spend(self, inflated: int) -> None:
        self._inflated += inflated
        if self._inflated > MAX_INFLATED_TOTAL:
            raise GitFormatError(f"more than {MAX_INFLATED_TOTAL} bytes inflated")

    def _parse_loose(self, raw: bytes) -> tuple[str, bytes]:
        data = _inflate(iter((raw,)), MAX_OBJECT_SIZE + 32)
        self._spend(len(data))
        nul = data.find(b"\0", 0, 32)
        kind, _, size = data[: max(nul, 0)].partition(b" ")
        if nul < 0 or kind.decode("ascii") not in _KINDS.values() or not size.isdigit():
            raise GitFormatError("malformed loose object header")
        if int(size) != len(data) - nul - 1 or int(size) > MAX_OBJECT_SIZE:
            raise GitFormatError("loose object size does not match its header")
        return kind.decode("ascii"), data[nul + 1 :]

    def _inflate_entry(self, pack: _Pack, pos: int, size: int) -> bytes:
        self._spend(size)
        assert pack.pack is not None
        data = _inflate(_read_chunks(pack.pack, pos, size + (size >> 6) + 4096), size)
        if len(data) != size:
            raise GitFormatError("packed object size does not match its header")
        return data

    def _read_packed(self, pack: _Pack, offset: int, depth: int) -> tuple[str, bytes]:
        """The object at `offset`: follow delta bases (same pack by offset or id, else the store)."""
        deltas: list[bytes] = []
        while True:
            if depth + len(deltas) > MAX_DELTA_DEPTH:
                raise GitFormatError(f"delta chain deeper than {MAX_DELTA_DEPTH}")
            self._visit()
            kind, size, pos = pack.entry(offset)
            if kind in _KINDS:
                base = (_KINDS[kind], self._inflate_entry(pack, pos, size))
                break
            if kind == _OFS_DELTA:
                head = pack.pack_read(pos, 10)
                byte, i = head[0], 1
                distance = byte & 0x7F
                while byte & 0x80:
                    if i >= len(head):
                        raise GitFormatError("delta base offset too long")
                    byte = head[i]
                    distance = ((distance + 1) << 7) | (byte & 0x7F)
                    i += 1
                if not 12 <= offset - distance < offset:
                    raise GitFormatError("delta base offset out of range")
                deltas.append(self._inflate_entry(pack, pos + i, size))
                offset -= distance
            elif kind == _REF_DELTA:
                base_id = pack.pack_read(pos, self.hash_size)
                if len(base_id) != self.hash_size:
                    raise GitFormatError("truncated delta base id")
                deltas.append(self._inflate_entry(pack, pos + self.hash_size, size))
                base_offset = pack.find(base_id)
                if base_offset is None:
                    found = self._read(base_id, depth + len(deltas))
                    if found is None:
                        raise GitFormatError("delta base not found")
                    base = found
                    break
                offset = base_offset
            else:
                raise GitFormatError(f"unknown pack entry type {kind}")
        kind_name, content = base
        for delta in reversed(deltas):
            content = self._apply_delta(content, delta)
        return kind_name, content

    def _apply_delta(self, base: bytes, delta: bytes) -> bytes:
        """`base` patched by the git delta `delta` (copy and insert instructions), checking every size."""
        source_size, pos = _delta_size(delta, 0)
        target_size, pos = _delta_size(delta, pos)
        if source_size != len(base) or target_size > MAX_OBJECT_SIZE:
            raise GitFormatError("delta does not fit its base")
        self._spend(target_size)
        out = bytearray()
        view = memoryview(base)
        while pos < len(delta):
            self._delta_ops += 1
            if self._delta_ops > MAX_DELTA_OPS:
                raise GitFormatError(f"more than {MAX_DELTA_OPS} delta instructions")
            cmd = delta[pos]
            pos += 1
            if cmd & 0x80:
                start = length = 0
                for i in range(7):
                    if cmd & (1 << i):
                        value = delta[pos]
                        pos += 1
                        if i < 4:
                            start |= value << (8 * i)
                        else:
                            length |= value << (8 * (i - 4))
                length = length or 0x10000
                if start + length > len(base):
                    raise GitFormatError("delta copies beyond its base")
                out += view[start : start + length]
            elif cmd:
                if pos + cmd > len(delta):
                    raise GitFormatError("truncated delta")
                out += delta[pos : pos + cmd]
                pos += cmd
            else:
                raise GitFormatError("reserved delta instruction")
            if len(out) > target_size:
                raise GitFormatError("delta result larger than announced")
        if len(out) != target_size:
            raise GitFormatError("delta result smaller than announced")
        return bytes(out)

    def _all_packs(self) -> list[_Pack]:
        """The usable packs of every object directory (opened once; unusable ones skipped)."""
        if self._packs is None:
            self._packs = []
            for directory in self._dirs:
                try:
                    with os.scandir(directory / "pack") as entries:
                        names = sorted(e.name for e in itertools.islice(entries, 4 * MAX_PACKS))
                except OSError:
                    continue
                for name in names:
                    if name.endswith(".idx") and len(self._packs) < MAX_PACKS:
                        try:
                            self._packs.append(_Pack(directory / "pack" / name, self.hash_size))
                        except FAILURES:
                            continue  # e.g. an index of version 1: its objects read as absent
        return self._packs


def _object_dirs(root: Path) -> list[Path]:
    """`root` and the object directories its `info/alternates` name, recursively (bounded, no repeats)."""
    dirs: list[Path] = []
    seen: set[str] = set()
    queue = [(root, 0)]
    while queue and len(dirs) < MAX_OBJECT_DIRS:
        directory, depth = queue.pop(0)
        real = os.path.realpath(directory)
        if real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        dirs.append(directory)
        if depth >= MAX_ALTERNATE_DEPTH:
            continue
        try:
            data = read_capped(directory / "info" / "alternates", _ALTERNATES_CAP)
            lines = data.decode("utf-8").splitlines() if data else []
        except FAILURES:
            continue  # unreadable alternates: the objects they hold read as absent
        for line in lines:
            line = line.strip()
            if line and not line.startswith(("#", '"')):  # quoted (escaped) paths are not supported
                queue.append((directory / line, depth + 1))  # relative paths are relative to `directory`
    return dirs
