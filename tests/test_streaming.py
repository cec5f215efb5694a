"""Whole-tensor methods streamed over chunks (merger.ops.streaming, merger.ops.topk, merger.core.magnitudes):
ties, dare_*, task_arithmetic, slerp and model_stock give, on tensors of many chunks, the results of
their whole-tensor code before they streamed (tests/streaming_reference.py): TIES's trim (the tie-break
at the cut included), sign election and DARE's drops bit for bit, norms and dot products (summed in
another order) within 1e-6; in the memory of a few chunks, reading each tensor in two passes (TIES)
or one (DARE) where the sample aims well, three where it misleads.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest
import torch

import merger.engine.pieces as pieces_module
import merger.ops.streaming as streaming
import merger.ops.task_vectors as task_vectors
from merger.core import arrays
from merger.core.arrays import NumpyBackend, TorchBackend
from merger.core.specs import TensorSpec
from merger.engine.pieces import chunk_elements
from merger.engine.pipeline import Pipeline
from merger.ops.base import InputSpecs, Op
from merger.ops.model_stock import ModelStock, ModelStockParams
from merger.ops.slerp import Slerp, SlerpParams
from merger.ops.task_vectors import (
    DareLinear,
    DareParams,
    DareTies,
    DareTiesParams,
    TaskArithmetic,
    TaskArithmeticParams,
    Ties,
    TiesParams,
)
from merger.ops.topk import TopK
from tests import streaming_reference as ref
from tests.conftest import BytesSource, Collector, keyed

BACKENDS = {"numpy": NumpyBackend, "torch": lambda: TorchBackend("cpu"), "numpy-plain": NumpyBackend}
SHAPE = (181, 293)  # 53033 elements: 52 chunks of 1024
KEY = "w"


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1024)  # the least chunk: 1024 elements
    monkeypatch.setattr(streaming, "KEPT_BYTES", 0)  # every pass reads, as over tensors larger than KEPT_BYTES


@pytest.fixture(params=sorted(BACKENDS))
def xp(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "numpy-plain":  # numpy without merger's compiled loops: the array maths
        monkeypatch.setattr(arrays, "FLOATCONV", None)
    return BACKENDS[request.param]()


def family(seed: int, n: int, shape: tuple[int, ...] = SHAPE, *, steps: bool = False) -> list[np.ndarray]:
    """A base and n fine-tunes of it (float32); with `steps`, all on float16's grid, so that many deltas
    have equal magnitudes (ties at TIES's cut)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32) * 0.02
    models = [base + rng.standard_normal(shape).astype(np.float32) * 0.002 for _ in range(n)]
    if steps:
        return [a.astype(np.float16).astype(np.float32) for a in (base, *models)]
    return [base, *models]


def run(op: Op, params: Any, inputs: list[np.ndarray], xp: Any, **kw: Any) -> tuple[np.ndarray, list[BytesSource]]:
    """The op's output tensor KEY over inputs (float32 or float64 arrays of one shape), by the real pipeline."""
    code, dtype = ("F64", np.float64) if inputs[0].dtype == np.float64 else ("F32", np.float32)
    sources = [BytesSource({KEY: a.astype(dtype).tobytes()}) for a in inputs]
    specs = tuple({KEY: TensorSpec(code, a.shape)} for a in inputs)
    node = op.spec(InputSpecs(tuple(f"m{i}" for i in range(len(inputs))), specs), params)
    collector = Collector()
    Pipeline(op, keyed(op, params, node), list(sources), specs, xp, **kw).run(collector, node, lambda k, n: None)
    return np.frombuffer(collector.joined()[KEY], dtype).reshape(inputs[0].shape), sources


def passes(source: BytesSource, chunk: int = 1024) -> int:
    """How many passes read the tensor: the reads of its last chunk (of `chunk` elements; a sample's
    runs are cut in chunks from their own start)."""
    numel = len(source.tensors[KEY]) // 4
    last = (numel - 1) // chunk * chunk * 4
    return sum(1 for key, start, _ in source.reads if key == KEY and start == last)


def cut_at_a_tie(deltas: np.ndarray) -> float:
    """A density whose k-th largest magnitude is tied with the (k+1)-th, and with others above it."""
    magnitudes = np.sort(np.abs(deltas).reshape(-1))[::-1]
    n = len(magnitudes)
    for k in range(n // 3, n):
        if magnitudes[k - 1] == magnitudes[k] == magnitudes[k - 2]:
            assert int((k + 0.5) / n * n) == k
            return (k + 0.5) / n
    raise AssertionError("no tie")


# --- TIES ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aimed", [True, False], ids=["aimed", "two-level"])
@pytest.mark.parametrize("density", [0.0, 1e-9, 0.3, 0.5, 0.97, 1.0, "tie", "last"])
def test_ties_streamed_equals_whole_tensor_bit_for_bit(
    xp: Any, monkeypatch: pytest.MonkeyPatch, density: Any, aimed: bool
) -> None:
    monkeypatch.setattr(task_vectors, "AIMED", 0 if aimed else 1 << 40)
    monkeypatch.setattr(task_vectors, "SAMPLE_RUN", 512)  # 16 runs of 512 of the tensor's 53033 elements
    inputs = family(1, 2, steps=True)
    n = inputs[0].size
    if density == "tie":
        density = cut_at_a_tie(inputs[1] - inputs[0])
    elif density == "last":
        density = (n - 1 + 0.5) / n  # k = n - 1
    weights = [1.0, 0.5]
    got, sources = run(Ties(), TiesParams(base="m0", density=density, weights=weights), inputs, xp)
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how="magnitude", elects=True, weights=weights, densities=[density] * 2,
        normalize=True,
    )  # fmt: skip
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    if 0 < density < 1:
        assert passes(sources[1]) in (2, 3)


def first_chunk_reads(source: BytesSource, chunk: int = 1024) -> int:
    """How many times the tensor's first chunk was read (a pass's, not a sample's: those are longer)."""
    return sum(1 for key, start, stop in source.reads if key == KEY and start == 0 and stop == chunk * 4)


@pytest.mark.parametrize("op", ["ties", "task_arithmetic"])
def test_a_pass_starts_on_the_chunk_the_pass_before_read_ahead(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a pass's end the next pass's first chunk is read ahead and taken by that pass (so a tensor's
    first chunk is read once a pass, and at most once more after the last: dropped); the results are
    the reference's, and the sample's reads are made without the reading thread."""
    monkeypatch.setattr(task_vectors, "AIMED", 0)
    monkeypatch.setattr(task_vectors, "SAMPLE_RUN", 512)
    inputs = family(3, 2)
    threads: set[str] = set()
    original = BytesSource.read_into

    def read_into(self: BytesSource, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        if stop - start == 512 * 4:  # a sample's run
            threads.add(threading.current_thread().name)
        return original(self, key, start, stop, out)

    monkeypatch.setattr(BytesSource, "read_into", read_into)
    if op == "ties":
        params: Any = TiesParams(base="m0", density=0.3)
        how, elects, densities = "magnitude", True, [0.3, 0.3]
    else:
        params, how, elects, densities = TaskArithmeticParams(base="m0"), None, False, [1.0, 1.0]
    got, sources = run(Ties() if op == "ties" else TaskArithmetic(), params, inputs, NumpyBackend())
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how=how, elects=elects, weights=[1.0, 1.0], densities=densities,
        normalize=op == "ties",
    )  # fmt: skip
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    for source in sources:  # read once a pass (the last pass's read ahead may be dropped before it is made)
        assert passes(source) <= first_chunk_reads(source) <= passes(source) + 1
    assert threads == ({threading.current_thread().name} if op == "ties" else set())


def test_ties_of_float64_tensors_select_over_64_bits(xp: Any) -> None:
    """float64 magnitudes: four 16-bit passes, exactly the whole-tensor selection (ties included)."""
    inputs = [a.astype(np.float64) for a in family(14, 2, steps=True)]
    inputs[1] = inputs[1] + 1e-12 * np.round(inputs[1] * 1e3)  # ties broken below float32's precision
    density = 0.4
    got, _ = run(Ties(), TiesParams(base="m0", density=density), inputs, xp)
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how="magnitude", elects=True, weights=[1.0, 1.0], densities=[density] * 2,
        normalize=True,
    )  # fmt: skip
    assert got.dtype == np.float64 and np.array_equal(got, want)


def test_ties_tie_break_at_the_cut_keeps_the_first_in_c_order(xp: Any) -> None:
    """All deltas equal: the k kept are the first k, across chunk boundaries."""
    base = np.zeros(SHAPE, np.float32)
    tuned = np.full(SHAPE, 0.25, np.float32)
    density = 0.3
    got, _ = run(Ties(), TiesParams(base="m0", density=density), [base, tuned], xp)
    k = int(density * base.size)
    assert np.count_nonzero(got) == k
    assert np.all(got.reshape(-1)[:k] == 0.25)


@pytest.mark.parametrize(
    ("weights", "consensus", "normalize", "scale"),
    [([0.3, 0.7, 1.1], "sum", True, 1.0), ([1.0, -0.5, 2.0], "count", True, 0.8), ([0.6, 0.2, 0.9], "sum", False, 1.3)],
)
def test_ties_options_within_1e6_and_the_compiled_election_equals_the_array_maths(
    monkeypatch: pytest.MonkeyPatch, weights: list[float], consensus: str, normalize: bool, scale: float
) -> None:
    inputs = family(2, 3)
    densities = [0.2, 0.45, 0.7]
    params = TiesParams(
        base="m0", density=densities, weights=weights, consensus=consensus, normalize=normalize, scale=scale
    )  # type: ignore[arg-type]
    compiled, _ = run(Ties(), params, inputs, NumpyBackend())
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how="magnitude", elects=True, weights=weights, densities=densities,
        normalize=normalize, scale=scale, consensus=consensus,
    )  # fmt: skip
    # the weights are summed in float32 (version 2 summed them in float64 on the CPU, float32 on CUDA)
    np.testing.assert_allclose(compiled, want, rtol=0, atol=1e-6)
    torch_out, _ = run(Ties(), params, inputs, TorchBackend("cpu"))
    monkeypatch.setattr(arrays, "FLOATCONV", None)
    plain, _ = run(Ties(), params, inputs, NumpyBackend())
    assert np.array_equal(compiled.view(np.uint32), plain.view(np.uint32))
    assert np.array_equal(compiled.view(np.uint32), torch_out.view(np.uint32))


def test_ties_memory_holds_chunks_not_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """No read spans more than a chunk, and the first pass's window spares the second (two passes)."""
    monkeypatch.setattr(task_vectors, "AIMED", 0)
    monkeypatch.setattr(task_vectors, "SAMPLE_RUN", 512)
    inputs = family(3, 2)
    _, sources = run(Ties(), TiesParams(base="m0", density=0.4), inputs, NumpyBackend())
    specs = tuple({KEY: TensorSpec("F32", SHAPE)} for _ in inputs)
    largest = max(stop - start for source in sources for _, start, stop in source.reads)
    assert largest <= chunk_elements(specs) * 4
    assert [passes(s) for s in sources] == [2, 2, 2]


KEPT_CASES: dict[str, tuple[Op, Any, int]] = {
    "ties": (Ties(), TiesParams(base="m0", density=0.4), 3),
    "dare_linear l1": (DareLinear(), DareParams(base="m0", density=0.5, rescale="l1", seed=3), 3),
    "model_stock": (ModelStock(), ModelStockParams(base="m0"), 3),
    "slerp": (Slerp(), SlerpParams(t=0.3), 2),
}


@pytest.mark.parametrize("case", sorted(KEPT_CASES))
def test_a_tensor_within_kept_bytes_is_read_once_for_all_passes(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its chunks are kept from the first pass (and no next pass's first chunk is read ahead), with the
    result of passes that read again; one a byte over the bound is read in every pass."""
    monkeypatch.setattr(task_vectors, "AIMED", 0)
    monkeypatch.setattr(task_vectors, "SAMPLE_RUN", 512)
    op, params, n = KEPT_CASES[case]
    inputs = family(5, n - 1) if case != "slerp" else family(5, 1)
    again, _ = run(op, params, inputs, NumpyBackend())
    chunks = math.ceil(inputs[0].size / 1024)
    monkeypatch.setattr(streaming, "KEPT_BYTES", inputs[0].size * 4 * n)
    got, sources = run(op, params, inputs, NumpyBackend())
    assert np.array_equal(got, again)
    for source in sources:
        size = len(source.tensors[KEY])
        chunk_reads = [r for r in source.reads if r[1] % 4096 == 0 and r[2] == min(r[1] + 4096, size)]
        assert len(chunk_reads) == chunks and passes(source) == 1
    monkeypatch.setattr(streaming, "KEPT_BYTES", inputs[0].size * 4 * n - 1)
    _, sources = run(op, params, inputs, NumpyBackend())
    assert all(passes(source) >= 2 for source in sources)


def test_topk_window_that_misses_costs_passes_not_exactness() -> None:
    """A window where the cut is gives it in one pass; one above or below the cut costs the two passes
    without a window after it."""
    rng = np.random.default_rng(4)
    values = rng.standard_normal(200_000).astype(np.float32)
    k = 60_000
    xp = NumpyBackend()
    want = ref.top_k_mask(np.abs(values), k)
    for aim_at in (0.3, 0.9, 0.05):  # the true fraction, and misleading ones (the window below, above the cut)
        top = TopK(k, 32)
        sample = np.zeros(1 << 16, np.int64)
        xp.magnitude_histogram(values[::5], sample, (0, 0, None, None, 0, False))
        top.aim(sample, aim_at, 8)
        used = 0
        while top.cut is None:
            for start in range(0, values.size, 7000):
                top.add(values[start : start + 7000], xp)
            top.end_pass()
            used += 1
        assert used == (1 if aim_at == 0.3 else 3)
        mask, marked = xp.cut_mask(values, top.cut.bits, top.cut.ties)
        assert marked == top.cut.ties and np.array_equal(mask, want)


# --- DARE, task arithmetic ----------------------------------------------------------------------------


def test_seeded_draws_in_chunks_are_the_whole_draw() -> None:
    from merger.ops.base import seeded_rng

    whole = seeded_rng(7, "w#0").random(10_001, dtype="float32")
    rng = seeded_rng(7, "w#0")
    parts = [rng.random(size, dtype="float32") for size in (1, 1023, 1024, 3, 7950)]
    assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("rescale", ["inverse_density", "none", "l1"])
@pytest.mark.parametrize("op", ["dare_linear", "dare_ties"])
def test_dare_streamed_equals_whole_tensor(xp: Any, op: str, rescale: str) -> None:
    inputs = family(5, 2)
    weights, density = [0.8, 1.25], 0.35
    cls, params_cls = (DareLinear, DareParams) if op == "dare_linear" else (DareTies, DareTiesParams)
    params = params_cls(base="m0", density=density, weights=weights, seed=11, rescale=rescale)  # type: ignore[arg-type]
    got, sources = run(cls(), params, inputs, xp)
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how="random", elects=op == "dare_ties", weights=weights,
        densities=[density] * 2, normalize=False, seed=11, rescale=rescale,
    )  # fmt: skip
    if rescale == "l1":  # the norms are summed over chunks
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    else:
        assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    assert passes(sources[1]) == (2 if rescale == "l1" else 1)


def test_task_arithmetic_streams_in_one_pass(xp: Any) -> None:
    inputs = family(6, 3)
    got, sources = run(TaskArithmetic(), TaskArithmeticParams(base="m0", weights=[0.5, 0.25, 1.0]), inputs, xp)
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how=None, elects=False, weights=[0.5, 0.25, 1.0], densities=[1.0] * 3,
        normalize=False,
    )  # fmt: skip
    assert np.array_equal(got, want.astype(np.float32))
    assert passes(sources[0]) == 1


# --- slerp, model_stock -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8])
def test_slerp_streamed_within_1e6_of_whole_tensor(xp: Any, t: float) -> None:
    _, a, b = family(7, 2)
    got, sources = run(Slerp(), SlerpParams(t=t), [a * 50, b * 50], xp)
    np.testing.assert_allclose(got, ref.slerp(a * 50, b * 50, t), rtol=0, atol=1e-6)
    assert passes(sources[0]) == 2


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("shape", [(97, 1031), (1800, 16, 3)], ids=["long-rows", "conv-rows-of-3"])
def test_model_stock_streamed_equals_whole_tensor(
    xp: Any, filter_wise: bool, clamp: bool, shape: tuple[int, ...]
) -> None:
    """Rows (filter_wise) are summed whole as before, so t is the same bit for bit, even where it is
    ill-conditioned (rows of 3 whose offsets nearly oppose); a whole tensor within 1e-6."""
    inputs = family(8, 3, shape=shape)
    inputs[3] = inputs[0] - (inputs[3] - inputs[0])  # one fine-tune pulls the other way: t < 0 somewhere
    params = ModelStockParams(base="m0", filter_wise=filter_wise, clamp=clamp)
    got, sources = run(ModelStock(), params, inputs, xp)
    sums = ref.row_sums
    if isinstance(xp, TorchBackend):  # version 1 on torch: torch's row sums

        def sums(array: np.ndarray) -> np.ndarray:
            return torch.from_numpy(array).reshape(array.shape[0], -1).sum(dim=1, keepdim=True).numpy()

    want = ref.model_stock(inputs[0], inputs[1:], filter_wise=filter_wise, clamp=clamp, sums=sums)
    if filter_wise:
        assert np.array_equal(got, want.astype(np.float32))
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    width = shape[-1]
    assert passes(sources[0], max(width, 1024 - 1024 % width) if filter_wise else 1024) == 2


# --- bookkeeping ----------------------------------------------------------------------------------------


def test_non_finite_inputs_are_counted_once_over_the_passes() -> None:
    inputs = family(9, 2)
    inputs[1].reshape(-1)[[5, 40_000]] = np.nan
    found: list[tuple[int | None, str, int]] = []
    run(
        Ties(), TiesParams(base="m0", density=0.5), inputs, NumpyBackend(),
        watched=frozenset({0, 1, 2}), on_nonfinite=lambda i, k, n: found.append((i, k, n)),
    )  # fmt: skip
    assert sum(n for i, _, n in found if i == 1) == 2
    assert not [f for f in found if f[0] in (0, 2)]


def test_empty_and_single_chunk_tensors_stream(xp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 24 << 20)
    inputs = family(10, 2, shape=(40, 50))
    got, sources = run(Ties(), TiesParams(base="m0", density=0.3), inputs, xp)
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how="magnitude", elects=True, weights=[1.0, 1.0], densities=[0.3] * 2,
        normalize=True,
    )  # fmt: skip
    assert np.array_equal(got, want.astype(np.float32))
    assert all(len(s.reads) == 1 for s in sources)  # one read, kept for the passes

    # norms of a tensor of one chunk are summed whole, as before: the same bits (as numpy sums them)
    def same(got: np.ndarray, want: np.ndarray) -> None:
        np.testing.assert_allclose(got, want, rtol=0, atol=0 if isinstance(xp, NumpyBackend) else 1e-6)

    l1 = DareParams(base="m0", density=0.3, seed=2, rescale="l1")
    want = ref.task_vectors(
        KEY, inputs[0], inputs[1:], how="random", elects=False, weights=[1.0, 1.0], densities=[0.3] * 2,
        normalize=False, seed=2, rescale="l1",
    )  # fmt: skip
    same(run(DareLinear(), l1, inputs, xp)[0], want.astype(np.float32))
    same(run(Slerp(), SlerpParams(t=0.3), inputs[1:], xp)[0], ref.slerp(inputs[1], inputs[2], 0.3).astype(np.float32))
    empty, _ = run(Ties(), TiesParams(base="m0", density=0.3), [np.zeros((0, 4), np.float32)] * 3, xp)
    assert empty.shape == (0, 4)
    assert math.prod(empty.shape) == 0


# --- vocab: first, end to end ----------------------------------------------------------------------------


def test_vocab_first_streams_the_shared_rows_and_copies_the_firsts_rest(xp: Any) -> None:
    from merger.ops.vocab import vocab_first

    embed = "model.embed_tokens.weight"
    rng = np.random.default_rng(12)
    base, other = (rng.standard_normal((300, 77)).astype(np.float32) for _ in range(2))
    first = rng.standard_normal((303, 77)).astype(np.float32)  # three tokens added
    inputs = [base, first, other]
    sources = [BytesSource({embed: a.tobytes()}) for a in inputs]
    specs = tuple({embed: TensorSpec("F32", a.shape)} for a in inputs)
    op, params = vocab_first(Ties(), 1), TiesParams(base="base", density=0.4)
    node = op.spec(InputSpecs(("base", "first", "other"), specs), params)
    assert op.piece_mode(embed, specs, node.plan) == "stream"
    collector = Collector()
    Pipeline(op, keyed(op, params, node), list(sources), specs, xp).run(collector, node, lambda k, n: None)
    got = np.frombuffer(collector.joined()[embed], np.float32).reshape(303, 77)
    want = ref.task_vectors(
        embed, base, [first[:300], other], how="magnitude", elects=True, weights=[1.0, 1.0], densities=[0.4] * 2,
        normalize=True,
    )  # fmt: skip
    assert np.array_equal(got[:300], want.astype(np.float32))
    assert np.array_equal(got[300:], first[300:])
    assert max(stop - start for s in sources for _, start, stop in s.reads) <= chunk_elements(specs) * 4


@pytest.mark.parametrize("stored", ["float16", "bfloat16", "mixed", "float16 by array maths"])
@pytest.mark.parametrize("op", ["ties", "dare_ties"])
def test_ties_end_to_end_on_tensors_of_many_chunks(
    launch_dir: Any, run_recipe: Any, stored: str, op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe run (cache, entry file, output) of TIES on 16-bit models whose tensors span many chunks (read
    as stored, widened in the compiled loops; "mixed": a float32 base and bfloat16 and float16 models; "by
    array maths": where the compiled election is not taken, the chunks read as stored are widened for the
    array maths): the output is the whole-tensor result rounded to the base's dtype; a second run is a
    cache hit."""
    import torch
    from safetensors.torch import load_file, save_file

    declined: list[int] = []
    if stored.endswith("by array maths"):
        monkeypatch.setattr(arrays.NumpyBackend, "elect", lambda *args: declined.append(1))

    (launch_dir / "models").mkdir()
    dtypes = {"bfloat16": [torch.bfloat16] * 3, "mixed": [torch.float32, torch.bfloat16, torch.float16]}
    chosen = dtypes.get(stored, [torch.float16] * 3)
    inputs = []
    for name, array, dtype in zip(("base", "a", "b"), family(13, 2, shape=(120, 333), steps=True), chosen, strict=True):
        tensors = {"w": torch.from_numpy(array).to(dtype), "n": torch.tensor([1.0, 2.0]).to(dtype)}
        save_file(tensors, launch_dir / "models" / f"{name}.safetensors")
        inputs.append(tensors["w"].float().numpy())
    params: dict[str, Any] = {"density": 0.35} if op == "ties" else {"density": 0.6, "seed": 7}
    data = {
        "sources": {n: f"models/{n}.safetensors" for n in ("base", "a", "b")},
        "nodes": {"m": {"op": op, "base": "base", "inputs": ["a", "b"], **params}},
        "outputs": {"m": {"path": "m.safetensors"}},
    }
    report = run_recipe(data)
    got = load_file(report["outputs"]["m"]["path"])["w"]
    want = ref.task_vectors(
        "w", inputs[0], inputs[1:], how="magnitude" if op == "ties" else "random", elects=True, weights=[1.0, 1.0],
        densities=[params["density"]] * 2, normalize=op == "ties", seed=params.get("seed"),
    )  # fmt: skip
    assert got.dtype == chosen[0]
    assert torch.equal(got, torch.from_numpy(want).to(chosen[0]))
    assert bool(declined) == stored.endswith("by array maths")
    assert report["nodes"]["m"]["status"] == "computed"
    assert run_recipe(data)["nodes"]["m"]["status"] == "cached"


def streaming_pipeline() -> tuple[list[np.ndarray], list[BytesSource], tuple[dict[str, TensorSpec], ...], Pipeline]:
    """A base and a fine-tune of it as sources a pipeline streams from (inputs, sources, specs, pipeline)."""
    inputs = family(4, 1)
    sources = [BytesSource({KEY: a.tobytes()}) for a in inputs]
    specs = tuple({KEY: TensorSpec("F32", a.shape)} for a in inputs)
    op, params = TaskArithmetic(), TaskArithmeticParams(base="m0")
    node = op.spec(InputSpecs(("m0", "m1"), specs), params)
    return inputs, sources, specs, Pipeline(op, keyed(op, params, node), list(sources), specs, NumpyBackend())


def test_the_chunk_read_ahead_at_a_pass_end_is_the_next_pass_s_first() -> None:
    from merger.engine.op_inputs import PipelineChunkInputs
    from merger.engine.pieces import Piece

    inputs, sources, _, pipeline = streaming_pipeline()
    reads = [(0, KEY), (1, KEY)]
    with PipelineChunkInputs(pipeline, Piece(KEY, 0, inputs[0].size, "stream", ())) as chunks:
        first = [np.concatenate(c) for c in zip(*chunks.chunks(reads), strict=True)]
        assert chunks._spare is not None
        chunks._spare[1].result()  # read by now
        assert first_chunk_reads(sources[0]) == 2
        passing = chunks.chunks(reads)
        started = next(passing)
        assert first_chunk_reads(sources[0]) == 2  # the second pass took it
        second = [np.concatenate(c) for c in zip(started, *passing, strict=True)]
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
        chunks.chunks([(1, KEY)]).__next__()  # another pass's reads: the one read ahead is dropped
    assert [np.array_equal(a.reshape(-1), b) for a, b in zip(inputs, first, strict=True)] == [True, True]


def test_streamed_pieces_share_one_read_ahead_thread_and_drop_their_queued_reads() -> None:
    """The node's pieces read ahead on one thread (not one started per tensor); a piece left before its
    pass ends leaves no read behind it: what it queued is dropped, what was under way is finished."""
    from merger.engine.op_inputs import PipelineChunkInputs
    from merger.engine.pieces import Piece

    inputs, sources, specs, pipeline = streaming_pipeline()
    reads, threads = [(0, KEY), (1, KEY)], set()
    for _ in range(3):
        with PipelineChunkInputs(pipeline, Piece(KEY, 0, inputs[0].size, "stream", ())) as chunks:
            passing = chunks.chunks(reads)
            next(passing)  # the first chunk; the next ones are queued
            threads.add(next(iter(pipeline.stream_reads()._threads)).ident)
        done = len(sources[0].reads)
        pipeline.stream_reads().submit(lambda: None).result()  # the thread has run whatever was left
        assert len(sources[0].reads) == done  # nothing of the piece was read after it ended
        assert done < inputs[0].size // chunk_elements(specs, stream=True)  # it did not read the whole pass
        sources[0].reads.clear()
    assert len(threads) == 1
