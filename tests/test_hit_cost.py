"""What keeps a full cache hit and a model of many keys cheap (issue 13, part 4), checked without timing:
a hit imports neither torch nor the modules behind xml.sax.saxutils (urllib.request, http, ssl) nor the
modules of ops its recipe does not name; equal specs are one object across files and the memo (so
comparing two models' specs is a dict comparison);
the one-pass reading of a usual header gives exactly what the entry-by-entry reading gives; the hashing
pass that digests small tensors together gives the content hash that digesting them one by one gives.
"""

from __future__ import annotations

import json
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from merger.cache.memo import MemoEntry, SourceMemo
from merger.core.specs import TensorSpec
from merger.engine.catalog import SourceHandle, tensor_sizes
from merger.engine.source_hashing import hash_sources
from merger.errors import MergerError
from merger.io import safetensors_header
from merger.io.safetensors_header import read_header
from merger.io.sources import locate
from tests.conftest import run_cli

RECIPE = (
    "# @package _global_\n"
    "sources: {a: a.safetensors, b: b.safetensors}\n"
    "nodes: {m: {op: lerp, inputs: [a, b], alpha: 0.25}}\n"
    "outputs: {m: {path: m.safetensors}}\n"
)
ARGS = ["recipe=many", "progress=false", "family=off", "sanity=off", "cache_dir=cache"]
#: never imported by a full hit (torch, numpy: the maths; xml, ssl, http, urllib.request: what
#: xml.sax.saxutils brings in; jinja2: the report's page is plain string building)
NOT_ON_A_HIT = ("torch", "numpy", "xml", "ssl", "http", "urllib.request", "jinja2", "markupsafe")
#: the op modules of ops the recipe does not name (a lerp's is merger.ops.linear)
OTHER_OPS = tuple(f"merger.ops.{m}" for m in ("task_vectors", "slerp", "model_stock", "select", "splice", "lora"))


def _write(
    path: Path, entries: list[tuple[str, str, list[int], int, int]], data: bytes, *, raw: str | None = None
) -> None:
    """A safetensors file whose header lists `entries` (key, dtype, shape, begin, end) in this order."""
    header = (
        raw
        or "{"
        + ",".join(
            f'"{k}":{{"dtype":"{d}","shape":{json.dumps(s, separators=(",", ":"))},"data_offsets":[{b},{e}]}}'
            for k, d, s, b, e in entries
        )
        + "}"
    )
    text = header.encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _many(path: Path, keys: int, value: float) -> None:
    _write(
        path,
        [(f"layers.{i // 8}.w{i % 8}", "F32", [1], 4 * i, 4 * i + 4) for i in range(keys)],
        struct.pack("<f", value) * keys,
    )


MODULES = textwrap.dedent(
    """
    import json, sys
    from merger.cli.command import merger
    sys.argv = ["merger", *sys.argv[1:]]
    try:
        merger()
    except SystemExit as e:
        status = e.code
    print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
    """
)


def _modules(launch_dir: Path) -> dict[str, Any]:
    done = run_cli(["-c", MODULES, *ARGS], launch_dir, command=Path(sys.executable).name)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, done.stderr
    return result


def test_a_full_hit_imports_no_torch_and_no_template_engine(tmp_path: Path) -> None:
    for name, value in (("a", 1.0), ("b", 3.0)):
        _many(tmp_path / f"{name}.safetensors", 40, value)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "many.yaml").write_text(RECIPE)
    _modules(tmp_path)  # the first run
    hit = _modules(tmp_path)
    reports = sorted(tmp_path.glob("outputs/*/*/merge_report.json"))
    assert [json.loads(p.read_text())["nodes"]["m"]["status"] for p in reports] == ["computed", "cached"]
    imported = [m for m in hit["modules"] if any(m == n or m.startswith(n + ".") for n in NOT_ON_A_HIT)]
    assert imported == []
    assert "merger.ops.linear" in hit["modules"]
    assert [m for m in hit["modules"] if m.startswith(OTHER_OPS)] == []  # an op's module loads when named


# --- specs: one object for equal ones ------------------------------------------------------------------------------


def test_equal_specs_are_one_object_across_headers_and_the_memo(tmp_path: Path) -> None:
    _many(tmp_path / "a.safetensors", 16, 1.0)
    _many(tmp_path / "b.safetensors", 16, 2.0)
    a, b = read_header(tmp_path / "a.safetensors"), read_header(tmp_path / "b.safetensors")
    assert len({id(s) for s in (*a.tensors.values(), *b.tensors.values())}) == 1
    memo = SourceMemo(tmp_path / "memo")
    memo.put("ab" * 32, MemoEntry("h", dict(a.tensors)))
    entry = memo.get("ab" * 32)
    assert entry is not None and entry.spec == a.tensors
    assert all(s is a.tensors["layers.0.w0"] for s in entry.spec.values())
    assert tensor_sizes(entry.spec) == dict.fromkeys(a.tensors, 4)


# --- the usual header read in one pass: as the entry-by-entry reading reads it --------------------------------------


def _both(path: Path) -> tuple[Any, Any]:
    """read_header's answer (or error text), and the entry-by-entry reading's (the one pass and the
    compiled pass turned off)."""

    def read() -> Any:
        try:
            h = read_header(path)
        except MergerError as e:
            return str(e)
        return list(h.tensors.items()), list(h.offsets.items()), h.data_start

    fast = read()
    original, compiled = safetensors_header._tiled_rows, safetensors_header._tiled_header
    safetensors_header._tiled_rows = lambda rows: None  # type: ignore[assignment]
    safetensors_header._tiled_header = lambda raw, max_entries: None  # type: ignore[assignment]
    try:
        slow = read()
    finally:
        safetensors_header._tiled_rows, safetensors_header._tiled_header = original, compiled
    return fast, slow


CASES = {
    "in order": ([("a", "F32", [2], 0, 8), ("b", "F16", [1, 2], 8, 12)], 12),
    "written out of order": ([("b", "F16", [1, 2], 8, 12), ("a", "F32", [2], 0, 8)], 12),
    "empty tensors at one offset, keys out of order": (
        [("x", "F32", [1], 0, 4), ("z", "F32", [0], 4, 4), ("y", "F32", [0, 3], 4, 4), ("w", "F32", [1], 4, 8)],
        8,
    ),
    "empty tensors in key order": ([("e", "F32", [0], 0, 0), ("f", "F32", [0], 0, 0), ("g", "F32", [1], 0, 4)], 4),
    "a hole": ([("a", "F32", [1], 0, 4), ("b", "F32", [1], 8, 12)], 12),
    "an overlap": ([("a", "F32", [2], 0, 8), ("b", "F32", [1], 4, 8)], 8),
    "a wrong size": ([("a", "F32", [2], 0, 4)], 4),
    "an unknown dtype": ([("a", "F32", [1], 0, 4), ("b", "C64", [1], 4, 12)], 12),
    "a key twice": ([("a", "F32", [1], 0, 4), ("a", "F32", [1], 4, 8)], 8),
    "data after the last tensor": ([("a", "F32", [1], 0, 4)], 8),
    "an overflowing empty shape": ([("a", "F32", [0, 2**40, 2**40], 0, 0)], 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_one_pass_reads_as_the_entry_by_entry_reading(tmp_path: Path, case: str) -> None:
    entries, size = CASES[case]
    _write(tmp_path / "m.safetensors", entries, bytes(size))
    fast, slow = _both(tmp_path / "m.safetensors")
    assert fast == slow


def test_the_one_pass_refuses_what_the_strict_reading_refuses(tmp_path: Path) -> None:
    _write(tmp_path / "m.safetensors", [], bytes(8), raw='{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}')
    with pytest.raises(MergerError, match="takes 8 bytes"):
        read_header(tmp_path / "m.safetensors")


# --- the hashing pass: small tensors digested together, the same content hash --------------------------------------


def test_digesting_small_tensors_together_gives_the_same_content_hash(tmp_path: Path) -> None:
    entries, offset = [], 0
    for i, shape in enumerate([[3], [0], [5000, 8], [2], [0, 4], [70000], [1]]):
        size = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        entries.append((f"t{i}", "F32", shape, offset, offset + size))
        offset += size
    _write(tmp_path / "m.safetensors", entries, bytes(range(256)) * (offset // 256) + bytes(offset % 256))
    location = locate(tmp_path / "m.safetensors", None, where="sources.m")

    def handle(memo: str) -> SourceHandle:
        return SourceHandle("m", location, SourceMemo(tmp_path / memo), "sources.m")

    one_by_one = handle("memo1")
    assert one_by_one.content_hash is None
    expected = one_by_one.finish_hash()  # every tensor through read_into
    together = handle("memo2")
    hash_sources({0: together}, None)
    assert together.content_hash == expected
    one_by_one.close()
    together.close()


def test_whole_tensors_read_together_are_the_bytes_read_one_by_one(tmp_path: Path) -> None:
    _write(tmp_path / "m.safetensors", [(f"k{i}", "F32", [1], 4 * i, 4 * i + 4) for i in range(6)], bytes(range(24)))
    location = locate(tmp_path / "m.safetensors", None, where="sources.m")
    handle = SourceHandle("m", location, SourceMemo(tmp_path / "memo"), "sources.m")
    handle.finish_hash()
    keys = ["k1", "k2", "k4"]
    got = handle.read_tensors(keys, [4, 4, 4], memoryview(bytearray(12)))
    assert bytes(got) == bytes(range(4, 12)) + bytes(range(16, 20))
    assert handle.spec()["k1"] == TensorSpec("F32", (1,))
    handle.close()
