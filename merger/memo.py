"""The source memo: what a model file holds, remembered by (path, size, times, inode).

A re-run must not re-hash unchanged multi-GB files, and a full cache hit must
not even open them. The memo maps a source's identity (the real path, size
modification and change times and inode of each of its files, and the `key:`
unwrapped; a copy made with `cp -p` or `rsync -t` changes the last two) to its
content hash and spec. One small JSON file per identity, written atomically,
so concurrent runs and shared filesystems are safe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from merger.atomic import write_text_atomic
from merger.hashing import KEY_SCHEME, digest_json
from merger.io.sources import SourceLocation
from merger.specs import DTYPE_SIZES, TensorSpec

#: bump when what a file is read as changes (e.g. the .pth unwrapping rules)
LOADER_VERSION = 1


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

    def _path(self, identity: str) -> Path:
        return self.root / identity[:2] / f"{identity}.json"

    def get(self, identity: str) -> MemoEntry | None:
        try:
            data = json.loads(self._path(identity).read_text())
            spec = {str(k): TensorSpec(d, tuple(s)) for k, d, s in data["spec"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        valid = all(
            t.dtype in DTYPE_SIZES and all(isinstance(d, int) and d >= 0 for d in t.shape) for t in spec.values()
        )
        return MemoEntry(str(data["hash"]), spec) if valid else None

    def put(self, identity: str, entry: MemoEntry) -> None:
        data = {
            "hash": entry.content_hash,
            "spec": [[k, s.dtype, list(s.shape)] for k, s in entry.spec.items()],
        }
        write_text_atomic(self._path(identity), json.dumps(data))
