"""The source memo: what a model file holds, remembered by (path, size, times, inode).

A re-run must not re-hash unchanged multi-GB files, and a full cache hit must
not even open them. The memo maps a source's identity (the real path, size
modification and change times and inode of each of its files, and the `key:`
unwrapped; a copy made with `cp -p` or `rsync -t` changes the last two) to its
content hash and spec. One small JSON file per identity, written atomically,
so concurrent runs and shared filesystems are safe. For a PyTorch checkpoint
it also keeps the layout its one parse found (where each tensor's bytes are),
so the unpickler runs once per file, not again in the job or the next run.
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
from merger.core.strict_json import loads_strict
from merger.io.sources import SourceLocation

#: bump when what a file is read as changes (e.g. the .pth unwrapping rules); 2: merger's own .pth reader
LOADER_VERSION = 2
MAX_MEMO_BYTES = 256 * 1024 * 1024


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

    def _path(self, identity: str, suffix: str = ".json") -> Path:
        return self.root / identity[:2] / f"{identity}{suffix}"

    def _read(self, path: Path) -> Any:
        try:
            with open_regular(path) as f:
                raw = f.read(MAX_MEMO_BYTES + 1)
            return None if len(raw) > MAX_MEMO_BYTES else loads_strict(raw, what="a memo entry")
        except (OSError, ValueError):
            return None

    def get(self, identity: str) -> MemoEntry | None:
        data = self._read(self._path(identity))
        try:
            spec = {str(k): TensorSpec(d, tuple(s)) for k, d, s in data["spec"]}
            content_hash = str(data["hash"])
        except (ValueError, KeyError, TypeError):
            return None
        valid = all(
            t.dtype in DTYPE_SIZES and all(isinstance(d, int) and d >= 0 for d in t.shape) for t in spec.values()
        )
        return MemoEntry(content_hash, spec) if valid else None

    def put(self, identity: str, entry: MemoEntry) -> None:
        data = {
            "hash": entry.content_hash,
            "spec": [[k, s.dtype, list(s.shape)] for k, s in entry.spec.items()],
        }
        write_text_atomic(self._path(identity), json.dumps(data))

    def get_layout(self, identity: str) -> list[list[Any]] | None:
        """A checkpoint's layout remembered for this identity (checked against the file when used)."""
        data = self._read(self._path(identity, ".layout.json"))
        return data if isinstance(data, list) else None

    def put_layout(self, identity: str, layout: list[list[Any]]) -> None:
        with suppress(OSError):  # a read-only cache only means the next run parses the file again
            write_text_atomic(self._path(identity, ".layout.json"), json.dumps(layout))
