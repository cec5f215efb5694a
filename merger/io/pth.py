"""PyTorch checkpoints (.pth/.pt/.ckpt/.bin), read by merger itself: no torch, no pickled code.

Formats: torch's zip format (torch >= 1.6: `<archive>/data.pkl`, the storages
as uncompressed records `<archive>/data/<key>`, `<archive>/byteorder`), and its
legacy format (`_use_new_zipfile_serialization=False`, e.g. the 2018 ESRGAN
models: a magic-number pickle, a protocol pickle, a sys_info pickle, the main
pickle, a pickle of the storage keys, then each storage as an 8-byte element
count and its bytes). Pickle protocols 0 to 5. Anything else (torch's old tar
format, TorchScript, a plain pickle, text) is refused with the reason. Every
failure, on any bytes, is a MergerError that names the file.

How: the pickle is run by `merger.io.pickle_safe.RestrictedUnpickler`, which
builds only merger's own stand-ins (a tensor is storage, offset, shape, stride,
dtype) and refuses every other Python object before anything in the file runs;
nothing from the pickle is ever called. Each storage's place in the file is
found without reading it: an uncompressed record's data starts after its
*local* zip header (whose extra field, torch's alignment padding, differs from
the central directory's); a legacy storage after its size field, found by
seeking. A contiguous tensor is read with positioned reads (os.preadv, safe
from several threads) straight into the caller's buffer; a strided view (a
transposed weight) is gathered with numpy from its storage's bytes, keeping
only the most recent one. torch is never imported, numpy only for a gather.

Limits (merger.core.limits): the pickle may unpack to PICKLE_BASE_BYTES plus
PICKLE_BYTES_PER_STORAGE per storage, counted while it is decompressed or read;
at most MAX_TENSORS tensors; each tensor must lie inside its storage, and a
tensor bigger than its storage (a stride-0 expand, an overlapping view) is
refused, since reading it would allocate more than the file holds; all the
tensors together may hold at most ALIAS_FACTOR times their distinct storages'
bytes plus ALIAS_SLACK_BYTES. The unpickler's own bounds are in its module.

Unwrapping, when no `key:` is given: while the object is a dict holding one of
WRAPPER_KEYS whose value is a dict, descend into the first present, in that
order (`params_ema` before `params`, as BasicSR/traiNNer save the EMA weights
there); then keep the tensor values and strip a `module.` prefix that every
key shares (DataParallel). `key: a.b` picks the nested dict explicitly. Only
that path and the chosen dict's own entries are looked at.
"""

from __future__ import annotations

import gc
import io
import math
import os
import pickle
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from merger.core.limits import MIB, PICKLE_BASE_BYTES, PICKLE_BYTES_PER_STORAGE
from merger.core.regular_file import open_regular
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.errors import Location, MergerError, shown
from merger.io.pickle_safe import (
    WORK_PER_BYTE,
    DType,
    PickleCorrupt,
    PickleDict,
    PickleRefused,
    PickleSet,
    RestrictedUnpickler,
    StorageRef,
    Tensor,
)

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
DATAPARALLEL_PREFIX = "module."
#: all tensors of a state dict may hold this many times their storages' bytes (tied weights, views)...
ALIAS_FACTOR = 4
DEFLATE_FACTOR = 8  # a compressed data.pkl may unpack to this many times its size, plus 1 MiB
#: ...plus this much
ALIAS_SLACK_BYTES = 64 * MIB
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_VERSION = 1001
_READABLE = "check that the path names a readable checkpoint file"
RESAVE = "re-save the weights in a current PyTorch: torch.save(model.state_dict(), 'weights.pth')"
_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError, OverflowError,
    RuntimeError, MemoryError, AssertionError, struct.error, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
)  # fmt: skip


@dataclass(frozen=True)
class _Plan:
    """Where one tensor's bytes are: from `start` in the file, C order unless `strides` (bytes) say not."""

    spec: TensorSpec
    start: int
    strides: tuple[int, ...] | None
    span: int


class PthSource:
    """A PyTorch checkpoint: parsed once, unwrapped, read tensor by tensor with positioned reads."""

    def __init__(self, path: Path, key: str | None, *, layout: PthLayout | None = None) -> None:
        """Parse the checkpoint at `path` (unpickling it), or, given the `layout` an earlier parse of
        this very file found (merger's source memo keeps it), only check that layout against the file."""
        self._path = path
        self._lock = threading.Lock()
        self._gathered: tuple[str, memoryview] | None = None
        try:
            self._fd = _opened(path)
        except OSError as e:
            raise MergerError(
                f"cannot read '{path}': {e.strerror}", where=Location(model=str(path)), fix=_READABLE
            ) from None
        try:
            if layout is not None:
                self._plans = _plans_from_layout(path, layout, os.fstat(self._fd).st_size)
            else:
                root, storages = _load(path, self._fd)
                self._plans = _plan(path, unwrap(root, key, path), storages)
        except BaseException:
            os.close(self._fd)
            raise
        self._spec = {name: plan.spec for name, plan in self._plans.items()}

    def layout(self) -> PthLayout:
        """Where each tensor's bytes are, as plain data (for the source memo): a later run of the
        same file reads it without unpickling again."""
        return [
            [name, p.spec.dtype, list(p.spec.shape), p.start, None if p.strides is None else list(p.strides), p.span]
            for name, p in self._plans.items()
        ]

    def spec(self) -> dict[str, TensorSpec]:
        return self._spec

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        plan = self._plans[key]
        if plan.strides is None:
            return self._pread(plan.start + start, out[: stop - start], key)
        return self._gather(key, plan, plan.strides)[start:stop]

    def _pread(self, offset: int, view: memoryview, key: str) -> memoryview:
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if not n:
                    raise _unreadable(self._path, f"the data of '{shown(key)}' is cut short (the file shrank?)")
                done += n
        except OSError as e:
            raise MergerError(
                f"cannot read '{self._path}': {e.strerror}", where=Location(model=str(self._path)), fix=_READABLE
            ) from None
        return view

    def _gather(self, key: str, plan: _Plan, strides: tuple[int, ...]) -> memoryview:
        """A strided view in C order: its storage span read, then copied by numpy (the latest one kept)."""
        with self._lock:
            if self._gathered is not None and self._gathered[0] == key:
                return self._gathered[1]
            self._gathered = None
            import numpy as np

            raw = bytearray(plan.span)
            self._pread(plan.start, memoryview(raw), key)
            elements = np.frombuffer(raw, dtype=np.dtype(f"<u{DTYPE_SIZES[plan.spec.dtype]}"))
            view = np.lib.stride_tricks.as_strided(elements, plan.spec.shape, strides, writeable=False)
            data = np.ascontiguousarray(view).data.cast("B")
            self._gathered = (key, data)
            return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._gathered = None


def _opened(path: Path) -> int:
    """A descriptor of its own for the regular file at `path` (a FIFO would block a plain open)."""
    with open_regular(path) as f:
        return os.dup(f.fileno())


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


def _load(path: Path, fd: int) -> tuple[Any, dict[str, tuple[int, int]]]:
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


def _type_name(value: Any) -> str:
    if isinstance(value, (PickleDict, PickleSet)):
        return value.kind
    return type(value).__name__


def _key_text(key: Any) -> str:
    if type(key) is str:
        return shown(key if len(key) <= 100 else key[:100] + "...")
    if type(key) in (int, bool) and abs(key) < 10**18:
        return str(key)
    return f"<{type(key).__name__}>"


def _describe_keys(obj: PickleDict, limit: int = 12) -> str:
    pairs = obj.pairs()
    parts = [f"{_key_text(k)} ({_type_name(v)})" for k, v in pairs[:limit]]
    more = f", ... {len(pairs) - limit} more" if len(pairs) > limit else ""
    return ", ".join(parts) + more


def unwrap(obj: Any, key: str | None, path: Path) -> dict[str, Tensor]:
    """The state dict a checkpoint holds: the chosen (or wrapped) dict's tensors, keys as str."""
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, PickleDict) or part not in obj:
                available = _describe_keys(obj) if isinstance(obj, PickleDict) else _type_name(obj)
                raise MergerError(
                    f"'{path}' has no entry '{part}' (of key: {key})",
                    where=Location(model=str(path)),
                    fix=f"choose the state dict with key: one of {available}",
                )
            obj = obj.get(part)
    else:
        seen: set[int] = set()
        while isinstance(obj, PickleDict) and id(obj) not in seen:
            seen.add(id(obj))
            wrapper = next((w for w in WRAPPER_KEYS if isinstance(obj.get(w), PickleDict)), None)
            if wrapper is None:
                break
            obj = obj.get(wrapper)
    if not isinstance(obj, PickleDict):
        raise MergerError(
            f"'{path}' holds a {_type_name(obj)}, not a state dict",
            where=Location(model=str(path)),
            fix="save a dict of tensors (model.state_dict())",
        )
    tensors: dict[str, Tensor] = {}
    for k, v in obj.pairs():
        if not isinstance(v, Tensor):
            continue
        if type(k) not in (str, int, bool) or (type(k) is not str and abs(k) >= 10**18):
            raise _unreadable(path, f"a tensor's key is a {type(k).__name__}, not a name")
        tensors[str(k)] = v
    if not tensors:
        raise MergerError(
            f"'{path}' holds no tensors at this level: {_describe_keys(obj)}",
            where=Location(model=str(path)),
            fix="name the dict that holds the weights with key: (e.g. key: generator)",
        )
    if all(k.startswith(DATAPARALLEL_PREFIX) for k in tensors):
        tensors = {k[len(DATAPARALLEL_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def _plan(path: Path, tensors: dict[str, Tensor], storages: dict[str, tuple[int, int]]) -> dict[str, _Plan]:
    """Check every tensor against its storage and the aliasing bound; where each one's bytes are."""
    plans: dict[str, _Plan] = {}
    total, roots = 0, {}
    for name, tensor in tensors.items():
        dtype, ref, shape = tensor.dtype, tensor.storage, tensor.shape
        if dtype.code is None:
            raise MergerError(
                f"tensor '{shown(name)}' in '{path}' has dtype torch.{dtype.name}, which merger does not merge",
                where=Location(model=str(path)),
                fix="save the weights as float32, float16, bfloat16 or an integer dtype",
            )
        numel = math.prod(shape)
        nbytes = numel * dtype.size
        span = (
            0 if not numel else (sum((d - 1) * s for d, s in zip(shape, tensor.stride, strict=True)) + 1) * dtype.size
        )
        if tensor.offset * dtype.size + span > ref.nbytes:
            raise _unreadable(
                path,
                f"tensor '{shown(name)}' (shape {list(shape)}, stride {list(tensor.stride)}, offset {tensor.offset})"
                f" reaches past the {ref.nbytes} bytes of its storage",
            )
        if nbytes > ref.nbytes:
            raise MergerError(
                f"refused to load '{path}': tensor '{shown(name)}' has shape {list(shape)} ({nbytes} bytes) but its"
                f" storage holds only {ref.nbytes} bytes (a stride-0 expand or an overlapping view)",
                where=Location(model=str(path)),
                fix=f"re-save that tensor as real data: sd['{shown(name)}'] = sd['{shown(name)}'].contiguous().clone()",
            )
        total += nbytes
        roots[ref.name] = storages[ref.name][1]
        start = storages[ref.name][0] + ref.base + tensor.offset * dtype.size
        strides = (
            None
            if not numel or _contiguous(shape, tensor.stride)
            else tuple(s * dtype.size if d != 1 else 0 for d, s in zip(shape, tensor.stride, strict=True))
        )
        plans[name] = _Plan(TensorSpec(dtype.code, shape), start, strides, span)
    allowed = ALIAS_FACTOR * sum(roots.values()) + ALIAS_SLACK_BYTES
    if total > allowed:
        raise MergerError(
            f"refused to load '{path}': its tensors add up to {total} bytes from {sum(roots.values())} bytes of"
            f" storage (more than {ALIAS_FACTOR}x plus {ALIAS_SLACK_BYTES // MIB} MiB): many keys view the same data",
            where=Location(model=str(path)),
            fix="re-save each tensor as its own data: {k: t.clone() for k, t in sd.items()}",
        )
    return plans


#: [name, dtype code, shape, file offset, byte strides or None (C order), byte span] per tensor
PthLayout = list[list[Any]]


def _plans_from_layout(path: Path, layout: PthLayout, file_size: int) -> dict[str, _Plan]:
    """The plans a layout describes, each checked to lie within the file (a damaged memo is refused)."""
    plans: dict[str, _Plan] = {}
    try:
        for name, dtype, shape, start, strides, span in layout:
            spec = TensorSpec(str(dtype), tuple(int(d) for d in shape))
            byte_strides = None if strides is None else tuple(int(s) for s in strides)
            ok = (
                spec.dtype in DTYPE_SIZES
                and all(d >= 0 for d in spec.shape)
                and int(start) >= 0
                and int(start) + int(span) <= file_size
                and (byte_strides is not None or int(span) == spec.nbytes or spec.numel == 0)
                and (byte_strides is None or _strides_fit(spec, byte_strides, int(span)))
            )
            if not ok or str(name) in plans:
                raise ValueError(name)
            plans[str(name)] = _Plan(spec, int(start), byte_strides, int(span))
    except (TypeError, ValueError) as e:
        raise _unreadable(path, f"its remembered layout does not fit the file ({shown(e)})") from None
    return plans


def _strides_fit(spec: TensorSpec, strides: tuple[int, ...], span: int) -> bool:
    """Whether a strided view of `span` bytes stays inside them (numpy's as_strided does not check)."""
    if len(strides) != len(spec.shape) or any(s < 0 for s in strides):
        return False
    reach = sum((d - 1) * s for d, s in zip(spec.shape, strides, strict=True)) + DTYPE_SIZES[spec.dtype]
    return spec.numel == 0 or reach <= span


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True
