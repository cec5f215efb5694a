"""The record beside each cache object: what merger wrote, pinned so that a change is seen.

`objects/ab/<key><suffix>.json` holds the object's sha256 and size, the
sha256 of its first bytes (a safetensors header, up to PIN_HEAD_BYTES), and
the inode, ctime and mtime it had when merger last checked it. A lookup
compares the cheap pins on every hit: a different size or first bytes means
the object was replaced or truncated; a different ctime means something
wrote to it (ctime moves on any write or link and cannot be set back), so
the object is re-hashed in full before it is served. The record also says
what made the object (node, op, recipe) and when it was last used, for
`merger-cache ls` and `gc`. Last use is the record's own mtime, touched on
every hit (file atimes are not kept by most mounts).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.cache.atomic import write_text_atomic
from merger.core.regular_file import open_regular
from merger.core.strict_json import loads_strict

RECORD_SUFFIX = ".json"
RECORD_VERSION = 2
MAX_RECORD_BYTES = 1 << 20
PIN_HEAD_BYTES = 1 << 20  # at most this much of an object's start is digested on every hit


@dataclass(frozen=True)
class Pin:
    """What a write to a file changes: its size, inode, ctime and mtime."""

    size: int
    inode: int
    ctime_ns: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Pin:
        return cls(st.st_size, st.st_ino, st.st_ctime_ns, st.st_mtime_ns)


@dataclass(frozen=True)
class EntryRecord:
    sha256: str
    bytes: int
    head_bytes: int  # how many of the object's first bytes `head_sha256` covers
    head_sha256: str
    pin: Pin
    made: dict[str, Any] = field(default_factory=dict)  # node, op, recipe; or the artifact's source key and form
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. non-finite counts, carried to reports on a hit

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "sha256": self.sha256,
                "bytes": self.bytes,
                "head": [self.head_bytes, self.head_sha256],
                "pin": [self.pin.size, self.pin.inode, self.pin.ctime_ns, self.pin.mtime_ns],
                "made": self.made,
                "notes": self.notes,
            },
            sort_keys=True,
        )


def record_path(object_path: Path) -> Path:
    return object_path.with_name(object_path.name + RECORD_SUFFIX)


def head_length(path: Path, size: int) -> int:
    """How much of the object's start to pin: a safetensors file's whole header, capped."""
    length = min(size, 8)
    if path.suffix == ".safetensors" and size >= 8:
        with open(path, "rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
        length = 8 + header
    return min(max(length, min(size, 4096)), size, PIN_HEAD_BYTES)


def head_digest(path: Path, length: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def read_record(object_path: Path) -> EntryRecord | None:
    """The object's record, or None when it is missing, unreadable or not one of merger's."""
    try:
        with open_regular(record_path(object_path)) as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            return None
        data = loads_strict(raw, what="a cache record")
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            return None
        head_bytes, head_sha = data["head"]
        size, inode, ctime_ns, mtime_ns = (int(v) for v in data["pin"])
        made, notes = data.get("made", {}), data.get("notes", {})
        record = EntryRecord(
            str(data["sha256"]),
            int(data["bytes"]),
            int(head_bytes),
            str(head_sha),
            Pin(size, inode, ctime_ns, mtime_ns),
            made if isinstance(made, dict) else {},
            notes if isinstance(notes, dict) else {},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(record.sha256) != 64 or record.bytes < 0 or not 0 <= record.head_bytes <= PIN_HEAD_BYTES:
        return None
    return record


def new_record(
    object_path: Path, sha256: str, *, made: dict[str, Any] | None = None, notes: dict[str, Any] | None = None
) -> EntryRecord:
    """A record for an object merger has just written (its sha256 known from writing it)."""
    st = object_path.stat()
    length = head_length(object_path, st.st_size)
    return EntryRecord(
        sha256, st.st_size, length, head_digest(object_path, length), Pin.of(st), made or {}, notes or {}
    )


def write_record(object_path: Path, record: EntryRecord) -> None:
    write_text_atomic(record_path(object_path), record.to_json())


def repinned(object_path: Path, record: EntryRecord) -> EntryRecord:
    """The record with the object's current inode and times (after merger's own link or check)."""
    pinned = EntryRecord(
        record.sha256,
        record.bytes,
        record.head_bytes,
        record.head_sha256,
        Pin.of(object_path.stat()),
        record.made,
        record.notes,
    )
    write_record(object_path, pinned)
    return pinned
