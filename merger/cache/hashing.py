"""Stable content hashes: hashlib digests of canonical JSON and of tensor bytes.

Never Python's `hash()` (salted per process) and never an order-blind XOR:
a key must be the same on every machine, in every process, forever.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merger.core.specs import TensorSpec

try:  # the compiled row writer (merger/cache/_content_rows.c; optional, see setup.py)
    from merger.cache import _content_rows
except ImportError:  # pragma: no cover - a build without a C compiler
    _content_rows = None  # type: ignore[assignment]

#: bump when the meaning of a key changes, so old cache entries stop matching
KEY_SCHEME = "merger-key-v2"
#: json.dumps's own string writer (ensure_ascii), for canonical JSON written piece by piece
_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
#: the compiled writer of a content hash's rows, None where it is not built (tests set it to None)
CONTENT_ROWS: ModuleType | None = _content_rows


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def digest_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def new_tensor_hasher() -> Any:
    """The hasher for one tensor's bytes: XXH3-128, about 12 GB/s on one core,
    so that hashing a source in the pass that reads it does not show."""
    import xxhash

    return xxhash.xxh3_128()


def tensor_digest(data: bytes | bytearray | memoryview) -> str:
    """The hex digest of one whole tensor's bytes: what `new_tensor_hasher` fed them all gives."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def source_content_hash(tensors: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    """The content hash of a model: its keys, dtypes, shapes and tensor digests.

    `tensors` yields (key, dtype code, shape, hex digest of the tensor's bytes).
    It does not depend on the file format or on the order tensors were read in,
    so a `.pth` and a `.safetensors` holding the same tensors share cache entries.

    The digest of `digest_json({"scheme", "kind": "tensors", "tensors": sorted [key, dtype, shape, digest] rows})`,
    its canonical JSON written row by row (each distinct shape once): a model of 200,000 tensors
    is hashed in a fraction of a second.
    """
    rows = sorted(tensors)  # by key (keys are unique, so the rest is never compared)
    shapes: dict[object, str] = {}  # each distinct shape (and dtype) written once
    dtypes: dict[str, str] = {}
    parts: list[str] = []
    append = parts.append
    for key, dtype, shape, digest in rows:
        written = shapes.get(shape)
        if written is None:
            written = shapes[shape] = canonical_json(list(shape))
        code = dtypes.get(dtype)
        if code is None:
            code = dtypes[dtype] = _string(dtype)
        append(f"[{_string(key)},{code},{written},{_string(digest)}]")
    head = canonical_json({"kind": "tensors", "scheme": KEY_SCHEME})[:-1]
    text = f'{head},"tensors":[{",".join(parts)}]}}'
    return hashlib.sha256(text.encode()).hexdigest()


def spec_content_hash(spec: Mapping[str, TensorSpec], digests: Mapping[str, str]) -> str:
    """`source_content_hash` of the rows (key, dtype, shape, digests[key]) of every tensor of `spec`:
    written by the compiled loop where it is built (the same text; a 200,000-tensor model's rows in
    a few hundredths of a second where Python's loop takes about 0.25 s)."""
    if CONTENT_ROWS is None or type(spec) is not dict or type(digests) is not dict:
        return source_content_hash([(key, s.dtype, s.shape, digests[key]) for key, s in spec.items()])
    joined = CONTENT_ROWS.rows(sorted(spec), spec, digests, _row_middle, _string)
    head = canonical_json({"kind": "tensors", "scheme": KEY_SCHEME})[:-1]
    return hashlib.sha256(f'{head},"tensors":['.encode() + joined + b"]}").hexdigest()


def _row_middle(tensor: TensorSpec) -> str:
    """A tensor's part of its row: ',"F32",[4096,4096],'."""
    return f",{_string(tensor.dtype)},{canonical_json(list(tensor.shape))},"
