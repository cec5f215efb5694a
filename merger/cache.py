"""The content-addressed store of materialised nodes and output artifacts.

Layout under the cache directory:

    objects/ab/<key>.safetensors      a committed entry (never modified)
    objects/ab/<key>.safetensors.json its index record: sha256 and size
    memo/                             the source memo (see merger.memo)
    locks/<key>.lock                  advisory locks (POSIX record locks)
    tmp/                              entries being written

An entry is written under tmp/, fsynced, then linked to its final name, which
fails if another process committed the same key first (the first one stays).
Readers therefore never see a partial entry. Locks are `fcntl.lockf` record
locks: released by the kernel when a process dies, and honoured by NFS, so a
crashed job leaves at most a lock file that nobody holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from merger.atomic import fsync_dir, is_stale_tmp, tmp_path_for, write_text_atomic
from merger.errors import MergerError
from merger.io.safetensors_file import file_sha256
from merger.memo import SourceMemo


DEFAULT_CACHE_DIR = "outputs/cache"
CACHE_DIR_VARIABLE = "MERGER_CACHE_DIR"


def cache_location(setting: str | None, launch_dir: Path) -> Path:
    """Where the cache is: the `cache_dir` setting (the command line's), else $MERGER_CACHE_DIR,
    else outputs/cache; relative paths are relative to the launch directory."""
    chosen = setting or os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR
    return launch_dir / Path(chosen).expanduser()


@dataclass(frozen=True)
class EntryInfo:
    key: str
    path: Path
    sha256: str
    bytes: int


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(name: str) -> threading.Lock:
    """The process-wide lock for `name`: record locks are per process, threads need their own."""
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(name, threading.Lock())


class Cache:
    def __init__(self, root: Path) -> None:
        """A cache at `root`; nothing is created on disk until something is written."""
        self.root = root
        self.memo = SourceMemo(root / "memo")

    def _dir(self, sub: str) -> Path:
        path = self.root / sub
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MergerError(
                f"cannot create the cache directory '{path}': {e.strerror}",
                where="cache_dir",
                fix="set cache_dir=<a writable directory> or the MERGER_CACHE_DIR environment variable",
            ) from None
        return path

    def path(self, key: str, suffix: str = ".safetensors") -> Path:
        return self.root / "objects" / key[:2] / f"{key}{suffix}"

    def lookup(self, key: str, suffix: str = ".safetensors") -> EntryInfo | None:
        """The committed entry for `key`, or None.

        An entry whose file no longer matches its record (size, mtime, inode: someone
        wrote into an output hard-linked to it) is thrown away, so it is computed again.
        """
        path = self.path(key, suffix)
        record = path.with_name(path.name + ".json")
        try:
            st = path.stat()
        except OSError:
            return None
        try:
            data = json.loads(record.read_text())
            info = EntryInfo(key, path, str(data["sha256"]), int(data["bytes"]))
            if [st.st_size, st.st_mtime_ns, st.st_ino] == data.get("stat", [st.st_size, st.st_mtime_ns, st.st_ino]):
                return info
            for stale in (path, record):
                stale.unlink(missing_ok=True)
            return None
        except (OSError, ValueError, KeyError, TypeError):
            pass
        info = EntryInfo(key, path, file_sha256(path), st.st_size)  # the record was lost
        self._write_record(info)
        return info

    def new_tmp(self, key_hint: str, suffix: str = ".safetensors") -> Path:
        return tmp_path_for(self._dir("tmp") / f"{key_hint[:16]}{suffix}")

    def commit(self, tmp: Path, key: str, sha256: str, suffix: str = ".safetensors") -> EntryInfo:
        """Move a finished, fsynced temporary file into the store under `key`, read-only
        (outputs are hard links of entries: writing into one would change the entry)."""
        final = self.path(key, suffix)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        ours = True
        try:
            os.link(tmp, final)
        except FileExistsError:
            ours = False  # committed by another run first: same content, theirs stays
        except OSError:
            ours = not final.exists()  # a filesystem without hard links
            if ours:
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        if not ours:
            existing = self.lookup(key, suffix)
            if existing is not None:
                return existing
        info = EntryInfo(key, final, sha256, final.stat().st_size)
        self._write_record(info)
        return info

    def _write_record(self, info: EntryInfo) -> None:
        record = info.path.with_name(info.path.name + ".json")
        st = info.path.stat()
        data = {"sha256": info.sha256, "bytes": info.bytes, "stat": [st.st_size, st.st_mtime_ns, st.st_ino]}
        write_text_atomic(record, json.dumps(data))

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock named `name`, waiting while another process or thread holds it.

        A POSIX record lock excludes other processes (and machines, on a filesystem
        that honours them); record locks belong to a process, so threads of one
        process also take a lock of their own first.
        """
        with _thread_lock(str(self.root / "locks" / name)):
            path = self._dir("locks") / f"{name}.lock"
            with open(path, "a+b") as handle:
                fcntl.lockf(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.lockf(handle, fcntl.LOCK_UN)

    def remove_stale_tmp(self) -> int:
        """Delete temporary files left by crashed runs (see `is_stale_tmp`); returns how many."""
        removed = 0
        if not (self.root / "tmp").is_dir():
            return 0
        for tmp in (self.root / "tmp").iterdir():
            if is_stale_tmp(tmp):
                with suppress(OSError):
                    tmp.unlink()
                    removed += 1
        return removed
