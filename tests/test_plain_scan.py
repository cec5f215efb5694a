"""The compiled pass over the usual safetensors header (merger.io._plain_scan, issue 13 part 4) says yes
only where the Python reading says the same yes: for headers as writers write them, for each case of
the one-pass reading, and for headers mutated at random (hypothesis), `read_header` gives the same
answer (specs, ranges, metadata, or the same refusal) with the compiled pass as without it, and where
the compiled pass takes a header, the regular-expression reading takes it alike.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merger.core.limits import MAX_DIMS, MAX_TENSORS
from merger.errors import MergerError
from merger.io import safetensors_header, safetensors_plain
from merger.io.safetensors_header import read_header

pytestmark = pytest.mark.skipif(safetensors_plain.PLAIN_SCAN is None, reason="merger.io._plain_scan is not built")


def _file(path: Path, header: bytes, data_size: int) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_size))
    return path


def _usual(entries: list[tuple[str, str, list[int], int, int]], metadata: dict[str, str] | None = None) -> bytes:
    """A header as writers write it: metadata first, no whitespace, the three fields in order."""
    parts = []
    if metadata is not None:
        parts.append(f'"__metadata__":{json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)}')
    parts += [
        f"{json.dumps(k, ensure_ascii=False)}:"
        f'{{"dtype":"{d}","shape":{json.dumps(s, separators=(",", ":"))},"data_offsets":[{b},{e}]}}'
        for k, d, s, b, e in entries
    ]
    text = ("{" + ",".join(parts) + "}").encode()
    return text + b" " * (-len(text) % 8)


@contextmanager
def _compiled_off() -> Iterator[None]:
    original = safetensors_header._tiled_header
    safetensors_header._tiled_header = lambda raw, max_entries: None  # type: ignore[assignment]
    try:
        yield
    finally:
        safetensors_header._tiled_header = original


def _answer(path: Path) -> Any:
    try:
        h = read_header(path)
    except MergerError as e:
        return str(e)
    return list(h.tensors.items()), list(h.offsets.items()), h.metadata, h.data_start


def _both(path: Path) -> tuple[Any, Any]:
    fast = _answer(path)
    with _compiled_off():
        slow = _answer(path)
    return fast, slow


def _taken(raw: bytes) -> bool:
    return safetensors_plain.tiled_header(raw, MAX_TENSORS) is not None


def test_the_usual_header_is_taken_and_read_as_the_regular_expressions_read_it(tmp_path: Path) -> None:
    entries = [
        ("model.embed.weight", "F16", [4, 3], 0, 24),
        ("model.layers.0.norm", "BF16", [3], 24, 30),
        ("model.layers.0.empty", "F32", [0, 5], 30, 30),
        ("model.layers.0.w", "F32", [2, 2, 1], 30, 46),
        ("z.scalar", "I64", [], 46, 54),
        ("é-ключ-🙂", "U8", [2], 54, 56),  # a key of several-byte characters
    ]
    raw = _usual(entries, {"format": "pt", "note": 'a "quoted" ü'})
    assert _taken(raw)
    fast, slow = _both(_file(tmp_path / "m.safetensors", raw, 56))
    assert fast == slow
    assert [k for k, _ in fast[0]] == [k for k, *_ in entries]
    assert fast[1][-1] == ("é-ключ-🙂", (54, 56)) and fast[2] == {"format": "pt", "note": 'a "quoted" ü'}


def test_the_ranges_share_one_int_where_they_meet(tmp_path: Path) -> None:
    raw = _usual([(f"k{i}", "F32", [1000], 4000 * i, 4000 * (i + 1)) for i in range(3)])
    h = read_header(_file(tmp_path / "m.safetensors", raw, 12000))
    assert h.offsets["k0"][1] is h.offsets["k1"][0] and h.offsets["k1"] == (4000, 8000)


NOT_TAKEN = {
    "out of data order": [("b", "F16", [2], 4, 8), ("a", "F16", [2], 0, 4)],
    "a hole": [("a", "F32", [1], 0, 4), ("b", "F32", [1], 8, 12)],
    "a wrong size": [("a", "F32", [2], 0, 4)],
    "a key twice": [("a", "F32", [1], 0, 4), ("a", "F32", [1], 4, 8)],
    "empty tensors out of key order": [("y", "F32", [0], 0, 0), ("x", "F32", [0], 0, 0)],
    "a dtype merger does not read": [("a", "C64", [1], 0, 8)],
    "too many dimensions": [("a", "F32", [1] * (MAX_DIMS + 1), 0, 4)],
    "an overflowing empty shape": [("a", "F32", [2**40, 2**40, 0], 0, 0)],
    "a size past 64 bits": [("a", "F32", [10**17, 10**17], 0, 4)],
    "a size past what the library sizes": [("a", "U8", [2**61], 0, 4)],
    "a metadata key among the tensors": [("__metadata__", "F32", [1], 0, 4)],
}


@pytest.mark.parametrize("case", sorted(NOT_TAKEN))
def test_what_the_compiled_pass_does_not_take_the_python_reading_decides_alike(tmp_path: Path, case: str) -> None:
    entries = NOT_TAKEN[case]
    raw = _usual(entries)
    assert not _taken(raw)
    fast, slow = _both(_file(tmp_path / "m.safetensors", raw, max(e for *_, e in entries)))
    assert fast == slow


FORMS = {
    "whitespace": b'{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "fields in another order": b'{"a":{"shape":[1],"dtype":"F32","data_offsets":[0,4]}}',
    "a leading zero": b'{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}',
    "an escape in a key": b'{"a\\u0041":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "a trailing comma": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},}',
    "metadata last": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{}}',
    "only metadata": b'{"__metadata__":{"format":"pt"}}',
    "empty": b"{}",
    "not UTF-8 in a key": b'{"a\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "a control character in a key": b'{"a\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "a 19-digit offset": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,1000000000000000000]}}',
    "no closing brace": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}',
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_other_forms_are_left_to_the_python_reading(tmp_path: Path, form: str) -> None:
    raw = FORMS[form]
    assert not _taken(raw)
    fast, slow = _both(_file(tmp_path / "m.safetensors", raw, 4))
    assert fast == slow


#: what a mutation puts in: the grammar's own characters, and what breaks it
ALPHABET = [*b'"\\{}[]:,0123456789AFBU_ \x00\x1f\x7f', 0xC3, 0xA9, 0xFF]
BASE = _usual(
    [("a.w", "F16", [2, 3], 0, 12), ("a.e", "F32", [0], 12, 12), ("b", "BF16", [1], 12, 14), ("c", "U8", [], 14, 15)],
    {"format": "pt"},
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(BASE)), st.sampled_from(["insert", "delete", "replace"]), st.sampled_from(ALPHABET)
        ),
        min_size=1,
        max_size=3,
    ),
    data_size=st.sampled_from([14, 15, 16]),
)
def test_a_mutated_header_reads_the_same_with_the_compiled_pass_as_without(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, str, int]], data_size: int
) -> None:
    raw = bytearray(BASE.rstrip(b" "))
    for at, how, byte in edits:
        at = min(at, len(raw))
        if how == "insert":
            raw[at:at] = bytes([byte])
        elif raw and at < len(raw):
            raw[at : at + 1] = b"" if how == "delete" else bytes([byte])
    path = _file(tmp_path_factory.mktemp("h") / "m.safetensors", bytes(raw), data_size)
    fast, slow = _both(path)
    assert fast == slow
    if _taken(bytes(raw)):  # taken: the regular expressions take it too, and read it alike
        plain = safetensors_plain.plain_header(bytes(raw))
        assert plain is not None
        tiled = safetensors_plain.tiled_rows(plain[1])
        found = safetensors_plain.tiled_header(bytes(raw), MAX_TENSORS)
        assert found is not None and tiled is not None
        assert (plain[0], *tiled) == found


def test_more_entries_than_allowed_are_left_to_the_strict_reading() -> None:
    raw = _usual([(f"k{i}", "F32", [1], 4 * i, 4 * i + 4) for i in range(5)])
    assert safetensors_plain.tiled_header(raw, 5) is not None
    assert safetensors_plain.tiled_header(raw, 4) is None


DIMS = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**40, 10**17, 2**61, 10**18 - 1]))
ENTRY = st.tuples(
    st.text(alphabet='ab.é"\\\n0_', max_size=4),
    st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "C64", "F8_E4M3", "BOOL"]),
    st.lists(DIMS, max_size=3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(entries=st.lists(ENTRY, max_size=6), shift=st.sampled_from([0, 0, 0, 1, -1]), extra=st.integers(0, 2))
def test_random_entries_read_the_same_with_the_compiled_pass_as_without(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[str, str, list[int]]], shift: int, extra: int
) -> None:
    """Entries of random keys, dtypes (some merger does not read) and shapes (some past 64 bits), laid
    out one after another by their sizes, one range moved by `shift`, `extra` bytes of data too many
    (a model of more than 4 KB is left without its data)."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "C64": 8, "F8_E4M3": 1, "BOOL": 1}
    rows, at = [], 0
    for i, (key, dtype, shape) in enumerate(entries):
        numel = 1
        for dim in shape:
            numel *= dim
        size = min(numel * sizes[dtype], 10**18 - 1 - at)
        begin, end = at, at + size
        if i == len(entries) // 2:
            end = max(begin, end + shift)
        rows.append((key, dtype, shape, begin, end))
        at = end
    data = at + extra if at <= 4096 else 64  # a larger model's data is missing: both readings say so
    raw = _usual(rows)
    fast, slow = _both(_file(tmp_path_factory.mktemp("e") / "m.safetensors", raw, data))
    assert fast == slow


def test_a_size_whose_end_would_pass_64_bits_is_not_taken_whatever_spec_of_says() -> None:
    """The sum of an offset and a size is checked even where `spec_of` (not plain_spec) calls a size
    of 2**64 - 4 fine: the range would wrap and end before it begins."""
    body = b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[9],"data_offsets":[8,4]}'

    def lying(dtype: str, shape: str) -> Any:
        found = safetensors_plain.plain_spec(dtype, shape)
        return (safetensors_plain.shared_spec("U8", (9,)), 2**64 - 4, False) if dtype == "U8" else found

    assert safetensors_plain.PLAIN_SCAN is not None
    assert safetensors_plain.PLAIN_SCAN.tiled(body, 0, len(body), 10, lying) is None
