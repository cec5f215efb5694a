"""The safetensors header, read strictly: refused exactly where the safetensors library refuses it
(and, stricter, for duplicate keys, dtypes merger does not merge, too many tensors or dimensions).

Layout: 8 bytes little-endian header length N, N bytes of JSON header
({key: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the data. The header alone
gives every key, shape and dtype, so a plan can check a 10 GB merge by reading a few kilobytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from merger.core.limits import MAX_DIMS, MAX_HEADER_BYTES, MAX_TENSORS
from merger.core.regular_file import open_regular
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.core.strict_json import JSONError, kind, loads_strict, measure, paused_gc, short
from merger.errors import Location, MergerError
from merger.io.safetensors_plain import MAX_BYTES, MAX_U64, overflows, shared
from merger.io.safetensors_plain import plain_entries as _plain_entries
from merger.io.safetensors_plain import plain_header as _plain_header
from merger.io.safetensors_plain import tiled_header as _tiled_header
from merger.io.safetensors_plain import tiled_rows as _tiled_rows

if TYPE_CHECKING:
    pass

#: every dtype the safetensors library knows (its `Dtype` enum); merger reads those in
#: DTYPE_SIZES and refuses the others by name
LIBRARY_DTYPES = frozenset(
    {
        "BOOL",
        "F4",
        "F6_E2M3",
        "F6_E3M2",
        "U8",
        "I8",
        "F8_E5M2",
        "F8_E4M3",
        "F8_E8M0",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "I16",
        "U16",
        "F16",
        "BF16",
        "I32",
        "U32",
        "F32",
        "C64",
        "F64",
        "I64",
        "U64",
    }
)
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


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
        where=Location(model=str(path)),
        fix="check that the file was fully written (re-download or re-save it)",
    )


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header (no tensor data is read).

    A file is accepted exactly when the safetensors library (0.8) accepts it,
    except that merger also refuses dtypes it does not merge, a key given twice
    in any object of the header (the library keeps the last), more than
    MAX_TENSORS tensors and nesting deeper than MAX_JSON_DEPTH. The library's
    rules (safetensors/src/tensor.rs, `read_metadata` and `Metadata::validate`):
    a header of at most MAX_HEADER_BYTES of UTF-8 JSON, an object whose
    `__metadata__` (if present and not null) maps strings to strings and whose
    other keys each hold {dtype, shape, data_offsets} (or the list [dtype, shape,
    data_offsets]); dimensions and offsets are integers in [0, 2**64); sorted by
    offsets, the tensors tile the data from 0 with no hole or overlap, each
    range as long as its dtype and shape say (computed without overflowing 64
    bits), and the data ends exactly at the end of the file.
    """
    try:
        with open_regular(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad_file(path, "shorter than 8 bytes")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise _bad_file(path, f"header length {length} is implausible (over {MAX_HEADER_BYTES} bytes)")
            if 8 + length > file_size:
                raise _bad_file(path, f"truncated header ({length} bytes declared, {file_size - 8} in the file)")
            raw = f.read(length)
    except OSError as e:
        raise MergerError(f"cannot read '{path}': {e.strerror}", where=Location(model=str(path))) from None
    if len(raw) < length:
        raise _bad_file(path, f"truncated header ({length} bytes declared, {len(raw)} read)")
    data_start = 8 + length
    with paused_gc():
        fast = _tiled_header(raw, MAX_TENSORS)  # the usual header in data order, in one compiled pass
        if fast is not None:
            metadata, tensors, offsets, end = fast
        else:
            metadata, (tensors, offsets, end) = _read_entries(path, raw)
    data_size = file_size - data_start
    if end > data_size:
        key = next(k for k, (_, stop) in offsets.items() if stop > data_size)
        begin, stop = offsets[key]
        raise _bad_file(
            path, f"'{short(key)}' has byte range {begin}..{stop} that does not fit in the {data_size} bytes of data"
        )
    if end < data_size:
        extra = data_size - end
        raise _bad_file(
            path, f"{extra} byte{'' if extra == 1 else 's'} after the last tensor's data (not in the header)"
        )
    return SafetensorsHeader(path=path, data_start=data_start, tensors=tensors, offsets=offsets, metadata=metadata)


def _read_entries(
    path: Path, raw: bytes
) -> tuple[dict[str, str], tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], int]]:
    """(metadata, (specs, byte ranges, end of the data)) of a header the compiled pass did not take:
    by regular expressions when it is in the usual form, else by the strict reading, which raises for
    what it refuses."""
    plain = _plain_header(raw)
    if plain is not None and len(plain[1]) > MAX_TENSORS:
        plain = None  # too many: the strict reading says so
    tiled = _tiled_rows(plain[1]) if plain is not None else None  # the usual header, in data order
    entries = _plain_entries(plain[1]) if plain is not None and tiled is None else None
    if plain is not None and (tiled is not None or entries is not None):
        metadata = plain[0]
    else:  # another form (or a refused one): the strict reading decides
        parsed = _parse_header_json(path, raw)
        metadata = _header_metadata(path, parsed.pop("__metadata__", None))
        entries = [_tensor_entry(path, key, info) for key, info in parsed.items()]
    if tiled is None:
        assert entries is not None
        entries.sort()
        tiled = _tiled(path, entries)
    return metadata, tiled


def _tiled(
    path: Path, entries: list[tuple[int, int, str, str, tuple[int, ...]]]
) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], int]:
    """(specs, byte ranges, end of the data) of entries sorted by offsets, checked to tile the data from 0:
    each range begins where the previous ends and is as long as its dtype and shape say; raises for the
    first entry that does not."""
    tensors: dict[str, TensorSpec] = {}
    offsets: dict[str, tuple[int, int]] = {}
    end = 0
    for begin, stop, key, dtype, shape in entries:
        spec, numel, nbytes = shared(dtype, shape)
        if begin != end or stop - begin != nbytes or nbytes > MAX_BYTES or (numel == 0 and overflows(shape)):
            raise _bad_range(path, key, begin, stop, dtype, shape, end, offsets)
        tensors[key] = spec
        offsets[key] = (begin, stop)
        end = stop
    return tensors, offsets, end


def _parse_header_json(path: Path, raw: bytes) -> dict[str, object]:
    shape = measure(raw)
    # Each tensor is a value at depth 2 holding two arrays at depth 3 (shape, data_offsets);
    # counted in the raw bytes, this bounds the tensors before any is built.
    declared = min(shape.arrays_at(2) + shape.objects_at(2), shape.arrays_at(3) // 2)
    if declared > MAX_TENSORS:
        raise _bad_file(
            path, f"header declares about {declared} tensors, more than the {MAX_TENSORS} allowed (MAX_TENSORS)"
        )
    try:
        parsed = loads_strict(raw, what="header", serde_numbers=True, shape=shape)
    except JSONError as e:
        raise _bad_file(path, str(e)) from None
    if not isinstance(parsed, dict):
        raise _bad_file(path, f"header is {kind(parsed)}, not a JSON object")
    if len(parsed) - ("__metadata__" in parsed) > MAX_TENSORS:
        raise _bad_file(
            path, f"header declares {len(parsed)} tensors, more than the {MAX_TENSORS} allowed (MAX_TENSORS)"
        )
    return parsed


def _header_metadata(path: Path, raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad_file(path, f"__metadata__ is {kind(raw)}, not a JSON object")
    metadata: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise _bad_file(path, f"__metadata__ value of '{short(key)}' is {kind(value)}, not a string")
        metadata[key] = value
    return metadata


def _tensor_entry(path: Path, key: str, info: object) -> tuple[int, int, str, str, tuple[int, ...]]:
    """(begin, end, key, dtype, shape) of one tensor's entry, its types checked."""
    try:  # the usual form, checked fast; anything else is left to _checked_entry
        dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return _checked_entry(path, key, info)
    if (
        type(dtype) is str
        and dtype in DTYPE_SIZES
        and type(shape) is list
        and len(shape) <= MAX_DIMS
        and type(begin) is int
        and type(stop) is int
        and 0 <= begin <= MAX_U64
        and 0 <= stop <= MAX_U64
    ):
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= MAX_U64:
                return _checked_entry(path, key, info)
        return begin, stop, key, dtype, tuple(shape)
    return _checked_entry(path, key, info)


def _checked_entry(path: Path, key: str, info: object) -> tuple[int, int, str, str, tuple[int, ...]]:
    """`_tensor_entry` the slow way, for the rare forms and every error message."""
    name = short(key)
    if isinstance(info, dict):
        missing = [field for field in _TENSOR_FIELDS if field not in info]
        if missing:
            raise _bad_file(path, f"malformed entry for '{name}': it has no {missing[0]}")
        dtype, shape, offsets = (info[field] for field in _TENSOR_FIELDS)
    elif isinstance(info, list) and len(info) == 3:  # serde also reads a struct from a list of its fields
        dtype, shape, offsets = info
    else:
        raise _bad_file(
            path, f"malformed entry for '{name}': {kind(info)}, not an object with {', '.join(_TENSOR_FIELDS)}"
        )
    if isinstance(dtype, dict) and len(dtype) == 1 and None in dtype.values():  # serde's enum form {"F32": null}
        (dtype,) = dtype
    if not isinstance(dtype, str):
        raise _bad_file(path, f"malformed entry for '{name}': its dtype is {kind(dtype)}, not a string")
    if dtype not in LIBRARY_DTYPES:
        raise _bad_file(path, f"'{name}' has unknown dtype '{short(dtype)}'")
    if dtype not in DTYPE_SIZES:
        raise _bad_file(path, f"'{name}' has unsupported dtype {dtype} (merger reads {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list):
        raise _bad_file(path, f"malformed entry for '{name}': its shape is {kind(shape)}, not a list")
    if len(shape) > MAX_DIMS:
        raise _bad_file(path, f"'{name}' has {len(shape)} dimensions, more than the limit of {MAX_DIMS} (MAX_DIMS)")
    for dim in shape:
        if not _is_u64(dim):
            raise _bad_file(path, f"'{name}' has dimension {_number(dim)}, not an integer in 0..2**64-1")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise _bad_file(path, f"malformed entry for '{name}': its data_offsets are {kind(offsets)}, not [begin, end]")
    for offset in offsets:
        if not _is_u64(offset):
            raise _bad_file(path, f"'{name}' has data offset {_number(offset)}, not an integer in 0..2**64-1")
    return offsets[0], offsets[1], key, dtype, tuple(shape)


def _bad_range(
    path: Path,
    key: str,
    begin: int,
    stop: int,
    dtype: str,
    shape: tuple[int, ...],
    end: int,
    offsets: dict[str, tuple[int, int]],
) -> MergerError:
    """Why tensor `key` (next in data order, the previous ones ending at `end`) is refused."""
    name = short(key)
    if stop < begin:
        return _bad_file(path, f"'{name}' has byte range {begin}..{stop}, which ends before it begins")
    if begin > end:
        return _bad_file(path, f"'{name}' has byte range {begin}..{stop}, but the data before it ends at {end}: a hole")
    if begin < end:
        previous = next(reversed(offsets))
        before = f"'{short(previous)}' ({offsets[previous][0]}..{end})"
        return _bad_file(path, f"'{name}' has byte range {begin}..{stop}, which overlaps {before}")
    spec = TensorSpec(dtype, shape)
    if spec.nbytes > MAX_BYTES or overflows(shape):
        return _bad_file(path, f"'{name}' has shape {list(shape)}, whose size overflows 64 bits")
    return _bad_file(
        path,
        f"'{name}' has byte range {begin}..{stop} ({stop - begin} bytes), "
        f"but {spec.describe()} takes {spec.nbytes} bytes",
    )


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_U64


def _number(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return short(repr(value))
    return kind(value)
