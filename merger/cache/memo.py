"""The source memo: what a model file holds, remembered by (path, size, times, inode).

A re-run must not re-hash unchanged multi-GB files, and a full cache hit must
not even open them. The memo maps a source's identity (the real path, size
modification and change times and inode of each of its files, and the `key:`
unwrapped; a copy made with `cp -p` or `rsync -t` changes the last two) to its
content hash and spec. One small JSON file per identity, written atomically,
so concurrent runs and shared filesystems are safe. For a PyTorch checkpoint
it also keeps the layout its one parse found (where each tensor's bytes are),
so the unpickler runs once per file, not again in the job or the next run. It also remembers what
image-model detections found (by a digest of the spec and spandrel's version, merger.archs), so a
re-run does not import spandrel and torch to detect an architecture again.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.cache.atomic import write_text_atomic
from merger.cache.hashing import KEY_SCHEME, digest_json
from merger.core.regular_file import open_regular
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.io.safetensors_plain import shared_spec
from merger.io.sources import SourceLocation

#: bump when what a file is read as changes (e.g. the .pth unwrapping rules); 2: merger's own .pth reader
LOADER_VERSION = 2
MAX_MEMO_BYTES = 256 * 1024 * 1024


def _tensor_spec(row: Any) -> TensorSpec | None:
    """[dtype, shape] as a TensorSpec, or None when it cannot describe a real tensor."""
    dtype, shape = row
    if dtype not in DTYPE_SIZES or not isinstance(shape, list):
        return None
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return shared_spec(dtype, tuple(shape))


def _spec_of(data: Any) -> dict[str, TensorSpec] | None:
    """The spec a memo entry holds (None: not a valid one): `keys` with an index each into the distinct
    `specs`, or (as earlier mergers wrote it) one [key, dtype, shape] row per tensor."""
    if "spec" in data:  # the earlier form
        rows = data["spec"]
        specs = {}
        for key, dtype, shape in rows:
            found = _tensor_spec([dtype, shape])
            if found is None or type(key) is not str:
                return None
            specs[key] = found
        return specs if len(specs) == len(rows) else None
    keys, table, index = data["keys"], data["specs"], data["spec_of"]
    if not (type(keys) is list and type(table) is list and type(index) is list and len(keys) == len(index)):
        return None
    distinct: list[TensorSpec] = []
    for row in table:
        found = _tensor_spec(row)
        if found is None:
            return None
        distinct.append(found)
    if keys and not (set(map(type, keys)) == {str} and set(map(type, index)) == {int}):
        return None
    if index and not (min(index) >= 0 and max(index) < len(distinct)):
        return None
    spec = dict(zip(keys, map(distinct.__getitem__, index), strict=True))
    return spec if len(spec) == len(keys) else None


def source_identity(location: SourceLocation) -> str:
    """A digest of what, short of reading it, identifies a source's content."""
    files = []
    for f in location.files:
        st = f.stat()
        files.append([os.path.realpath(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return digest_json(
        {"scheme": KEY_SCHEME, "loader": LOADER_VERSION, "kind": location.kind, "key": location.key, "files": files}
    )


@dataclass(frozen=True)
class MemoEntry:
    content_hash: str
    spec: dict[str, TensorSpec]


class SourceMemo:
    def __init__(self, root: Path) -> None:
        self.root = root
        #: detections to remember, written by `write_detections` when the job runs (a pre-flight writes nothing)
        self._detections: dict[str, Any] = {}

    def _path(self, identity: str, suffix: str = ".json") -> Path:
        return self.root / identity[:2] / f"{identity}{suffix}"

    def _read(self, path: Path) -> Any:
        """A memo file's JSON, or None. merger wrote it, so Python's own parser reads it (a file that
        nests too deeply fails as any other damage does); `get` checks every value it uses."""
        try:
            with open_regular(path) as f:
                raw = f.read(MAX_MEMO_BYTES + 1)
            return None if len(raw) > MAX_MEMO_BYTES else json.loads(raw)
        except (OSError, ValueError, RecursionError):
            return None

    def get(self, identity: str) -> MemoEntry | None:
        data = self._read(self._path(identity))
        try:
            spec = _spec_of(data)
            content_hash = data["hash"]
        except (ValueError, KeyError, TypeError, IndexError):
            return None
        return MemoEntry(content_hash, spec) if spec is not None and isinstance(content_hash, str) else None

    def put(self, identity: str, entry: MemoEntry) -> None:
        """The spec as its distinct tensor specs and, per key, which one (a model of many keys has few)."""
        table: dict[TensorSpec, int] = {}
        by_object: dict[int, int] = {}  # id(spec) -> its row: a model's equal specs are mostly one object
        index = []
        for spec in entry.spec.values():
            row = by_object.get(id(spec))
            if row is None:
                row = by_object[id(spec)] = table.setdefault(spec, len(table))
            index.append(row)
        data = {
            "hash": entry.content_hash,
            "keys": list(entry.spec),
            "specs": [[s.dtype, list(s.shape)] for s in table],
            "spec_of": index,
        }
        write_text_atomic(self._path(identity), json.dumps(data))

    def get_layout(self, identity: str) -> list[list[Any]] | None:
        """A checkpoint's layout remembered for this identity (checked against the file when used)."""
        data = self._read(self._path(identity, ".layout.json"))
        return data if isinstance(data, list) else None

    def put_layout(self, identity: str, layout: list[list[Any]]) -> None:
        with suppress(OSError):  # a read-only cache only means the next run parses the file again
            write_text_atomic(self._path(identity, ".layout.json"), json.dumps(layout))

    def get_detection(self, key: str) -> Any:
        """What an image-model detection found, remembered under `key` (merger.archs.detection reads it)."""
        if key in self._detections:
            return self._detections[key]
        return self._read(self._path(key, ".detection.json"))

    def put_detection(self, key: str, data: Any) -> None:
        """Remember a detection: kept here until `write_detections`, so that checks that fail write nothing."""
        self._detections[key] = data

    def write_detections(self) -> None:
        """Write the detections put since the last call (the job does, once its checks have passed)."""
        pending, self._detections = self._detections, {}
        for key, data in pending.items():
            with suppress(OSError):  # a read-only cache only means the next run asks spandrel again
                write_text_atomic(self._path(key, ".detection.json"), json.dumps(data))
