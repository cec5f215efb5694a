"""merger reads safetensors headers as the safetensors library does, and all JSON strictly.

The differential test generates safetensors files, valid and malformed, and
checks that `read_header` refuses (with a MergerError, never another exception)
exactly the files `safetensors.safe_open` refuses, and that both read the same
tensors from the others. merger is stricter in three documented ways only: a
dtype it does not merge, a key twice in one object (the library keeps the
last), nesting deeper than MAX_JSON_DEPTH (the library allows 127 levels).

Then merger.core.strict_json on its own, and the sharded-folder index: its size,
its JSON, and shard names that must stay inside the folder.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import deserialize, safe_open
from safetensors.torch import save_file

import merger.core.strict_json as strict_json
import merger.io.sources as sources
from merger.core.limits import MAX_INDEX_BYTES, MAX_JSON_DEPTH, MAX_TENSORS
from merger.core.specs import DTYPE_SIZES
from merger.core.strict_json import JSONError, loads_strict, measure
from merger.errors import MergerError
from merger.io.safetensors_header import read_header
from merger.io.sources import locate, open_source
from tests.conftest import expect_error

CASE_SECONDS = 2.0
EXAMPLES = int(os.environ.get("MERGER_FUZZ_EXAMPLES", "800"))  # more offline: MERGER_FUZZ_EXAMPLES=40000

# --- generating headers as JSON text ------------------------------------------------------------

#: bits per element of every dtype the library knows (safetensors/src/tensor.rs, Dtype::bitsize)
LIBRARY_BITS = {name: 8 * size for name, size in DTYPE_SIZES.items()} | {
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "C64": 64,
}
NOT_DTYPES = ["f32", "", "F32 ", "float32", "Q4"]

rare = st.sampled_from([False] * 11 + [True])


def _string(text: str, ascii_only: bool) -> str:
    return json.dumps(text, ensure_ascii=ascii_only)


json_strings = st.builds(_string, st.text(max_size=6), st.booleans())
#: JSON scalars as text, with the numbers safetensors and Python read differently
scalars = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(
        [
            "-0",
            "2.0",
            "1e2",
            "0.5",
            "true",
            "false",
            "null",
            "NaN",
            "Infinity",
            "-Infinity",
            "1e999",
            "-1e999",
            "1e-400",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "9" * 25,
            "9" * 400,
            '"F32"',
            '"\\ud800"',
            '"\\udc00x"',
            '"\\ud83d\\ude00"',
            '"a\\u0000"',
        ]
    ),
    json_strings,
)
keys = st.one_of(st.sampled_from(['"a"', '"b"', '"dtype"', '"shape"', '"x"']), json_strings)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(keys, inner), max_size=3).map(lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"),
    ),
    max_leaves=6,
)
deep = st.builds(lambda depth, opener: opener * depth + {"[": "]", '{"k":': "}"}[opener] * depth,
                 st.integers(1, 140), st.sampled_from(["[", '{"k":']))  # fmt: skip


@dataclass
class Case:
    """One generated file and what went into it."""

    header: bytes
    data: bytes
    length: int
    notes: list[str] = field(default_factory=list)

    def blob(self) -> bytes:
        return struct.pack("<Q", self.length) + self.header + self.data


@st.composite
def cases(draw: Callable[..., Any]) -> Case:
    notes: list[str] = []
    mutating = draw(st.sampled_from([True, True, False]))

    def maybe() -> bool:
        """Whether to break one more thing (never in a clean case)."""
        return mutating and bool(draw(rare))

    count = draw(st.integers(0, 5))
    names = draw(st.lists(st.sampled_from(['"a"', '"b"', '"c"', '"w.0"', '"__metadata__"']) | json_strings,
                          min_size=count, max_size=count, unique=not maybe()))  # fmt: skip
    tensors = []
    for name in names:
        dtype = draw(
            st.sampled_from(sorted(DTYPE_SIZES)) if not maybe() else st.sampled_from([*LIBRARY_BITS, *NOT_DTYPES])
        )
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for dim in shape:
            numel *= dim
        tensors.append([name, dtype, shape, -(-numel * LIBRARY_BITS.get(dtype, 32) // 8)])
    order = draw(st.permutations(range(count)))
    offset = 0
    for i in order:  # contiguous, in a random data order
        tensors[i].append([offset, offset + tensors[i][3]])
        offset += tensors[i][3]
    data_size = offset
    members = []
    for name, dtype, shape, _, span in tensors:
        if maybe():
            span[draw(st.integers(0, 1))] += draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8]))
            notes.append("offsets moved")
        if maybe():
            span[:] = draw(st.lists(st.integers(0, 40), min_size=2, max_size=2))
            notes.append("offsets random")
        fields = {
            "dtype": json.dumps(dtype),
            "shape": "[" + ",".join(draw(scalars) if maybe() else str(d) for d in shape) + "]",
            "data_offsets": "[" + ",".join(draw(scalars) if maybe() else str(o) for o in span) + "]",
        }
        for item in list(fields):
            if maybe():
                fields[item] = draw(values)
                notes.append(f"random {item}")
        form = draw(st.sampled_from(["object"] * 8 + ["list", "enum"]))
        if form == "enum":  # serde's other form of an enum: {"F32": null}
            fields["dtype"] = "{" + fields["dtype"] + ":null}"
        if form == "list":
            body = "[" + ",".join(fields.values()) + "]"
        else:
            pairs = [(json.dumps(k), v) for k, v in fields.items()]
            if maybe():
                del pairs[draw(st.integers(0, 2))]
                notes.append("field missing")
            if maybe():
                pairs.append(pairs[0])
                notes.append("field twice")
            if maybe():
                pairs.append((draw(keys), draw(values | deep)))
                notes.append("unknown field")
            elif draw(rare):  # an unknown field the library ignores
                pairs.append(('"extra"', draw(json_strings | st.integers(0, 9).map(str))))
            pairs = draw(st.permutations(pairs))
            body = "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
        if maybe():
            body = draw(values)
            notes.append("random entry")
        members.append(f"{name}:{body}")
    metadata = draw(st.sampled_from(["none", "null", "strings", "strings"] + (["values", "deep"] if mutating else [])))
    if metadata != "none":
        if metadata == "null":
            text = "null"
        elif metadata == "deep":
            text = '{"k":' + draw(deep) + "}"
        else:
            items = draw(st.lists(st.tuples(keys, json_strings if metadata == "strings" else values), max_size=3))
            text = "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
            if maybe():
                text = draw(values)
        members.insert(draw(st.integers(0, len(members))), f'"__metadata__":{text}')
    if members and maybe():
        members.append(draw(st.sampled_from(members)))
        notes.append("member twice")
    text = "{" + ",".join(members) + "}"
    if maybe():
        text = draw(values)
        notes.append("random header")
    text = draw(st.sampled_from(["", "", "", " ", "\n\t", "\r "])) + text + draw(st.sampled_from(["", "", " ", "  \n"]))
    encoding = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-8-sig"])) if maybe() else "utf-8"
    header = text.encode(encoding, "surrogatepass")
    if maybe():
        at = draw(st.integers(0, len(header)))
        header = (
            header[:at]
            + draw(st.sampled_from([b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b"\x0b"]))
            + header[at:]
        )
        notes.append("odd byte")
    if maybe():
        header = header[: draw(st.integers(0, len(header)))]
        notes.append("header cut")
    if maybe():
        data_size += draw(st.sampled_from([-3, -1, 1, 8]))
        notes.append("data size off")
    data = draw(st.binary(min_size=max(data_size, 0), max_size=max(data_size, 0)))
    length = len(header)
    if maybe():
        length += draw(st.sampled_from([-2, -1, 1, 5, 1 << 40, MAX_TENSORS * 1000]))
        notes.append("length prefix off")
    return Case(header, data, max(length, 0), notes)


# --- the oracle -----------------------------------------------------------------------------------


def _library(path: Path) -> dict[str, tuple[str, list[int], bytes]] | None:
    """What the safetensors library reads from `path` (dtype, shape, bytes per key), or None."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            order = list(f.offset_keys())
            dtypes = {key: (f.get_slice(key).get_dtype(), list(f.get_slice(key).get_shape())) for key in order}
    except Exception:
        return None
    tensors = dict(deserialize(path.read_bytes()))
    return {key: (dtypes[key][0], dtypes[key][1], bytes(tensors[key]["data"])) for key in order}


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _has_duplicate_keys(text: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal found
        found = found or len({k for k, _ in items}) != len(items)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return found


def _stricter_reasons(case: Case, library: dict[str, tuple[str, list[int], bytes]]) -> list[str]:
    """Why merger may refuse a file the library reads (words of its message); none: it must read it."""
    header = case.header[: case.length]
    reasons = []
    if any(dtype not in DTYPE_SIZES for dtype, _, _ in library.values()):
        reasons.append("unsupported dtype")
    if _has_duplicate_keys(header):
        reasons.append("repeats the key")
    if _depth(json.loads(header)) > MAX_JSON_DEPTH:
        reasons.append("levels deep")
    return reasons


STATS: dict[str, int] = {}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_read_header_refuses_what_the_library_refuses(case: Case, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.getbasetemp() / "case.safetensors"
    path.write_bytes(case.blob())
    start = time.perf_counter()
    library = _library(path)
    try:
        header = read_header(path)
        error = None
    except MergerError as e:
        header, error = None, e
    elapsed = time.perf_counter() - start
    assert elapsed < CASE_SECONDS
    outcome = ("library reads" if library is not None else "library refuses") + (
        ", merger reads" if header is not None else ", merger refuses"
    )
    event(outcome)
    STATS[outcome] = STATS.get(outcome, 0) + 1
    if library is None:
        assert header is None, f"merger read a file the library refuses ({case.notes})"
        return
    if header is None:
        assert error is not None
        reasons = _stricter_reasons(case, library)
        assert reasons, f"merger refused a file the library reads: {error.what}"
        assert any(reason in error.what for reason in reasons), error.what
        return
    assert list(header.tensors) == sorted(library, key=lambda k: (*header.offsets[k], k))
    raw = path.read_bytes()
    for key, (dtype, shape, data) in library.items():
        spec = header.tensors[key]
        assert (spec.dtype, list(spec.shape)) == (dtype, shape)
        begin, end = header.offsets[key]
        assert raw[header.data_start + begin : header.data_start + end] == data
    library_metadata = safe_open(str(path), framework="numpy").metadata() or {}
    assert header.metadata == library_metadata


def test_differential_cases_cover_both_outcomes() -> None:
    """The generator makes files of every kind (run after the property test in this module)."""
    if not STATS:
        pytest.skip("the property test did not run first")
    assert STATS.get("library reads, merger reads", 0) >= EXAMPLES // 10
    assert STATS.get("library refuses, merger refuses", 0) >= EXAMPLES // 10
    assert "library refuses, merger reads" not in STATS


# --- merger.core.strict_json ------------------------------------------------------------------------------


plain_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(value=plain_json, ascii_only=st.booleans())
def test_strict_json_reads_what_json_writes(value: object, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    shape = measure(data)
    assert shape.depth == _depth(value)
    if _depth(value) <= MAX_JSON_DEPTH:
        assert loads_strict(data, what="it") == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"a": NaN}', "is not JSON: NaN is not a JSON number"),
        (b"[Infinity]", "is not JSON: Infinity is not a JSON number"),
        (b"[-Infinity]", "is not JSON: -Infinity is not a JSON number"),
        (b"[1e999]", "has a number out of range: 1e999"),
        (b"[" + b"9" * 5000 + b"]", "has an integer too long to read (thousands of digits)"),
        (b'{"a": 1, "b": {"c": 2, "c": 3}}', "repeats the key 'c' in one object"),
        (b'{"\\u001b[2J": 1, "\\u001b[2J": 2}', "repeats the key '\\x1b[2J' in one object"),
        (b"\xef\xbb\xbf{}", "is not JSON: it starts with a UTF-8 byte-order mark"),
        ('{"a": 1}'.encode("utf-16"), "is not JSON: not UTF-8 (byte 0xff at offset 0)"),
        (b'["\xe9"]', "is not JSON: not UTF-8 (byte 0xe9 at offset 2)"),
        (b'["\\ud800"]', "is not JSON: lone UTF-16 surrogate \\ud800 (no character) at offset 2"),
        (b'["\\ud800\\\\udc00"]', "is not JSON: lone UTF-16 surrogate \\ud800 (no character) at offset 2"),
        (b'["\\ud83d\\ude00\\udc00"]', "is not JSON: lone UTF-16 surrogate \\udc00 (no character) at offset 14"),
        (b"[" * 65 + b"]" * 65, "nests 65 levels deep, more than the 64 allowed (MAX_JSON_DEPTH)"),
        (b"[" * 1_000_000, "nests 1000000 levels deep, more than the 64 allowed (MAX_JSON_DEPTH)"),
        (b'{"a": 1,}', "is not JSON: Expecting property name enclosed in double quotes at line 1 column 9"),
        (b'["a\tb"]', "is not JSON: Invalid control character at line 1 column 4"),
        (b"[1] [2]", "is not JSON: Extra data at line 1 column 5"),
        (b"", "is not JSON: Expecting value at line 1 column 1"),
    ],
)
def test_strict_json_refusals(text: bytes, reason: str) -> None:
    with pytest.raises(JSONError) as info:
        loads_strict(text, what="it")
    assert info.value.reason == reason
    assert str(info.value) == f"it {reason}"
    assert isinstance(info.value, ValueError)


def test_strict_json_accepts() -> None:
    assert loads_strict(b' \t\r\n{"a": [1, -0, 2.5, 1e-400, "\\ud83d\\ude00", "\\\\ud800"]} \n', what="it") == {
        "a": [1, 0, 2.5, 0.0, "😀", "\\ud800"]
    }
    nested: list[object] = []
    for _ in range(MAX_JSON_DEPTH - 1):
        nested = [nested]
    assert loads_strict(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, what="it") == nested
    assert loads_strict(b'"[[[[{{{{"', what="it", max_depth=0) == "[[[[{{{{"


def test_strict_json_serde_numbers() -> None:
    # serde_json reads these integer tokens as floats: safetensors refuses them as dimensions
    assert loads_strict(b"[-0, 18446744073709551616, -9223372036854775809]", what="it", serde_numbers=True) == [
        -0.0,
        2.0**64,
        -(2.0**63),
    ]
    values = loads_strict(b"[0, 18446744073709551615, -9223372036854775808]", what="it", serde_numbers=True)
    assert values == [0, 2**64 - 1, -(2**63)]
    assert isinstance(values, list) and all(type(v) is int for v in values)
    with pytest.raises(JSONError, match="out of range"):
        loads_strict(b"[" + b"9" * 400 + b"]", what="it", serde_numbers=True)
    assert loads_strict(b"[" + b"9" * 300 + b"]", what="it", serde_numbers=True) == [float("9" * 300)]


@settings(max_examples=200, deadline=None)
@given(brackets=st.lists(st.sampled_from(b"[]{}"), max_size=300).map(bytes), cap=st.integers(1, 6))
def test_strict_json_bracket_sums_agree(brackets: bytes, cap: int) -> None:
    """The Python sum (short inputs) and the numpy one (long inputs) count alike, unbalanced input too."""
    assert strict_json._sum_python(brackets, cap) == strict_json._sum_numpy(brackets, cap)
    long = brackets * 200
    assert strict_json._sum_python(long, cap) == strict_json._sum_numpy(long, cap)


def test_strict_json_measure_ignores_brackets_in_strings() -> None:
    text = json.dumps({"k[": ["]]]", '\\"[', "{{"], "x": [[{"\\": "}"}]]}).encode()
    shape = measure(text)
    assert shape.depth == 4
    assert shape.objects == (1, 0, 0, 1)
    assert shape.arrays == (0, 2, 1, 0)


def test_strict_json_large_header_time() -> None:
    """A 3 MB header-like document parses strictly in a small multiple of json.loads's time."""
    document = {
        f"model.layers.{i}.weight": {"dtype": "F16", "shape": [4, 2], "data_offsets": [i, i + 16]}
        for i in range(30_000)
    }
    data = json.dumps(document).encode()
    start = time.perf_counter()
    json.loads(data)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    assert loads_strict(data, what="header", serde_numbers=True) == document
    strict = time.perf_counter() - start
    assert strict < 4 * plain + 0.5


# --- the sharded folder's index ------------------------------------------------------------------

WHERE = "test.yaml, sources.m"
EXPECTED = " (expected a JSON object with a weight_map)"


def _sharded(folder: Path, weight_map: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
    save_file({"b": torch.zeros(3)}, folder / "s2.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map or {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return index


def _index_error(folder: Path) -> str:
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    assert error.where == WHERE
    prefix = f"'{folder / 'model.safetensors.index.json'}' is not a valid safetensors index: "
    assert error.what.startswith(prefix)
    return error.what[len(prefix) :]


@pytest.mark.parametrize(
    ("shard", "problem"),
    [
        ("../x.safetensors", "a path that climbs out of the folder with '..'"),
        ("sub/../../x.safetensors", "a path that climbs out of the folder with '..'"),
        ("/etc/passwd", "an absolute path"),
        ("", "an empty name"),
        ("s1.safetensors\x00.txt", "a name with a NUL character"),
    ],
)
def test_index_shard_names_stay_in_the_folder(tmp_path: Path, shard: str, problem: str) -> None:
    folder = tmp_path / "m"
    _sharded(folder, {"a": "s1.safetensors", "b": shard})
    why = _index_error(folder)
    shown_name = shard.replace("\x00", "\\x00")
    assert why == f"the shard '{shown_name}' is {problem}; shards must be files inside the folder"


def test_index_shard_symlink_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"b": torch.zeros(3)}, outside / "secret.safetensors")
    folder = tmp_path / "m"
    _sharded(folder, {"a": "s1.safetensors", "b": "link.safetensors"})
    (folder / "link.safetensors").symlink_to(outside / "secret.safetensors")
    why = _index_error(folder)
    target = outside / "secret.safetensors"
    assert why == (
        f"the shard 'link.safetensors' is a path that a symlink takes outside the folder, to '{target}'; "
        "shards must be files inside the folder"
    )
    # through a symlinked folder, and through a symlink loop
    (folder / "sub").symlink_to(outside)
    _sharded(folder, {"a": "s1.safetensors", "b": "sub/secret.safetensors"})
    assert "a symlink takes outside the folder" in _index_error(folder)
    (folder / "loop").symlink_to(folder / "loop")
    _sharded(folder, {"a": "s1.safetensors", "b": "loop"})
    assert "a path that cannot be resolved" in _index_error(folder)


def test_index_symlinks_inside_the_folder_and_hub_cache(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _sharded(folder, {"a": "s1.safetensors", "b": "alias.safetensors"})
    (folder / "alias.safetensors").symlink_to("s2.safetensors")
    location = locate(folder, None, where=WHERE)
    source = open_source(location, where=WHERE)
    assert set(source.spec()) == {"a", "b"}
    source.close()
    # a Hugging Face cache: snapshots/<rev>/<file> are symlinks to ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, repo / "blobs" / "1111")
    save_file({"b": torch.zeros(3)}, repo / "blobs" / "2222")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "s1.safetensors").symlink_to("../../blobs/1111")
    (snapshot / "s2.safetensors").symlink_to("../../blobs/2222")
    (repo / "blobs" / "3333").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    (snapshot / "model.safetensors.index.json").symlink_to("../../blobs/3333")
    source = open_source(locate(snapshot, None, where=WHERE), where=WHERE)
    assert set(source.spec()) == {"a", "b"}
    source.close()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}', "it repeats the key 'a' in one object"),
        (b'{"weight_map": {}, "metadata": {"total_size": NaN}}', "it is not JSON: NaN is not a JSON number" + EXPECTED),
        (b'{"weight_map": {"a": 1}}', "its weight_map gives 'a' the number 1, not a shard file name"),
        (
            b'{"weight_map": {"a": ["s1.safetensors"]}}',
            "its weight_map gives 'a' a list of 1 item, not a shard file name",
        ),
        (b'{"weight_map": "s1.safetensors"}', "its weight_map is the string 's1.safetensors', not an object"),
        (b'{"weight": {}}', "it has no weight_map"),
        (b'"weight_map"', "it is the string 'weight_map', not a JSON object with a weight_map"),
        (
            b'{"m": ' + b"[" * 10**5 + b"]" * 10**5 + b"}",
            "it nests 100001 levels deep, more than the 64 allowed (MAX_JSON_DEPTH)",
        ),
        (b"\xff\xfe{}", "it is not JSON: not UTF-8 (byte 0xff at offset 0)" + EXPECTED),
    ],
)
def test_index_is_strict_json(tmp_path: Path, content: bytes, why: str) -> None:
    folder = tmp_path / "m"
    _sharded(folder).write_bytes(content)
    assert _index_error(folder) == why


def test_index_size_limit(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    index = _sharded(folder)
    with open(index, "r+b") as f:
        f.truncate(MAX_INDEX_BYTES + 1)  # sparse: nothing is written, nothing is read
    start = time.perf_counter()
    why = _index_error(folder)
    assert time.perf_counter() - start < 1
    assert why == f"it is {MAX_INDEX_BYTES + 1} bytes, more than the {MAX_INDEX_BYTES} allowed (MAX_INDEX_BYTES)"


def test_index_tensor_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_TENSORS", 2)
    folder = tmp_path / "m"
    _sharded(folder, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"})
    assert _index_error(folder) == "its weight_map names 3 tensors, more than the 2 allowed (MAX_TENSORS)"
    _sharded(folder, {"a": "s1.safetensors", "b": "s2.safetensors"})
    assert len(locate(folder, None, where=WHERE).files) == 3


def test_index_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    index = _sharded(folder)
    if os.geteuid() == 0:
        pytest.skip("root reads files without read permission")
    index.chmod(0)
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    assert error.what == f"cannot read '{index}': Permission denied"
