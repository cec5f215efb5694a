"""Looking after the cache: list, measure, collect, verify and remove its entries.

The functions behind `merger-cache` and the collection a run does at its end
(`cache_max_size`). They take a `Cache` and neither parse arguments nor print.

Sizes are the files' apparent sizes (`st_size`). Removing an object that an
output still links (outputs are hard links of entries) shrinks the cache but
frees no disk space until that output goes; `GcResult.linked_bytes` says how
much that is.

Collection is safe next to running merges: an object is removed only while
merger's lock of its key is taken (without waiting: an entry whose lock
another process or thread holds is skipped), never when its key is in `keep`
(the entries the current run used), and not when it was used since it was
listed. A lock file is removed only after a non-blocking lock of it succeeded,
so a held lock is never removed. Directories are never removed (a commit may
be about to write into one).
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import merger.cache.store as cache_module
from merger.cache.atomic import TMP_MARK, is_stale_tmp
from merger.cache.record import RECORD_SUFFIX, EntryRecord, Pin, read_record, record_path, repinned
from merger.cache.store import LOCK_SUFFIX, Cache, cache_error
from merger.errors import MergerError, shown
from merger.io.safetensors_file import file_sha256

#: the parts of a cache directory, in the order `usage` lists them
PARTS = ("objects", "memo", "locks", "tmp", "quarantine")
OBJECT_SUFFIXES = (".safetensors", ".pth")
MIN_PREFIX = 8
DAY_SECONDS = 24 * 3600.0
_HEX = re.compile(r"[0-9a-f]+")
#: the only file names merger writes in each part; gc removes nothing else (a cache_dir pointed at
#: another directory, say a git repository, must lose nothing)
_KEY_NAME = r"[0-9a-f]{64}(?:-variant)?"
_MERGER_NAMES = {
    "objects": re.compile(rf"{_KEY_NAME}\.(?:safetensors|pth)(?:\.json)?"),
    "memo": re.compile(r"[0-9a-f]{64}(?:\.layout)?\.json"),
    "locks": re.compile(rf"(?:provisional-)?{_KEY_NAME}\.lock"),
    "quarantine": re.compile(rf"{_KEY_NAME}\.(?:safetensors|pth)(?:\.json)?\.\d+"),
}


def merger_named(part: str, path: Path) -> bool:
    """Whether `path` bears a name merger gives files in `part` of its cache (temporary files aside)."""
    pattern = _MERGER_NAMES.get(part)
    return pattern is not None and bool(pattern.fullmatch(path.name))


# --- sizes ------------------------------------------------------------------------------------------

SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
SIZE_FORMS = (
    "a number of bytes (5000000000), or one with a unit: 5GB, 1.5 GB, 500MB, 20GiB"
    " (KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024)"
)
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from `5000`, `5GB` (5 * 10**9), `5GiB` (5 * 2**30), `1.5 gb`...: the units of
    `transformers`' max_shard_size, case-insensitive; a bad value is a MergerError."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise MergerError(f"'{shown(text)}' is not a size", fix=f"give {SIZE_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise MergerError(f"a size cannot be negative ({text})", fix=f"give {SIZE_FORMS}")
        return text
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in SIZE_UNITS):
        raise MergerError(f"'{shown(text)}' is not a size", fix=f"give {SIZE_FORMS}")
    value = Fraction(match.group(1)) * SIZE_UNITS[unit or "b"]
    if not unit and value.denominator != 1:
        raise MergerError(f"'{shown(text)}' is not a whole number of bytes", fix=f"give {SIZE_FORMS}")
    return int(value)


def max_size_setting(value: int | str | None) -> int | None:
    """The `cache_max_size` run setting in bytes (None: no collection at the end of a run)."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except MergerError as e:
        raise e.located("cache_max_size") from None


# --- listing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """A committed object with a valid record."""

    key: str
    suffix: str  # .safetensors or .pth
    path: Path
    bytes: int  # on disk: the object and its record
    object_bytes: int
    last_used: float  # the record's mtime (touched on every hit)
    created: float | None  # when the object was written (its mtime), if known
    links: int  # the object's hard links: more than one while an output links it
    record: EntryRecord
    made: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        """`node` or `artifact` (an output's cast or format of a node)."""
        return _text(self.made.get("kind"))

    @property
    def node(self) -> str | None:
        return _text(self.made.get("node"))

    @property
    def op(self) -> str | None:
        return _text(self.made.get("op"))

    @property
    def recipe(self) -> str | None:
        return _text(self.made.get("recipe"))

    @property
    def of(self) -> str | None:
        """For an artifact: the key of the node entry it was made from."""
        return _text(self.made.get("of"))


@dataclass(frozen=True)
class Stray:
    """A file under objects/ that is no valid entry: an object without a valid record, a
    record without its object, or a file merger does not write there."""

    key: str | None  # the key its name says, when it says one
    path: Path
    bytes: int
    age: float  # seconds since it last changed (its mtime or ctime, the later)
    why: str


STRAY_OBJECT = "an object without a valid record"


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _object_key(name: str) -> tuple[str, str] | None:
    """(key, suffix) of an object file's name, or None when it is not one."""
    for suffix in OBJECT_SUFFIXES:
        if name.endswith(suffix):
            key = name[: -len(suffix)]
            return (key, suffix) if re.fullmatch(_KEY_NAME, key) else None
    return None


def _scan_objects(cache: Cache) -> tuple[list[CacheEntry], list[Stray]]:
    found: list[CacheEntry] = []
    strays: list[Stray] = []
    now = time.time()
    for folder in _subdirs(cache.root / "objects"):
        for path in _files(folder):
            if TMP_MARK in path.name:
                continue  # a record being written, or a crashed writer's: see _collect_tmp
            st = _stat(path)
            if st is None:
                continue
            age = now - max(st.st_mtime, st.st_ctime)
            if path.name.endswith(RECORD_SUFFIX):
                object_path = path.with_name(path.name[: -len(RECORD_SUFFIX)])
                parsed = _object_key(object_path.name)
                if parsed is None or not object_path.exists():
                    key = parsed[0] if parsed else None
                    strays.append(Stray(key, path, st.st_size, age, "a record without its object"))
                continue
            parsed = _object_key(path.name)
            if parsed is None or folder.name != parsed[0][:2]:
                key = parsed[0] if parsed else None
                strays.append(Stray(key, path, st.st_size, age, "not a file merger writes here"))
                continue
            key, suffix = parsed
            record = read_record(path)
            record_st = _stat(record_path(path))
            if record is None or record_st is None:
                size = st.st_size + (record_st.st_size if record_st else 0)
                strays.append(Stray(key, path, size, age, STRAY_OBJECT))
                continue
            found.append(
                CacheEntry(
                    key,
                    suffix,
                    path,
                    st.st_size + record_st.st_size,
                    st.st_size,
                    record_st.st_mtime,
                    st.st_mtime,
                    st.st_nlink,
                    record,
                    dict(record.made),
                )
            )
    return found, strays


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise cache_error(e, "read the cache") from None


def _subdirs(folder: Path) -> list[Path]:
    """The fan-out folders (`ab/`) of a part: real directories with two hex digits as their name."""
    if folder.is_symlink():
        return []
    try:
        return sorted(
            p
            for p in folder.iterdir()
            if len(p.name) == 2 and _HEX.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
        )
    except FileNotFoundError:
        return []
    except OSError as e:
        raise cache_error(e, "read the cache") from None


def _files(folder: Path) -> list[Path]:
    if folder.is_symlink():
        return []
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise cache_error(e, "read the cache") from None


def _all_files(folder: Path) -> Iterator[Path]:
    """Every file under `folder` (symbolic links included as files, never followed; a part that is
    itself a link is not entered: merger never follows links inside its cache)."""
    if folder.is_symlink():
        return
    try:
        walker = list(os.walk(folder, onerror=_raise))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        raise cache_error(e, "read the cache") from None
    for top, _, names in walker:
        for name in sorted(names):
            yield Path(top) / name


def _raise(error: OSError) -> None:
    if error.errno != errno.ENOENT:
        raise error


def entries(cache: Cache) -> list[CacheEntry]:
    """Every object with a valid record (no check of its content: that is `verify`)."""
    return _scan_objects(cache)[0]


def strays(cache: Cache) -> list[Stray]:
    """Files under objects/ that are no valid entry; `collect` removes them once they are older
    than the commit grace (a younger one may be another run's commit in progress)."""
    return _scan_objects(cache)[1]


# --- usage ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartUsage:
    bytes: int = 0
    files: int = 0


@dataclass(frozen=True)
class Usage:
    parts: dict[str, PartUsage]  # objects (with their records), memo, locks, tmp, quarantine
    bytes: int  # the cache's own files: every part's
    files: int


def usage(cache: Cache) -> Usage:
    """Bytes and files per part of the cache (files that vanish meanwhile are not counted)."""
    parts: dict[str, PartUsage] = {}
    for part in PARTS:
        size = count = 0
        for path in _all_files(cache.root / part):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise cache_error(e, "read the cache") from None
            size += st.st_size
            count += 1
        parts[part] = PartUsage(size, count)
    return Usage(parts, sum(p.bytes for p in parts.values()), sum(p.files for p in parts.values()))


# --- locks ------------------------------------------------------------------------------------------


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


def _unlink(path: Path) -> int | None:
    """Remove a file; its size, or None when it was gone already."""
    try:
        size = path.lstat().st_size
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise cache_error(e, "remove a cache file") from None
    return size


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
