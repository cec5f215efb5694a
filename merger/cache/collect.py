"""Keeping the cache in bounds: `merger-cache gc` and the `cache_max_size` run setting."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import merger.cache.store as cache_module
from merger.cache.atomic import TMP_MARK, is_stale_tmp

#: the parts of a cache directory, in the order `usage` lists them
from merger.cache.listing import (
    DAY_SECONDS,
    CacheEntry,
    _all_files,
    _files,
    _stat,
    _unlink,
    entries,
    merger_named,
    strays,
    usage,
)
from merger.cache.record import RECORD_SUFFIX, read_record, record_path
from merger.cache.store import LOCK_SUFFIX, Cache
from merger.core.sizes import SIZE_FORMS
from merger.errors import MergerError

# --- collection -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removed:
    kind: str  # tmp, quarantine, stray, lock, memo, object
    path: Path
    bytes: int
    key: str | None = None


@dataclass
class GcResult:
    removed: list[Removed] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # keys left because another process held their lock
    linked_bytes: int = 0  # of the removed objects' bytes, those an output still links (no disk space freed)
    bytes_before: int = 0  # the cache's own files before and after
    bytes_after: int = 0

    @property
    def freed(self) -> int:
        return sum(r.bytes for r in self.removed)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.removed if r.kind == kind)

    def freed_by(self, kind: str) -> int:
        return sum(r.bytes for r in self.removed if r.kind == kind)


def collect(
    cache: Cache,
    *,
    max_size: int | None = None,
    older_than_days: float | None = None,
    keep: Iterable[str] = frozenset(),
) -> GcResult:
    """Collect the cache, in this order: stale temporary files, quarantined files, strays
    (older than the commit grace), lock files nobody holds, memo entries not written for
    `older_than_days`, then the objects not used for `older_than_days`, then objects least
    recently used first until the cache's own files take at most `max_size` bytes.

    An object in `keep` is never removed; nor one whose lock another process or thread
    holds (it is being computed or placed: listed in `skipped`), nor one used since it
    was listed."""
    if max_size is not None and max_size < 0:
        raise MergerError(f"a size cannot be negative ({max_size})", fix=f"give {SIZE_FORMS}")
    if older_than_days is not None and not older_than_days >= 0:
        raise MergerError(f"an age cannot be negative ({older_than_days} days)", fix="give a number of days, 0 or more")
    kept = set(keep)
    result = GcResult(bytes_before=usage(cache).bytes)
    _collect_tmp(cache, result)
    for path in _files(cache.root / "quarantine"):
        if merger_named("quarantine", path):
            size = _unlink(path)
            if size is not None:
                result.removed.append(Removed("quarantine", path, size))
    _collect_strays(cache, kept, result)
    _collect_locks(cache, kept, result)
    now = time.time()
    if older_than_days is not None:
        cutoff = now - older_than_days * DAY_SECONDS
        for path in _all_files(cache.root / "memo"):
            st = _stat(path)
            if merger_named("memo", path) and st is not None and st.st_mtime < cutoff:
                size = _unlink(path)
                if size is not None:
                    result.removed.append(Removed("memo", path, size))
    listed = sorted(entries(cache), key=lambda e: (e.last_used, e.key))
    remaining: list[CacheEntry] = []
    for entry in listed:
        if older_than_days is not None and entry.last_used < now - older_than_days * DAY_SECONDS:
            if not _remove_entry(cache, entry, kept, result):
                remaining.append(entry)
        else:
            remaining.append(entry)
    if max_size is not None:
        total = usage(cache).bytes
        for entry in remaining:
            if total <= max_size:
                break
            before = result.freed
            if _remove_entry(cache, entry, kept, result):
                total -= result.freed - before
    result.bytes_after = usage(cache).bytes
    return result


def _collect_tmp(cache: Cache, result: GcResult) -> None:
    """Temporary files of crashed writers: under tmp/, and records and memo entries being written."""
    for part in ("tmp", "objects", "memo"):
        for path in _all_files(cache.root / part):
            if TMP_MARK in path.name and is_stale_tmp(path):
                size = _unlink(path)
                if size is not None:
                    result.removed.append(Removed("tmp", path, size))


def _collect_strays(cache: Cache, kept: set[str], result: GcResult) -> None:
    grace = cache_module.COMMIT_GRACE_SECONDS
    for stray in strays(cache):
        if stray.age <= grace or (stray.key is not None and stray.key in kept):
            continue
        if stray.key is None or not merger_named("objects", stray.path):
            continue  # not a name merger writes: not merger's to remove (listed by `strays`)
        with cache.try_lock(stray.key) as lock:
            if lock is None:
                result.skipped.append(stray.key)
                continue
            is_record = stray.path.name.endswith(RECORD_SUFFIX)
            # under the lock, check again: a commit may have completed meanwhile
            if is_record and stray.path.with_name(stray.path.name[: -len(RECORD_SUFFIX)]).exists():
                continue
            if not is_record and read_record(stray.path) is not None:
                continue
            paths = [stray.path] if is_record else [stray.path, record_path(stray.path)]
            size = sum(s for s in map(_unlink, paths) if s is not None)
            with suppress(OSError):
                lock.unlink()
            result.removed.append(Removed("stray", stray.path, size, stray.key))


def _collect_locks(cache: Cache, kept: set[str], result: GcResult) -> None:
    for path in _files(cache.root / "locks"):
        if not merger_named("locks", path):
            continue
        name = path.name[: -len(LOCK_SUFFIX)]
        if name in kept:
            continue
        with cache.try_lock(name) as lock:
            if lock is not None:
                size = _unlink(lock)
                if size is not None:
                    result.removed.append(Removed("lock", lock, size, name))


def _remove_entry(cache: Cache, entry: CacheEntry, kept: set[str], result: GcResult) -> bool:
    """Remove an object and its record under its lock; False when it stays (kept, in use)."""
    if entry.key in kept:
        return False
    with cache.try_lock(entry.key) as lock:
        if lock is None:
            result.skipped.append(entry.key)
            return False
        st = _stat(record_path(entry.path))
        if st is None or st.st_mtime != entry.last_used:
            return False  # used (or replaced) since it was listed
        object_st = _stat(entry.path)
        linked = object_st is not None and object_st.st_nlink > 1
        size = sum(s for s in map(_unlink, (entry.path, record_path(entry.path))) if s is not None)
        with suppress(OSError):
            lock.unlink()
    if linked and object_st is not None:
        result.linked_bytes += object_st.st_size
    result.removed.append(Removed("object", entry.path, size, entry.key))
    return True
