"""The project's error type: what went wrong, where, and how to fix it.

Every user-facing failure (a malformed recipe, a missing file, mismatched
shapes, an unsafe pickle) is a `MergerError`. The CLI prints `render()` as one
short block and exits with status 2; no traceback.
"""

from __future__ import annotations

import difflib
import errno
import re
from collections.abc import Iterable
from dataclasses import dataclass

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Location:
    """Where an error is: the recipe file, the dotted place in it (`sources.a`, `nodes.blend.alpha`,
    `outputs.x.path`), the model file, and anything else (`cache_dir`, `the command line`)."""

    recipe: str | None = None
    place: str | None = None
    model: str | None = None
    other: str | None = None

    def at(self, place: str) -> Location:
        """A place inside this one: `nodes.blend` at `alpha` is `nodes.blend.alpha`."""
        joined = f"{self.place}.{place}" if self.place and place and not place.startswith("[") else place
        joined = f"{self.place}{place}" if self.place and place.startswith("[") else joined
        return Location(self.recipe, joined or self.place, self.model, self.other)

    def within(self, outer: Location) -> Location:
        """This location, with what `outer` knows and this one does not (the recipe, the source)."""
        return Location(
            self.recipe or outer.recipe,
            self.place if outer.place is None or self.place == outer.place else _join(outer.place, self.place),
            self.model or outer.model,
            ", ".join(p for p in (outer.other, self.other) if p) or None,
        )

    def __str__(self) -> str:
        return ", ".join(p for p in (self.recipe, self.place, self.model, self.other) if p)


def _join(outer: str, inner: str | None) -> str:
    return f"{outer}, {inner}" if inner else outer


#: a location, or (where nothing finer is known) its text
Where = Location | str


def at(where: Where, place: str) -> Where:
    """A place inside `where` (a Location's dotted place, or text joined with a dot)."""
    return where.at(place) if isinstance(where, Location) else f"{where}.{place}"


class MergerError(Exception):
    """A user error: `what` happened, `where` (a Location: recipe file, place, model file), `fix` to try."""

    def __init__(self, what: str, *, where: Location | str | None = None, fix: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.location = where if isinstance(where, Location) else Location(other=where) if where else None
        self.fix = fix

    @property
    def where(self) -> str | None:
        """The location as the block prints it."""
        return str(self.location) if self.location is not None else None

    def located(self, outer: Location | str) -> MergerError:
        """The same error, located within an outer location (e.g. the recipe and `sources.<name>`)."""
        outside = outer if isinstance(outer, Location) else Location(other=outer)
        inner = self.location.within(outside) if self.location is not None else outside
        return MergerError(self.what, where=inner, fix=self.fix)

    def render(self) -> str:
        """The block; control characters other than the line breaks merger itself puts in are escaped."""
        what, where, fix = (_escape_but_lines(part) if part else part for part in (self.what, self.where, self.fix))
        lines = [f"merger: error: {what}"]
        if where:
            lines.append(f"  where: {shown(where)}")
        if fix:
            fix_lines = fix.splitlines() or [""]
            lines.append(f"  fix:   {fix_lines[0]}")
            lines.extend(f"         {line}" for line in fix_lines[1:])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def shown(text: object) -> str:
    """Text that came from a file (a key, a name, a path), safe to print: control
    characters, line breaks and bidirectional overrides are escaped, so a crafted key
    cannot redraw the terminal or forge lines of an error block."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def has_control(text: str) -> bool:
    """Whether text holds a character `shown` would escape (control, line break, bidirectional override)."""
    return bool(_CONTROL.search(text))


def _escape_but_lines(text: str) -> str:
    return "\n".join(shown(line) for line in text.split("\n"))


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelt `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestion(name: str, candidates: Iterable[str], *, kind: str) -> str:
    """A fix line: 'did you mean X?' when one is close, and the known names."""
    names = sorted(set(candidates))
    close = did_you_mean(name, names)
    known = ", ".join(names) if names else "(none)"
    if close:
        return f"did you mean '{close}'? Known {kind}: {known}"
    return f"use one of the known {kind}: {known}"


OS_FIXES: dict[int, str] = {
    errno.ENOSPC: "free space on that disk, or point cache_dir or the output at another disk",
    errno.EDQUOT: "free space within your quota, or write elsewhere",
    errno.EFBIG: "the file would be larger than the filesystem or your file-size limit (ulimit -f) allows",
    errno.EROFS: "that filesystem is read-only: choose a writable directory",
    errno.EACCES: "you lack permission there: choose a directory you can write to, or fix its permissions",
    errno.EPERM: "you lack permission there: choose a directory you can write to, or fix its permissions",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n 4096) or merge fewer models at once",
    errno.ENFILE: "the system has too many files open: close other programs or merge fewer models at once",
    errno.ENOENT: "a file or directory vanished while merger used it: check the path and run again",
    errno.EIO: "the disk reported an I/O error: check the disk, or copy the files elsewhere",
    errno.ENAMETOOLONG: "the path is too long: use a shorter one",
}


def os_error_block(error: OSError) -> MergerError:
    name = error.filename if error.filename is not None else ""
    place = f" ({shown(name)})" if name else ""
    return MergerError(
        f"{error.strerror or error}{place}",
        where=shown(name) if name else None,
        fix=OS_FIXES.get(error.errno or 0, "check the file and the disk, then run again"),
    )
