"""Sizes as people write them: `5000`, `5GB`, `1.5 GB`, `20GiB` (the units of `transformers`'
max_shard_size), for the cache's bounds and the shards of folder outputs."""

from __future__ import annotations

import re
from fractions import Fraction

from merger.errors import MergerError, shown

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
