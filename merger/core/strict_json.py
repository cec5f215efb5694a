"""Strict, bounded JSON for files that come from untrusted places.

Python's `json` is lenient where a reader of someone else's file should not
be: it reads `NaN` and `Infinity`, keeps the last of two equal keys, decodes
UTF-16 and UTF-32 as well as UTF-8 (and a leading byte-order mark), turns
`1e999` into an infinity, lets lone UTF-16 surrogates (`"\\ud800"`) into
strings that cannot be written back out, and recurses once per nesting level
until it raises `RecursionError` at about a thousand. `loads_strict` is how
merger reads JSON from files it did not write (safetensors headers, shard
indexes): it refuses all of that with a `JSONError` (a `ValueError`) whose text says what
is wrong, and which callers turn into a `MergerError`.

Nesting is measured before parsing (`measure`), with bytes methods and numpy
on the raw bytes, never per input character in Python: strings are cut out (their
escapes first), what remains of brackets is summed. The parser therefore never
goes deeper than `max_depth`. Measured on a 69 MB safetensors header (600,000
tensors, one slow core): `measure` 0.3 s, `loads_strict` 2.1 s, as long as a
bare `json.loads` (the garbage collector is paused while the objects are built,
which pays for the duplicate-key hook), and `read_header` 3.5 s in all.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from merger.core.limits import MAX_JSON_DEPTH
from merger.errors import shown

_BOM = b"\xef\xbb\xbf"
#: every byte but the quote and the brackets, deleted before the nesting is summed
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')
#: a \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or one of those not after the other
_LONE_SURROGATE = re.compile(
    rb"\\u[dD](?:[89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD])[c-fC-F][0-9a-fA-F]{2})"
)
_MINUS_ZERO = re.compile(rb"-0(?![.0-9eE])")
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
#: bracket strings up to this long are summed in Python (~5 ms), longer ones with numpy
_PYTHON_BRACKETS = 1 << 16
_CHUNK = 1 << 22  # brackets numpy sums at a time: bounds its scratch memory to ~50 MB
_I64_MIN = -(2**63)
_U64_MAX = 2**64 - 1
_SHOWN_CHARS = 120


class JSONError(ValueError):
    """Bytes that are not acceptable JSON. `str()` is `"<what> <reason>"`,
    e.g. "header repeats the key 'a' in one object"."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} {reason}")
        self.what = what
        self.reason = reason


class _Reject(Exception):
    """Raised inside the parser's hooks; becomes a JSONError."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def short(text: object) -> str:
    """`shown(text)`, cut to a readable length: keys from files may be megabytes long."""
    safe = shown(text)
    return safe if len(safe) <= _SHOWN_CHARS else safe[:_SHOWN_CHARS] + "…"


def kind(value: object) -> str:
    """What a JSON value is, for messages: 'a list', 'the number 2.5', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {short(repr(value))}"
    if isinstance(value, str):
        return f"the string '{short(value)}'"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    return "an object"


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused: building millions of small containers (a
    large header) otherwise sets off collections that rescan them all, doubling the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class JsonShape:
    """How containers nest in a JSON text, measured without parsing it.

    `depth` is the deepest nesting (0 for a bare scalar; `[[1]]` is 2).
    `arrays[d - 1]` and `objects[d - 1]` count the arrays and objects opened at
    depth d, for d up to the `max_depth + 1` given to `measure` (deeper ones
    are counted at that last depth). Exact for valid JSON; for invalid JSON an
    upper bound of the depth a parser reaches before it finds the error.
    """

    depth: int
    arrays: tuple[int, ...]
    objects: tuple[int, ...]

    def arrays_at(self, depth: int) -> int:
        return self.arrays[depth - 1] if 0 < depth <= len(self.arrays) else 0

    def objects_at(self, depth: int) -> int:
        return self.objects[depth - 1] if 0 < depth <= len(self.objects) else 0


def measure(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> JsonShape:
    """The nesting of the JSON text `data`, in time linear in its size (bytes methods, numpy)."""
    # Inside strings a quote only appears escaped; drop escaped backslashes, then
    # escaped quotes, so every quote left opens or closes a string.
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = text.translate(None, _NOT_STRUCTURE)
    # Adjacent quotes are an empty string or the end of one and the start of the
    # next with no bracket between: dropping them keeps every bracket outside.
    text = text.replace(b'""', b"")
    if b'"' in text:
        # An unmatched last quote is left in place and dropped: the brackets after it
        # then count as outside a string, which can only overestimate the depth.
        text = _STRING.sub(b"", text).replace(b'"', b"")
    cap = max_depth + 1
    count = _sum_python if len(text) <= _PYTHON_BRACKETS else _sum_numpy
    deepest, arrays, objects = count(text, cap)
    used = min(deepest, cap)
    return JsonShape(deepest, tuple(arrays[1 : used + 1]), tuple(objects[1 : used + 1]))


def _sum_python(brackets: bytes, cap: int) -> tuple[int, list[int], list[int]]:
    """(deepest level, arrays and objects opened per level up to `cap`) of a bracket string."""
    arrays = [0] * (cap + 1)
    objects = [0] * (cap + 1)
    level = deepest = 0
    for code in brackets:
        if code == 0x5B or code == 0x7B:  # [ {
            level += 1
            deepest = max(deepest, level)
            (arrays if code == 0x5B else objects)[min(max(level, 0), cap)] += 1
        else:
            level -= 1
    return deepest, arrays, objects


def _sum_numpy(brackets: bytes, cap: int) -> tuple[int, list[int], list[int]]:
    """`_sum_python` for long bracket strings, a chunk at a time."""
    import numpy as np  # imported here: cache hits read small headers and never load numpy

    arrays = np.zeros(cap + 1, dtype=np.int64)
    objects = np.zeros(cap + 1, dtype=np.int64)
    deepest = carry = 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    for start in range(0, len(codes), _CHUNK):
        chunk = codes[start : start + _CHUNK]
        is_array = chunk == 0x5B
        is_object = chunk == 0x7B
        opens = is_array | is_object
        level = np.cumsum(opens.astype(np.int32) * 2 - 1, dtype=np.int32) + carry  # the level after each bracket
        carry = int(level[-1])
        deepest = max(deepest, int(level.max()))
        # a bracket that closes more than was opened (invalid JSON) opens at level 0 or below: not counted
        arrays += np.bincount(np.clip(level[is_array], 0, cap), minlength=cap + 1)
        objects += np.bincount(np.clip(level[is_object], 0, cap), minlength=cap + 1)
    return deepest, [int(n) for n in arrays], [int(n) for n in objects]


def loads_strict(
    data: bytes,
    *,
    what: str,
    max_depth: int = MAX_JSON_DEPTH,
    serde_numbers: bool = False,
    shape: JsonShape | None = None,
) -> object:
    """Parse `data` as strict JSON, or raise a JSONError naming `what` (e.g. "header").

    Refused: bytes that are not UTF-8 (or start with a byte-order mark), text
    that is not JSON, `NaN`/`Infinity`/`-Infinity`, floats beyond a double's
    range (`1e999`), integers longer than Python converts (4300 digits), lone
    UTF-16 surrogate escapes, two equal keys in one object, and nesting deeper
    than `max_depth` (checked before parsing; pass `shape` when the caller has
    measured `data` already). Objects become dicts, arrays lists.

    `serde_numbers` reads numbers as serde_json (the safetensors library's JSON
    reader) types them: an integer token is an int only if it fits in i64 or
    u64 and is not `-0`; other integer tokens become floats, refused like
    `1e999` beyond a double's range. A caller that wants a non-negative integer
    then refuses `-0` and `2**64` as safetensors does.
    """
    if data.startswith(_BOM):
        raise JSONError(what, "is not JSON: it starts with a UTF-8 byte-order mark")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONError(what, f"is not JSON: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if shape is None:
        shape = measure(data, max_depth=max_depth)
    if shape.depth > max_depth:
        raise JSONError(what, f"nests {shape.depth} levels deep, more than the {max_depth} allowed (MAX_JSON_DEPTH)")
    if b"\\u" in data:
        escaped = data.replace(b"\\\\", b"__")  # same length: offsets stay right
        if lone := _LONE_SURROGATE.search(escaped):
            surrogate = lone.group().decode()
            raise JSONError(
                what, f"is not JSON: lone UTF-16 surrogate {surrogate} (no character) at offset {lone.start()}"
            )
    decoder = json.JSONDecoder(
        object_pairs_hook=_object,
        parse_constant=_constant,
        parse_float=_float,
        parse_int=_serde_int if serde_numbers and _has_serde_floats(data) else None,
    )
    try:
        with paused_gc():
            return decoder.decode(text)
    except _Reject as e:
        raise JSONError(what, e.reason) from None
    except json.JSONDecodeError as e:
        problem = e.msg.removesuffix(" at")  # "Invalid control character at"
        raise JSONError(what, f"is not JSON: {problem} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # not reached after the depth check; kept as a backstop
        raise JSONError(what, f"nests more than the {max_depth} levels allowed (MAX_JSON_DEPTH)") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise JSONError(what, "has an integer too long to read (thousands of digits)") from None


def _has_serde_floats(data: bytes) -> bool:
    """Whether `data` may hold an integer token that serde_json reads as a float (`-0`, or 19
    digits and more): only then is every integer parsed by a Python hook (~0.4 µs each)."""
    return _MINUS_ZERO.search(data) is not None or b"0" * 19 in data.translate(_DIGITS_TO_ZERO)


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Reject(f"repeats the key '{short(key)}' in one object")
            seen.add(key)
    return result


def _constant(name: str) -> object:
    raise _Reject(f"is not JSON: {name} is not a JSON number")


def _float(token: str) -> float:
    value = float(token)
    if math.isinf(value):
        raise _Reject(f"has a number out of range: {short(token)}")
    return value


def _serde_int(token: str) -> int | float:
    if len(token) < 19:
        return -0.0 if token == "-0" else int(token)
    if len(token) <= 21:
        value = int(token)
        if _I64_MIN <= value <= _U64_MAX:
            return value
    return _float(token)
