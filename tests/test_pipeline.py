"""The read/compute/write pipeline: chunking, ordering, errors from any stage, buffer reuse."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import merger.engine.pieces as pieces_module
from merger.core.arrays import NumpyBackend, TorchBackend
from merger.core.specs import TensorSpec
from merger.engine.pieces import plan_pieces
from merger.engine.pipeline import Pipeline
from merger.ops.base import InputSpecs
from merger.ops.linear import Lerp, LerpParams
from tests.conftest import BytesSource, Collector, keyed

SHAPES = {"big": (5000,), "matrix": (37, 41), "scalar": (), "empty": (0, 3)}


def models(seed: int, fail_on: str | None = None) -> BytesSource:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    source = BytesSource({k: a.tobytes() for k, a in arrays.items()}, fail_on)
    source.arrays = arrays  # type: ignore[attr-defined]
    return source


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1024 * 12)  # 1024 elements per chunk here


def run(sources: list[BytesSource], collector: Collector, backend: Any = None) -> dict[str, TensorSpec]:
    specs = tuple({k: TensorSpec("F32", SHAPES[k]) for k in s.tensors} for s in sources)
    op, params = Lerp(), LerpParams(alpha=0.25)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    Pipeline(op, keyed(op, params, node), list(sources), specs, backend or NumpyBackend()).run(
        collector, node, lambda key, nbytes: None
    )
    return node.tensors


@pytest.mark.parametrize("backend", [NumpyBackend(), TorchBackend("cpu")], ids=["numpy", "torch"])
def test_chunked_result_equals_whole_tensor_maths(backend: Any) -> None:
    a, b = models(1), models(2)
    collector = Collector()
    output = run([a, b], collector, backend)
    keys = [key for key, _ in collector.chunks]
    assert keys.count("big") == 5  # 5000 elements in chunks of 1024
    assert [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k] == list(output)  # in order
    joined = collector.joined()
    for key, shape in SHAPES.items():
        got = np.frombuffer(joined[key], np.float32).reshape(shape)
        np.testing.assert_allclose(got, 0.75 * a.arrays[key] + 0.25 * b.arrays[key], rtol=1e-6)
    assert ("big", 4096, 8192) in a.reads and ("big", 16384, 20000) in b.reads


def test_plan_pieces_chunks_per_key_ops_and_shrinks_with_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1 << 20)
    specs2 = tuple({"w": TensorSpec("F32", (10_000_000,))} for _ in range(2))
    specs8 = tuple({"w": TensorSpec("F32", (10_000_000,))} for _ in range(8))
    params = LerpParams(alpha=0.5)
    two = list(plan_pieces(Lerp(), specs2, Lerp().spec(InputSpecs(("a", "b"), specs2), params)))
    eight = list(plan_pieces(Lerp(), specs8, Lerp().spec(InputSpecs(tuple("abcdefgh"), specs8), params)))
    assert all(p.mode == "merge" for p in two)
    assert two[0].stop - two[0].start > eight[0].stop - eight[0].start  # smaller chunks for more inputs
    assert two[-1].stop == 10_000_000 and eight[-1].stop == 10_000_000


def test_reader_error_stops_the_pipeline() -> None:
    with pytest.raises(OSError, match="disk error reading matrix"):
        run([models(1), models(2, fail_on="matrix")], Collector())


def test_writer_error_stops_the_pipeline() -> None:
    with pytest.raises(OSError, match="disk full"):
        run([models(1), models(2)], Collector(fail_after=2))


def test_compute_error_stops_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Lerp, values: list[Any], params: Any, xp: Any) -> Any:
        raise ValueError("maths failed")

    monkeypatch.setattr(Lerp, "combine", broken)
    monkeypatch.setattr("merger.core.fused.FUSED", None)  # the array maths, not the fused loop
    with pytest.raises(ValueError, match="maths failed"):
        run([models(1), models(2)], Collector())


def float16_sources(seed: int, shapes: dict[str, tuple[int, ...]]) -> tuple[BytesSource, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = {k: (rng.standard_normal(s) * 100).astype(np.float16) for k, s in shapes.items()}
    return BytesSource({k: a.tobytes() for k, a in arrays.items()}), arrays


@pytest.mark.parametrize("threads", ["two compute threads", "one"])
def test_blocks_and_compute_threads_give_correctly_rounded_bytes_in_order(
    threads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float16 lerp over many chunks, each computed in blocks (the last one partial), by two threads or one:
    every element is float32 maths rounded once to float16, and chunks reach the writer in order."""
    monkeypatch.setattr(NumpyBackend, "block_elements", 300)
    if threads == "one":
        monkeypatch.setattr(Pipeline, "_compute_workers", lambda self: None)
    shapes = {"first": (9001,), "second": (64, 65), "third": (5,)}
    (a, arrays_a), (b, arrays_b) = float16_sources(1, shapes), float16_sources(2, shapes)
    specs = tuple({k: TensorSpec("F16", s) for k, s in shapes.items()} for _ in range(2))
    op, params = Lerp(), LerpParams(alpha=0.3)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    collector = Collector()
    Pipeline(op, keyed(op, params, node), [a, b], specs, NumpyBackend()).run(collector, node, lambda k, n: None)
    keys = [key for key, _ in collector.chunks]
    assert keys.count("first") == 9  # 9001 elements in chunks of 1024
    assert [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k] == list(shapes)
    for key, got in collector.joined().items():
        x, y = arrays_a[key].astype(np.float32), arrays_b[key].astype(np.float32)
        want = (x * np.float32(1.0 - 0.3) + y * np.float32(0.3)).astype(np.float16).reshape(-1)
        assert np.array_equal(np.frombuffer(got, np.uint16), want.view(np.uint16)), key


def test_a_failing_block_stops_the_two_compute_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NumpyBackend, "block_elements", 300)
    calls = {"n": 0}
    original = Lerp.combine

    def combine(self: Lerp, values: list[Any], params: Any, xp: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 20:
            raise ArithmeticError("block 20 failed")
        return original(self, values, params, xp)

    monkeypatch.setattr(Lerp, "combine", combine)
    monkeypatch.setattr("merger.core.fused.FUSED", None)  # the array maths, not the fused loop
    shapes = {"big": (50_000,)}
    (a, _), (b, _) = float16_sources(1, shapes), float16_sources(2, shapes)
    specs = tuple({"big": TensorSpec("F16", (50_000,))} for _ in range(2))
    op, params = Lerp(), LerpParams(alpha=0.3)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    collector = Collector()
    with pytest.raises(ArithmeticError, match="block 20"):
        Pipeline(op, keyed(op, params, node), [a, b], specs, NumpyBackend()).run(collector, node, lambda k, n: None)
    assert sum(len(data) for _, data in collector.chunks) < 50_000 * 2  # stopped before the end
    assert calls["n"] < 50_000 // 300


def test_many_small_tensors_are_computed_together_and_stay_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {f"layer.{i}.bias": (i % 7 + 1,) for i in range(3000)} | {"big": (50_000,), "after.bias": (3,)}
    (a, arrays_a), (b, arrays_b) = float16_sources(1, shapes), float16_sources(2, shapes)
    specs = tuple({k: TensorSpec("F16", s) for k, s in shapes.items()} for _ in range(2))
    op, params = Lerp(), LerpParams(alpha=0.3)
    node = op.spec(InputSpecs(("a", "b"), specs), params)
    sizes: list[int] = []
    original = Lerp.combine

    def combine(self: Lerp, values: list[Any], params: Any, xp: Any) -> Any:
        sizes.append(values[0].size)
        return original(self, values, params, xp)

    monkeypatch.setattr(Lerp, "combine", combine)
    monkeypatch.setattr("merger.core.fused.FUSED", None)  # the array maths, not the fused loop
    monkeypatch.setattr(pieces_module, "RUN_TENSORS", 1000)
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 12 * 16384)  # chunks of 16384 float16 elements
    collector = Collector()
    Pipeline(op, keyed(op, params, node), [a, b], specs, NumpyBackend()).run(collector, node, lambda k, n: None)
    keys = [key for key, _ in collector.chunks]
    assert [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k] == list(shapes)  # in order
    assert keys.count("big") == 4 and len(keys) == len(shapes) + 3  # the small ones whole, "big" in 4 chunks
    # 3000 small keys in runs of 1000 tensors (one computation each), "big" in 4 chunks, "after.bias" alone
    runs = [sum(i % 7 + 1 for i in range(start, start + 1000)) for start in (0, 1000, 2000)]
    assert sizes == [*runs, 16384, 16384, 16384, 50_000 - 3 * 16384, 3]
    for key, got in collector.joined().items():
        x, y = arrays_a[key].astype(np.float32), arrays_b[key].astype(np.float32)
        want = (x * np.float32(0.7) + y * np.float32(0.3)).astype(np.float16).reshape(-1)
        assert np.array_equal(np.frombuffer(got, np.uint16), want.view(np.uint16)), key

    failing = BytesSource(a.tensors, fail_on="layer.1500.bias")  # an error inside a batch stops the node
    with pytest.raises(OSError, match=r"layer\.1500\.bias"):
        Pipeline(op, keyed(op, params, node), [failing, b], specs, NumpyBackend()).run(
            Collector(), node, lambda k, n: None
        )
