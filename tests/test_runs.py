"""Runs of small tensors (merger.engine.pieces): gathered by signature, computed as one array, read
and written as one span, non-finite values still named per tensor; the results are the per-tensor
results, byte for byte."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import merger.engine.pieces as pieces_module
from merger.core.arrays import NumpyBackend, TorchBackend
from merger.core.specs import TensorSpec
from merger.engine.byte_io import RenamedSource
from merger.engine.pieces import Piece, Run, plan_pieces
from merger.engine.pipeline import Pipeline
from merger.io.safetensors_file import SafetensorsReader, SafetensorsWriter
from merger.io.safetensors_header import read_header
from merger.io.sources import read_whole_tensors
from merger.ops.base import InputSpecs
from merger.ops.linear import AddDifference, AddDifferenceParams, Lerp, LerpParams
from merger.ops.params import Rule, Rules
from tests.conftest import BytesSource, Collector, keyed

NP_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}


def model(seed: int, layout: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[BytesSource, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = {k: (rng.standard_normal(s) * 10).astype(NP_DTYPES[d]) for k, (d, s) in layout.items()}
    return BytesSource({k: a.tobytes() for k, a in arrays.items()}), arrays


#: small tensors of two float dtypes and an integer one, interleaved, and a large one in the middle
LAYOUT: dict[str, tuple[str, tuple[int, ...]]] = {
    **{f"block.{i}.w": ("F16" if i % 5 else "F32", (i % 4 + 1, 3)) for i in range(400)},
    "big": ("F16", (70_000,)),
    "steps": ("I64", (1,)),
    **{f"head.{i}.bias": ("F16", (7,)) for i in range(50)},
    "empty": ("F16", (0, 4)),
    "scalar": ("F32", ()),
}


def spec_of(layout: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(d, s) for k, (d, s) in layout.items()}


def per_tensor(op: Any, params: Any, sources: list[BytesSource], specs: Any, node: Any) -> dict[str, bytes]:
    """The output computed a tensor at a time (runs of one tensor)."""
    collector = Collector()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pieces_module, "RUN_TENSORS", 1)
        Pipeline(op, keyed(op, params, node), list(sources), specs, NumpyBackend()).run(
            collector, node, lambda k, n: None
        )
    return collector.joined()


@pytest.mark.parametrize("backend", [NumpyBackend(), TorchBackend("cpu")], ids=["numpy", "torch"])
def test_runs_give_the_per_tensor_bytes(backend: Any) -> None:
    (a, _), (b, _) = model(1, LAYOUT), model(2, LAYOUT)
    specs = (spec_of(LAYOUT), spec_of(LAYOUT))
    rules = Rules(default=0.3, rules=[Rule(match=r"block\.1\d\.", value=0.9)])  # per-key alpha
    op, params = Lerp(), LerpParams(alpha=rules)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    pieces = list(plan_pieces(op, specs, node, keyed(op, params, node).for_key))
    runs = [p for p in pieces if isinstance(p, Run)]
    assert [p.key for p in pieces if isinstance(p, Piece)] == ["big"]
    assert sum(len(r.keys) for r in runs) == len(LAYOUT) - 1
    for run in runs:  # one dtype, one mode, one alpha in each
        assert len({LAYOUT[k][0] for k in run.keys}) == 1
        assert len({bool(re.search(r"block\.1\d\.", k)) for k in run.keys}) == 1
    assert [r.mode for r in runs if "steps" in r.keys] == ["copy"]
    assert len(runs) < 200  # 455 tensors (the dtype changes every 5th block, the alpha at 10-19)
    collector = Collector()
    Pipeline(op, keyed(op, params, node), [a, b], specs, backend).run(collector, node, lambda k, n: None)
    assert collector.joined() == per_tensor(op, params, [a, b], specs, node)
    assert [k for i, (k, _) in enumerate(collector.chunks) if i == 0 or collector.chunks[i - 1][0] != k] == list(LAYOUT)


def test_a_run_of_three_inputs_reads_renamed_keys_and_equals_numpy() -> None:
    layout = {f"t.{i}": ("F32", (i % 3 + 1,)) for i in range(300)}
    (a, xa), (b, xb), (c, xc) = model(1, layout), model(2, layout), model(3, layout)
    stored = {f"stored.{k}": v for k, v in c.tensors.items()}
    renamed = RenamedSource(BytesSource(stored), {f"stored.{k}": k for k in layout})
    specs = tuple(spec_of(layout) for _ in range(3))
    op, params = AddDifference(), AddDifferenceParams(multiplier=0.5)
    node = op.spec(InputSpecs(("a", "b", "c"), specs), params)
    collector = Collector()
    Pipeline(op, keyed(op, params, node), [a, b, renamed], specs, NumpyBackend()).run(
        collector, node, lambda k, n: None
    )
    for key, got in collector.joined().items():
        want = xa[key] + (xb[key] - xc[key]) * np.float32(0.5)
        assert np.frombuffer(got, np.float32).tobytes() == want.astype(np.float32).tobytes(), key


@pytest.mark.parametrize("fused", [True, False], ids=["fused loop", "numpy maths"])
def test_nonfinite_values_in_a_run_are_named_by_tensor(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not fused:
        monkeypatch.setattr("merger.core.fused.FUSED", None)
    layout = {f"t.{i}": ("F16", (4,)) for i in range(100)}
    (a, xa), (b, _) = model(1, layout), model(2, layout)
    xa["t.37"][2] = np.inf
    xa["t.80"][:] = np.nan
    a.tensors.update({k: v.tobytes() for k, v in xa.items()})
    specs = (spec_of(layout), spec_of(layout))
    op, params = Lerp(), LerpParams(alpha=0.5)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    found: list[tuple[int | None, str, int]] = []
    Pipeline(
        op,
        keyed(op, params, node),
        [a, b],
        specs,
        NumpyBackend(),
        watched=frozenset({0, 1}),
        on_nonfinite=lambda index, key, n: found.append((index, key, n)),
    ).run(Collector(), node, lambda k, n: None)
    assert sorted(found, key=str) == sorted(
        [(0, "t.37", 1), (0, "t.80", 4), (None, "t.37", 1), (None, "t.80", 4)], key=str
    )


def test_progress_advances_per_tensor_of_a_run() -> None:
    layout = {f"t.{i}": ("F16", (i + 1,)) for i in range(20)}
    (a, _), (b, _) = model(1, layout), model(2, layout)
    specs = (spec_of(layout), spec_of(layout))
    op, params = Lerp(), LerpParams(alpha=0.5)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    advanced: list[tuple[str, int]] = []
    Pipeline(op, keyed(op, params, node), [a, b], specs, NumpyBackend()).run(
        Collector(), node, lambda k, n: advanced.append((k, n))
    )
    assert advanced == [(f"t.{i}", 2 * (i + 1)) for i in range(20)]


def safetensors_file(path: Path, tensors: dict[str, bytes], order: list[str]) -> None:
    """A file whose data holds the tensors in `order` (the header lists them by key)."""
    header, offset = {}, 0
    for key in order:
        data = tensors[key]
        header[key] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(tensors[k] for k in order))


@pytest.mark.parametrize("order", ["stored in order", "stored shuffled"])
def test_a_reader_reads_tensors_in_one_span_or_one_by_one(tmp_path: Path, order: str) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"k{i}": rng.integers(0, 255, i % 9 + 1, dtype=np.uint8).tobytes() for i in range(200)}
    keys = list(tensors)
    stored = keys if order == "stored in order" else list(rng.permutation(keys))
    safetensors_file(tmp_path / "m.safetensors", tensors, stored)
    reader = SafetensorsReader(read_header(tmp_path / "m.safetensors"))
    wanted = keys[10:150]
    sizes = [len(tensors[k]) for k in wanted]
    out = memoryview(bytearray(sum(sizes)))
    assert bytes(read_whole_tensors(reader, wanted, sizes, out)) == b"".join(tensors[k] for k in wanted)
    reads: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        original = SafetensorsReader.read_into
        patch.setattr(SafetensorsReader, "read_into", lambda self, *a: reads.append(1) or original(self, *a))
        read_whole_tensors(reader, wanted, sizes, memoryview(bytearray(sum(sizes))))
    assert len(reads) == (0 if order == "stored in order" else len(wanted))
    reader.close()


def test_small_tensors_are_read_a_block_ahead_and_spans_of_large_ones_only_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small tensor's read fetches a block of the file for the small ones after it (one pread); a short
    span of a large tensor (a sample of it) reads its own bytes only, not a block it would not use."""
    import merger.io.safetensors_file as safetensors_module

    rng = np.random.default_rng(1)
    tensors = {"small": rng.bytes(100), "next": rng.bytes(200), "large": rng.bytes(4 << 20)}
    safetensors_file(tmp_path / "m.safetensors", tensors, list(tensors))
    reader = SafetensorsReader(read_header(tmp_path / "m.safetensors"))
    preads: list[int] = []
    original = safetensors_module.os.pread
    monkeypatch.setattr(safetensors_module.os, "pread", lambda fd, n, at: preads.append(n) or original(fd, n, at))
    out = memoryview(bytearray(16384))
    assert bytes(reader.read_into("small", 0, 100, out[:100])) == tensors["small"]
    assert bytes(reader.read_into("next", 0, 200, out[:200])) == tensors["next"]
    assert preads == [safetensors_module.READ_AHEAD_BYTES]  # the second served from the block
    for start in (0, 1 << 20, (4 << 20) - 16384):
        assert bytes(reader.read_into("large", start, start + 16384, out)) == tensors["large"][start : start + 16384]
    assert preads == [safetensors_module.READ_AHEAD_BYTES]  # the spans: one preadv each, of their own size
    reader.close()


def test_a_writer_takes_whole_tensors_in_order_only(tmp_path: Path) -> None:
    specs = {"a": TensorSpec("F32", (2,)), "b": TensorSpec("F32", (1,)), "c": TensorSpec("F16", (3,))}
    writer = SafetensorsWriter(tmp_path / "w.safetensors", specs, {})
    with pytest.raises(RuntimeError, match="8 bytes for 2 tensors of 12"):
        writer.write_tensors(["a", "b"], bytes(8))
    writer.abort()
    writer = SafetensorsWriter(tmp_path / "w.safetensors", specs, {})
    with pytest.raises(RuntimeError, match="expected tensor 'a', got 'b'"):
        writer.write_tensors(["b"], bytes(4))
    writer.abort()
    writer = SafetensorsWriter(tmp_path / "w.safetensors", specs, {})
    writer.write_tensors(["a", "b"], np.arange(3, dtype=np.float32).tobytes())
    writer.write_chunk("c", np.ones(3, np.float16).tobytes())
    writer.finish()
    reader = SafetensorsReader(read_header(tmp_path / "w.safetensors"))
    out = memoryview(bytearray(12))
    reader.read_into("a", 0, 8, out[:8])
    reader.read_into("b", 0, 4, out[8:])
    assert np.frombuffer(out, np.float32).tolist() == [0.0, 1.0, 2.0]
    reader.close()


@pytest.mark.parametrize("schedule", [False, True], ids=["one alpha", "per-key alpha"])
@pytest.mark.parametrize("layout", ["mixed dtypes", "one dtype", "a float32 entry in"])
def test_the_aligned_plan_is_the_key_by_key_plan(schedule: bool, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = LAYOUT if layout != "one dtype" else {k: ("F16", s) for k, (_, s) in LAYOUT.items()}
    specs = (spec_of(shapes), spec_of(shapes))
    alpha: Any = Rules(default=0.3, rules=[Rule(match=r"block\.1\d\.", value=0.9)]) if schedule else 0.3
    op, params = Lerp(), LerpParams(alpha=alpha, exclude=r"block\.3" if layout == "a float32 entry in" else None)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    if layout == "a float32 entry in":  # an upstream node's entry: float32 where the output is 16-bit
        specs = ({k: TensorSpec("F32", t.shape) if t.is_float else t for k, t in specs[0].items()}, specs[1])
    keyed_params = keyed(op, params, node)
    assert op.aligned(node.plan) is node.plan  # the fast path is taken
    fast = list(plan_pieces(op, specs, node, keyed_params.for_key, varying=keyed_params.scheduled))
    monkeypatch.setattr(Lerp, "aligned", lambda self, plan: None)
    assert fast == list(plan_pieces(op, specs, node, keyed_params.for_key))
    assert len(fast) < len(shapes) // 2


def test_an_op_that_reads_otherwise_is_planned_key_by_key() -> None:
    class Shifted(Lerp):
        def needs(self, key: str, specs: Any, plan: Any) -> list[tuple[int, str]]:
            return [(1, key), (0, key)] if key in plan else [(1, key)]

    assert Shifted().aligned({"a"}) is None and Lerp().aligned({"a"}) == {"a"}


def test_a_writer_hashes_large_writes_on_its_hashing_thread_to_the_file_s_sha256(tmp_path: Path) -> None:
    import threading

    from merger.io import safetensors_file
    from merger.io.safetensors_file import file_sha256

    rng = np.random.default_rng(9)
    specs = {"big": TensorSpec("U8", (3 << 20,)), "small": TensorSpec("U8", (1000,)), "tail": TensorSpec("U8", (5,))}
    data = {k: rng.integers(0, 255, s.numel, dtype=np.uint8).tobytes() for k, s in specs.items()}
    threads: set[str] = set()
    original = safetensors_file.SafetensorsWriter._write_now

    def write_now(self: SafetensorsWriter, chunk: Any) -> None:
        original(self, chunk)
        threads.update(t.name for t in threading.enumerate() if t.name.startswith("merger-sha"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safetensors_file.SafetensorsWriter, "_write_now", write_now)
        writer = SafetensorsWriter(tmp_path / "h.safetensors", specs, {"a": "b"})
        writer.write_chunk("big", data["big"][: 2 << 20])
        writer.write_chunk("big", data["big"][2 << 20 :])
        writer.write_tensors(["small", "tail"], data["small"] + data["tail"])
        sha = writer.finish()
    assert threads  # the large writes were hashed on the hashing thread
    assert not [t for t in threading.enumerate() if t.name.startswith("merger-sha")]  # and it is gone
    assert sha == file_sha256(tmp_path / "h.safetensors")


def test_copies_from_a_float32_entry_into_float16_and_bfloat16_stay_apart(run_recipe: Any, launch_dir: Path) -> None:
    """A node fed by an upstream node (kept at float32) copies tensors that are float16 and bfloat16
    in turn: the runs must not cast them all to the first one's dtype (found by an attack round)."""
    import torch
    from safetensors.torch import load_file, save_file

    def make(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {
            f"layer.{i:02d}.w": torch.randn(5, generator=g).to((torch.float16, torch.bfloat16)[i % 2])
            for i in range(12)
        }

    (launch_dir / "m").mkdir()
    a, b = make(1), make(2)
    save_file(a, launch_dir / "m" / "a.safetensors")
    save_file(b, launch_dir / "m" / "b.safetensors")
    run_recipe(
        {
            "sources": {"a": "m/a.safetensors", "b": "m/b.safetensors"},
            "nodes": {
                "first": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5},
                "second": {"op": "lerp", "inputs": ["first", "b"], "alpha": 0.25, "exclude": "layer"},
            },
            "outputs": {"o": {"node": "second", "path": "o.safetensors"}},
        }
    )
    out = load_file(launch_dir / "out" / "o.safetensors")
    for key, value in a.items():
        assert out[key].dtype == value.dtype and torch.equal(
            out[key], (value.float() * 0.5 + b[key].float() * 0.5).to(value.dtype)
        ), key
