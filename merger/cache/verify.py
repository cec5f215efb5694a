"""Checking the cache in full (`merger-cache verify`) and removing entries by key (`merger-cache rm`)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

#: the parts of a cache directory, in the order `usage` lists them
from merger.cache.listing import (
    _HEX,
    MIN_PREFIX,
    STRAY_OBJECT,
    CacheEntry,
    _scan_objects,
    _unlink,
)
from merger.cache.record import Pin, record_path, repinned
from merger.cache.store import Cache, cache_error
from merger.errors import MergerError, shown
from merger.io.safetensors_file import file_sha256

# --- verification -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    bytes: int
    seconds: float
    bad: list[str]  # keys whose object no longer matches its record: moved to quarantine
    strays: int  # objects without a valid record (not checked: gc collects them)

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def _check(cache: Cache, entry: CacheEntry) -> tuple[bool, int] | None:
    """(whether the object matches its record, bytes hashed); None when it vanished or was
    replaced meanwhile. A mismatch is moved to quarantine at once."""
    try:
        before = entry.path.stat()
        good = (
            before.st_ino == entry.record.pin.inode  # the file merger wrote, not a copy (see Cache.lookup)
            and before.st_size == entry.record.bytes
            and file_sha256(entry.path) == entry.record.sha256
        )
        after = entry.path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise cache_error(e, "read the cache") from None
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
        return None  # collected and committed again while it was hashed: not the file we hashed
    if not good:
        cache.quarantine(entry.path, "it is not what its record says merger wrote")
    elif Pin.of(after) == Pin.of(before) and Pin.of(after) != entry.record.pin:
        _repin(entry)  # hashed in full after a link moved its ctime: the next lookup need not hash it
    return good, before.st_size


def _repin(entry: CacheEntry) -> None:
    """Re-pin the record after a full check, keeping its mtime (the entry's last use)."""
    record = record_path(entry.path)
    try:
        st = record.stat()
        repinned(entry.path, entry.record)
        os.utime(record, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError:
        pass


def verify(cache: Cache, *, workers: int | None = None) -> VerifyResult:
    """Re-hash every object against its record's sha256, `workers` files at a time (default:
    one per CPU; hashlib releases the GIL); a mismatch is moved to quarantine, so that it is
    never served again."""
    listed, stray_files = _scan_objects(cache)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        outcomes = list(pool.map(lambda entry: _check(cache, entry), listed))
    seconds = time.perf_counter() - start
    done = [(entry, outcome) for entry, outcome in zip(listed, outcomes, strict=True) if outcome is not None]
    return VerifyResult(
        checked=len(done),
        bytes=sum(size for _, (_, size) in done),
        seconds=seconds,
        bad=[entry.key for entry, (good, _) in done if not good],
        strays=sum(1 for s in stray_files if s.why == STRAY_OBJECT),
    )


# --- removal ----------------------------------------------------------------------------------------


def _files_of_keys(cache: Cache) -> dict[str, list[Path]]:
    """Each key under objects/ (of an entry or a stray) and its files there."""
    listed, stray_files = _scan_objects(cache)
    files: dict[str, list[Path]] = {}
    for e in listed:
        files.setdefault(e.key, []).extend((e.path, record_path(e.path)))
    for s in stray_files:
        if s.key is not None:
            files.setdefault(s.key, []).append(s.path)
            if s.why != "a record without its object":
                files[s.key].append(record_path(s.path))
    return files


def matching(cache: Cache, key_or_prefix: str) -> list[str]:
    """The keys (of entries and of strays) that start with `key_or_prefix`."""
    prefix = key_or_prefix.strip().lower()
    return sorted(k for k in _files_of_keys(cache) if k.startswith(prefix))


def _common(a: str, b: str) -> int:
    """How many first characters `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _key_list(keys: list[str], limit: int = 10) -> str:
    more = f"\n... {len(keys) - limit} more" if len(keys) > limit else ""
    return "\n".join(shown(k) for k in keys[:limit]) + more


def remove(cache: Cache, key_or_prefix: str) -> list[Path]:
    """Remove the object of a key (or of the one key that starts with a prefix of at least
    8 hex characters), with its record; the removed paths. Refused while the key's lock is held."""
    prefix = key_or_prefix.strip().lower()
    if len(prefix) < MIN_PREFIX or not _HEX.fullmatch(prefix):
        raise MergerError(
            f"'{shown(key_or_prefix)}' is not a cache key",
            fix=f"give a key, or at least its first {MIN_PREFIX} hex characters (merger-cache ls --all lists them)",
        )
    files = _files_of_keys(cache)
    found = sorted(k for k in files if k.startswith(prefix))
    if not found:
        closest = sorted(files, key=lambda k: (-_common(k, prefix), k))[:5]
        raise MergerError(
            f"no cache entry has a key starting with '{prefix}'",
            where=shown(cache.root),
            fix=f"the closest keys:\n{_key_list(closest)}" if closest else "the cache has no entries",
        )
    if len(found) > 1:
        raise MergerError(
            f"'{prefix}' is the start of {len(found)} keys",
            where=shown(cache.root),
            fix=f"give more of the key; candidates:\n{_key_list(found)}",
        )
    key = found[0]
    removed: list[Path] = []
    with cache.try_lock(key) as lock:
        if lock is None:
            raise MergerError(
                f"cache entry {key} is being computed or placed by another run",
                where=shown(cache.root),
                fix="wait for that run to finish, then remove it",
            )
        for item in files[key]:
            if _unlink(item) is not None:
                removed.append(item)
        with suppress(OSError):
            lock.unlink()
    return removed
