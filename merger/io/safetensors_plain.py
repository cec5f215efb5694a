"""The usual safetensors header, read fast: the form writers write (a `__metadata__` of strings first,
then entries with the three fields in order, no whitespace), found by regular expressions and read in
one pass in data order, and one TensorSpec per (dtype, shape) for the whole process. Anything else, and
every refusal with its message, is merger.io.safetensors_header's strict reading (which uses these).
Where merger.io._plain_scan is built, `tiled_header` reads the entries in one compiled pass first.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from types import ModuleType

from merger.core.limits import MAX_DIMS
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.core.strict_json import loads_strict

try:
    from merger.io import _plain_scan
except ImportError:  # built without a C compiler: the regular expressions read every header
    _plain_scan = None  # type: ignore[assignment]

#: the compiled pass, or None where it is not built
PLAIN_SCAN: ModuleType | None = _plain_scan

MAX_U64 = 2**64 - 1
#: the largest tensor the library can size: it counts bits in a 64-bit integer
MAX_BYTES = MAX_U64 // 8


@functools.lru_cache(maxsize=1 << 16)
def shared(dtype: str, shape: tuple[int, ...]) -> tuple[TensorSpec, int, int]:
    """(spec, element count, bytes) of (dtype, shape): one spec object for all equal ones, shared by
    every header this process reads (and the source memo), so comparing two models' specs is a dict
    comparison that never calls TensorSpec.__eq__ (a memoised pure function: equal arguments, the
    same immutable answer)."""
    numel = math.prod(shape)
    return TensorSpec(dtype, shape), numel, numel * DTYPE_SIZES[dtype]


def shared_spec(dtype: str, shape: tuple[int, ...]) -> TensorSpec:
    """The TensorSpec of (dtype, shape) (a dtype of DTYPE_SIZES), one object for all equal ones."""
    return shared(dtype, shape)[0]


#: a header's rows as `_PLAIN_ENTRY` finds them: (key, dtype, shape, begin, end), all text
Rows = list[tuple[str, str, str, str, str]]


def plain_spec(dtype: str, shape: str) -> tuple[TensorSpec, int, bool] | None:
    """(spec, bytes, whether its size is refused) of a row's dtype and shape text; None when the plain
    reading does not take it (a dtype merger does not read, too many dimensions)."""
    if dtype not in DTYPE_SIZES:
        return None
    dims = tuple(map(int, shape.split(","))) if shape else ()
    if len(dims) > MAX_DIMS:
        return None
    spec, numel, nbytes = shared(dtype, dims)
    return spec, nbytes, nbytes > MAX_BYTES or (numel == 0 and overflows(dims))


def tiled_rows(rows: Rows) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], int] | None:
    """What the header module's `_tiled` gives for `plain_entries(rows)`, in one pass over the rows as
    written, when they are already in data order and tile the data (as writers write them): each
    begins where the previous ends (the same digits: the plain form has no leading zeros), empty
    tensors at one offset in key order. None for anything else, which `plain_entries` and `_tiled`
    then read (and refuse) entry by entry."""
    tensors: dict[str, TensorSpec] = {}
    offsets: dict[str, tuple[int, int]] = {}
    known: dict[tuple[str, str], tuple[TensorSpec, int, bool] | None] = {}
    end, end_text, empty_key = 0, "0", None  # empty_key: the last key, when it is empty and ends at `end`
    for key, dtype, shape, begin_text, stop_text in rows:
        try:
            found = known[dtype, shape]
        except KeyError:
            found = known[dtype, shape] = plain_spec(dtype, shape)
        if found is None or begin_text != end_text:
            return None
        spec, nbytes, refused = found
        if refused:
            return None
        if nbytes:
            stop = end + nbytes
            if stop_text != str(stop):
                return None
            offsets[key] = (end, stop)
            end, end_text, empty_key = stop, stop_text, None
        else:
            if stop_text != end_text or (empty_key is not None and key < empty_key):
                return None
            offsets[key] = (end, end)
            empty_key = key
        tensors[key] = spec
    if len(tensors) != len(rows) or "__metadata__" in tensors:
        return None
    return tensors, offsets, end


def plain_entries(rows: Rows) -> list[tuple[int, int, str, str, tuple[int, ...]]] | None:
    """The rows as `_tensor_entry` gives entries; None for a row the plain reading does not take, or a
    key given twice (the strict reading then decides)."""
    shapes: dict[str, tuple[int, ...]] = {}
    entries = []
    for key, dtype, shape, begin, end in rows:
        dims = shapes.get(shape)
        if dims is None:
            dims = shapes[shape] = tuple(map(int, shape.split(","))) if shape else ()
        if dtype not in DTYPE_SIZES or len(dims) > MAX_DIMS:
            return None
        entries.append((int(begin), int(end), key, dtype, dims))
    keys = {row[0] for row in rows}
    if len(keys) != len(rows) or "__metadata__" in keys:
        return None
    return entries


#: an integer of at most 18 digits (every one is an integer in u64 for the library's JSON reader too)
_SMALL_INT = r"(?:0|[1-9][0-9]{0,17})"
#: one tensor's entry as safetensors writers write it (no whitespace, no escape in the key, the three
#: fields in this order), and the comma after it
_PLAIN_ENTRY = re.compile(
    r'"([^"\\\x00-\x1f]*)":\{"dtype":"([A-Z0-9_]{1,16})","shape":\[((?:'
    + _SMALL_INT
    + r"(?:,"
    + _SMALL_INT
    + r')*)?)\],"data_offsets":\[('
    + _SMALL_INT
    + r"),("
    + _SMALL_INT
    + r")\]\},"
)
_METADATA_START = '{"__metadata__":'
#: the characters of one `_PLAIN_ENTRY` match besides its five fields
_PLAIN_FIXED = len('"":{"dtype":"","shape":[],"data_offsets":[,]},')


def _leading_metadata(raw: bytes) -> tuple[str, dict[str, str], int] | None:
    """(the header's text without trailing spaces, its `__metadata__` of strings when it comes first,
    where the entries begin in the text): None when the text is not UTF-8, not one object, or its
    metadata is not first and of strings."""
    try:
        text = raw.decode("utf-8").rstrip(" ")
    except UnicodeDecodeError:
        return None
    if not text.startswith("{") or not text.endswith("}"):
        return None
    metadata: dict[str, str] = {}
    start = 1
    if text.startswith(_METADATA_START):
        try:
            _, stop = json.JSONDecoder().raw_decode(text, len(_METADATA_START))
            found = loads_strict(text[len(_METADATA_START) : stop].encode(), what="metadata")
        except (ValueError, RecursionError):
            return None
        if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
            return None
        metadata = {str(k): str(v) for k, v in found.items()}
        if stop < len(text) - 1 and text[stop] != ",":
            return None
        start = stop + 1
    return text, metadata, start


def tiled_header(
    raw: bytes, max_entries: int
) -> tuple[dict[str, str], dict[str, TensorSpec], dict[str, tuple[int, int]], int] | None:
    """(metadata, then what `tiled_rows(plain_header(raw)[1])` gives) in one compiled pass over the
    entries (merger.io._plain_scan), for the usual header of at most `max_entries` tensors in data
    order; None where that pass is not built or does not take the header (the regular expressions
    then read it, and the strict reading decides what they do not take)."""
    if PLAIN_SCAN is None:
        return None
    leading = _leading_metadata(raw)
    if leading is None:
        return None
    text, metadata, start = leading
    if start >= len(text) - 1:
        return None  # no entries (or `{"__metadata__":{...}}`): the regular expressions decide
    begin = start if text.isascii() else len(text[:start].encode("utf-8"))
    stop = len(raw.rstrip(b" ")) - 1  # the closing brace
    found = PLAIN_SCAN.tiled(raw, begin, stop, max_entries, plain_spec)
    return None if found is None else (metadata, *found)


def plain_header(raw: bytes) -> tuple[dict[str, str], Rows] | None:
    """(metadata, entries as `_tensor_entry` gives them) of a header in the form writers write (a
    `__metadata__` of strings first, if any, then entries as `_PLAIN_ENTRY` matches them), found
    by regular expressions rather than by building a JSON object per tensor (a model of 200,000
    tensors reads in a fraction of the time). None for any other header, even a valid one, and
    for anything the strict reading would refuse or read otherwise: that reading then decides."""
    leading = _leading_metadata(raw)
    if leading is None:
        return None
    text, metadata, start = leading
    if start >= len(text) - 1:
        return (metadata, []) if start == len(text) else None  # `{"__metadata__":{...}}`
    body = text[start:-1] + ","
    if not _PLAIN_ENTRY.match(body):
        return None  # not the usual form: said at once, before any pass over the header
    rows = _PLAIN_ENTRY.findall(body)
    if not rows:
        return None
    # the matches are apart and in order, so they are the whole body when their lengths add up to it
    # (each is its five fields and the fixed text around them): anything else is not this form
    if len("".join(itertools.chain.from_iterable(rows))) + _PLAIN_FIXED * len(rows) != len(body):
        return None
    return metadata, rows


def overflows(shape: tuple[int, ...]) -> bool:
    """Whether the library's running product of the dimensions passes 2**64 (a later 0 does not undo it)."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > MAX_U64:
            return True
    return False
