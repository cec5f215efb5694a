"""The content-addressed store of materialised nodes and output artifacts.

Layout under the cache directory:

    objects/ab/<key>.safetensors      a committed entry (never modified)
    objects/ab/<key>.safetensors.json its record: sha256, size, pins, what made it (see merger.cache.record)
    memo/                             the source memo (see merger.cache.memo)
    locks/<key>.lock                  advisory locks (POSIX record locks)
    tmp/                              entries being written
    quarantine/                       objects that failed a check, moved aside (never served)

An entry is written under tmp/, fsynced, then linked to its final name, which
fails if another process committed the same key first (the first one stays),
and its record is written beside it. Readers therefore never see a partial
entry. The cache serves only what it wrote and can check: a lookup accepts an
object only with a valid record whose pins (size, first bytes, inode, ctime,
mtime) still hold, or, when only the inode's times moved (a link, a chmod),
after re-hashing it in full; anything else is moved to quarantine/ and
computed again. Locks are `fcntl.lockf` record locks: released by the kernel
when a process dies, and honoured by NFS, so a crashed job leaves at most a
lock file that nobody holds.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.cache.atomic import fsync_dir, is_stale_tmp, tmp_path_for
from merger.cache.memo import SourceMemo
from merger.cache.metric_records import MetricRecords
from merger.cache.record import (
    EntryRecord,
    Pin,
    head_digest,
    new_record,
    read_record,
    record_path,
    repinned,
    write_record,
)
from merger.errors import OS_FIXES, MergerError, shown
from merger.io.safetensors_file import file_sha256

log = logging.getLogger("merger")

DEFAULT_CACHE_DIR = "outputs/cache"
CACHE_DIR_VARIABLE = "MERGER_CACHE_DIR"
#: an object without a record younger than this may be another process's commit in progress
COMMIT_GRACE_SECONDS = 60.0
RECORD_WAIT_SECONDS = 5.0


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
    notes: dict[str, Any] = field(default_factory=dict)


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


LOCK_SUFFIX = ".lock"


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (no one removed and re-created it)."""
    try:
        st, now = os.fstat(fd), path.stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _thread_lock(name: str) -> threading.Lock:
    """The process-wide lock for `name`: record locks are per process, threads need their own."""
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(name, threading.Lock())


CACHE_FIXES = {
    errno.ENOSPC: "free space on that disk, collect the cache (merger-cache gc --max-size 20GB),"
    " or set cache_dir=<a directory on another disk>",
    errno.EROFS: "the cache's filesystem is read-only: set cache_dir=<a writable directory>",
    errno.EACCES: "you cannot write the cache there: set cache_dir=<a writable directory>",
}


def cache_error(error: OSError, doing: str) -> MergerError:
    """An OSError met while using the cache, as the error block (what, where, fix)."""
    code = error.errno or 0
    place = f" ({shown(error.filename)})" if error.filename else ""
    return MergerError(
        f"cannot {doing}: {error.strerror or error}{place}",
        where="cache_dir",
        fix=CACHE_FIXES.get(code) or OS_FIXES.get(code) or "set cache_dir=<a writable directory>",
    )


class Cache:
    def __init__(self, root: Path, *, verify: bool = False) -> None:
        """A cache at `root`; nothing is created on disk until something is written.

        `verify`: re-hash every entry a lookup serves (the `cache_verify` run setting)."""
        self.root = root
        self.verify = verify
        self.memo = SourceMemo(root / "memo")
        self.metrics = MetricRecords(root / "metrics")  # what evaluations measured (merger.report.evaluate)

    def _dir(self, sub: str) -> Path:
        path = self.root / sub
        if path.is_symlink():
            raise MergerError(
                f"the cache's '{sub}' is a symbolic link ({shown(path)}); merger never follows links inside its cache",
                where="cache_dir",
                fix=f"remove the link {shown(path)} (merger makes the directory again), or use another cache_dir",
            )
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
        """The committed entry for `key`, checked against its record; None when there is none
        (or it failed a check: then it has been moved to quarantine/ and is computed again)."""
        path = self.path(key, suffix)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise cache_error(e, "read the cache") from None
        record = read_record(path)
        if record is None:
            if time.time() - st.st_ctime > COMMIT_GRACE_SECONDS:  # not another run's commit in progress
                self.quarantine(path, "it has no valid record")
            return None
        checked = self._checked(path, st, record)
        if checked is None:
            return None
        with suppress(OSError):
            os.utime(record_path(path))  # last use, for merger-cache ls and gc
        return EntryInfo(key, path, checked.sha256, checked.bytes, checked.notes)

    def _checked(self, path: Path, st: os.stat_result, record: EntryRecord) -> EntryRecord | None:
        """The record if the object still is what it describes (re-pinned after a full check)."""
        try:
            if st.st_ino != record.pin.inode:
                problem = (
                    "it is not the file merger wrote there (another inode: the cache was copied, or the file replaced)"
                )
            elif st.st_size != record.bytes:
                problem = f"its size is {st.st_size} bytes, its record says {record.bytes}"
            elif head_digest(path, record.head_bytes) != record.head_sha256:
                problem = "its first bytes changed"
            elif not self.verify and Pin.of(st) == record.pin:
                return record
            elif file_sha256(path) != record.sha256:
                problem = "its sha256 no longer matches its record (it was written to)"
            else:
                return repinned(path, record) if Pin.of(st) != record.pin else record
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise cache_error(e, "read the cache") from None
        self.quarantine(path, problem)
        return None

    def quarantine(self, path: Path, why: str) -> None:
        """Move an object (and its record) aside: it is never served again."""
        log.warning(f"cache entry {path.name} failed its check ({why}); moved to quarantine, computing it again")
        stamp = time.time_ns()
        for item in (path, record_path(path)):
            try:
                os.replace(item, self._dir("quarantine") / f"{item.name}.{stamp}")
            except (OSError, MergerError):
                with suppress(OSError):
                    item.unlink()

    def placed(self, entry: EntryInfo) -> None:
        """Re-pin an entry after merger linked it to an output (a link moves the inode's ctime)."""
        record = read_record(entry.path)
        if record is not None and record.sha256 == entry.sha256:
            with suppress(OSError):
                repinned(entry.path, record)

    def new_tmp(self, key_hint: str, suffix: str = ".safetensors") -> Path:
        return tmp_path_for(self._dir("tmp") / f"{key_hint[:16]}{suffix}")

    def commit(
        self,
        tmp: Path,
        key: str,
        sha256: str,
        suffix: str = ".safetensors",
        *,
        made: dict[str, Any] | None = None,
        notes: dict[str, Any] | None = None,
    ) -> EntryInfo:
        """Move a finished, fsynced temporary file into the store under `key`, read-only
        (outputs are hard links of entries: writing into one would change the entry), and
        write its record. If another run committed the key first, theirs stays."""
        final = self.path(key, suffix)
        linked: int | None = None  # the inode we put at `final`, until its record is written
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            inode = tmp.stat().st_ino
            existing = self._link_into_place(tmp, final, key, suffix)
            if existing is not None:
                return existing
            linked = inode
            tmp.unlink(missing_ok=True)  # before pinning: dropping a link moves the inode's ctime
            fsync_dir(final.parent)
            record = new_record(final, sha256, made=made, notes=notes)
            write_record(final, record)
            linked = None
        except OSError as e:
            raise cache_error(e, "commit a cache entry") from None
        finally:
            tmp.unlink(missing_ok=True)
            if linked is not None:  # interrupted (or failed) before the record: take our object back out
                with suppress(OSError):
                    if final.stat().st_ino == linked:
                        final.unlink()
        return EntryInfo(key, final, sha256, record.bytes, record.notes)

    def _link_into_place(self, tmp: Path, final: Path, key: str, suffix: str) -> EntryInfo | None:
        """Link `tmp` at `final`; or the entry another run committed there first (None: ours is in place)."""
        deadline = time.monotonic() + RECORD_WAIT_SECONDS
        while True:
            try:
                os.link(tmp, final)
                return None
            except FileExistsError:
                pass
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if not final.exists():  # a filesystem without hard links
                    os.replace(tmp, final)
                    return None
            existing = self.lookup(key, suffix)
            if existing is not None:
                return existing
            if time.monotonic() > deadline:  # never recorded: not another run's commit in progress
                self.quarantine(final, "it has no valid record")
            else:
                time.sleep(0.05)  # another run may be writing its record right now

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock named `name`, waiting while another process or thread holds it.

        A POSIX record lock excludes other processes (and machines, on a filesystem
        that honours them); record locks belong to a process, so threads of one
        process also take a lock of their own first.
        """
        with self._locked(name, wait=True):
            yield

    @contextmanager
    def try_lock(self, name: str) -> Iterator[Path | None]:
        """The lock `name` without waiting: yields the lock file's path while held, or None when
        another process or thread holds it (merger-cache gc skips what a run is using)."""
        with self._locked(name, wait=False) as held:
            yield held

    @contextmanager
    def _locked(self, name: str, *, wait: bool) -> Iterator[Path | None]:
        thread_lock = _thread_lock(str(self.root / "locks" / name))
        if not thread_lock.acquire(blocking=wait):
            yield None
            return
        try:
            while True:
                path = self._dir("locks") / f"{name}{LOCK_SUFFIX}"
                try:
                    handle = open(path, "a+b")  # noqa: SIM115 (closed below, after the lock is released)
                except OSError as e:
                    raise cache_error(e, "take a lock in the cache") from None
                try:
                    fcntl.lockf(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    handle.close()
                    if not wait and e.errno in (errno.EAGAIN, errno.EACCES):
                        yield None
                        return
                    raise cache_error(e, "take a lock in the cache") from None
                if _same_file(handle.fileno(), path):
                    break
                handle.close()  # gc removed the lock file while we waited on it: lock the new one
            try:
                yield path
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)
                handle.close()
        finally:
            thread_lock.release()

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
