"""Glob patterns for `{glob: ...}` sources, with the walk bounded.

Python's `glob` follows symbolic links and walks as far as a pattern asks: `/**/*.pth` walks the
whole filesystem, and `zoo/**` over a folder that links to itself never ends. This walk has the
same meaning (`*`, `?`, `[...]` within a name, names starting with `.` only when the pattern says so,
`**` for any number of folders) and stops with an error once it has looked at MAX_GLOB_ENTRIES
directory entries or found more than MAX_GLOB_FILES matches.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from merger.core.limits import MAX_GLOB_ENTRIES, MAX_GLOB_FILES
from merger.errors import MergerError, Where

_MAGIC = frozenset("*?[")


def _magic(part: str) -> bool:
    return any(c in _MAGIC for c in part)


def bounded_glob(pattern: Path, *, where: Where, shown_as: str) -> list[Path]:
    """The sorted paths that match the absolute `pattern`."""
    parts = pattern.parts
    first = next((i for i, p in enumerate(parts) if _magic(p)), len(parts))
    root = Path(*parts[:first]) if first else Path(pattern.anchor or ".")
    rest = parts[first:]
    if not rest:
        return [root] if root.exists() else []
    found: set[Path] = set()
    seen = 0
    pending: list[tuple[Path, int]] = [(root, 0)]
    while pending:
        folder, i = pending.pop()
        if i == len(rest):
            found.add(folder)
            if len(found) > MAX_GLOB_FILES:
                raise _too_much(f"matches more than {MAX_GLOB_FILES} files", where, shown_as)
            continue
        part = rest[i]
        if part == "**":
            pending.append((folder, i + 1))  # no folder at all
        elif not _magic(part):
            if (folder / part).exists():
                pending.append((folder / part, i + 1))
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # not a folder, or unreadable: matches nothing, as glob
        seen += len(entries)
        if seen > MAX_GLOB_ENTRIES:
            raise _too_much(f"looks at more than {MAX_GLOB_ENTRIES} files and folders", where, shown_as)
        for entry in entries:
            if entry.name.startswith(".") and not (part.startswith(".") and part != "**"):
                continue
            if part == "**":
                if _is_dir(entry):
                    pending.append((Path(entry.path), i))
            elif fnmatch.fnmatchcase(entry.name, part) and (i + 1 == len(rest) or _is_dir(entry)):
                pending.append((Path(entry.path), i + 1))
    return sorted(found)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop too deep for the system to follow
        return False


def _too_much(what: str, where: Where, pattern: str) -> MergerError:
    return MergerError(
        f"glob '{pattern}' {what}, the limit",
        where=where,
        fix="narrow the pattern (name the folder, avoid ** over large trees or folders that link to themselves)",
    )
