"""What is in the cache: its entries (with what made them and when they were last used), the files
that are no valid entry, the bytes per part; cache sizes as people write them (`50GB`)."""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.cache.atomic import TMP_MARK
from merger.cache.record import RECORD_SUFFIX, EntryRecord, read_record, record_path
from merger.cache.store import Cache, cache_error
from merger.core.sizes import parse_size
from merger.errors import MergerError

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
    "memo": re.compile(r"[0-9a-f]{64}(?:\.layout|\.detection)?\.json"),
    "locks": re.compile(rf"(?:provisional-)?{_KEY_NAME}\.lock"),
    "quarantine": re.compile(rf"{_KEY_NAME}\.(?:safetensors|pth)(?:\.json)?\.\d+"),
}


def merger_named(part: str, path: Path) -> bool:
    """Whether `path` bears a name merger gives files in `part` of its cache (temporary files aside)."""
    pattern = _MERGER_NAMES.get(part)
    return pattern is not None and bool(pattern.fullmatch(path.name))


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
