"""TIES reading float16 and bfloat16 chunks as stored (merger/core/_ties.c's `magnitude_hist16` and
`elect` with codes, NumpyBackend.load(widen=False), PipelineChunkInputs.chunks(stored=True)), at its edges:
odd lengths and offsets, any 16-bit pattern, ties across chunks, bad arguments; and TIES over inputs of
mixed widths (float64 with narrower ones), DARE at densities float32 rounds to 0, the histogram's window
bounds. The stored path gives the float32 path's bits."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import merger.engine.op_inputs as op_inputs
import merger.engine.pieces as pieces_module
from merger.core import arrays, magnitudes
from merger.core.arrays import BF16_STORED, NumpyBackend
from merger.core.specs import TensorSpec
from merger.engine.pipeline import Pipeline
from merger.ops.base import InputSpecs, Op
from merger.ops.sparsify import CUT, MASKED, PLAIN, ZEROED, Step
from merger.ops.task_vectors import DareTies, DareTiesParams, Ties, TiesParams
from merger.ops.topk import BINS
from tests import streaming_reference as ref
from tests.conftest import BytesSource, Collector, keyed

floatconv = arrays.FLOATCONV
pytestmark = [
    pytest.mark.skipif(floatconv is None, reason="merger's compiled loops are not built"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NaN and inf in the array maths
]
XP = NumpyBackend()


def encoded(values: np.ndarray, code: str) -> bytes:
    if code == "F64":
        return values.astype(np.float64).tobytes()
    if code == "F32":
        return values.astype(np.float32).tobytes()
    return bytes(XP.store(values.astype(np.float32), code))


def decoded(data: bytes, code: str, n: int) -> np.ndarray:
    return np.frombuffer(data, np.float64) if code == "F64" else XP.load(data, code, (n,))


def run(
    op: Op, params: Any, raw: list[bytes], codes: list[str], shape: tuple[int, ...], xp: Any = XP
) -> tuple[np.ndarray, str]:
    """The op's output tensor "w" over inputs given as bytes stored as `codes`, by the real pipeline."""
    sources = [BytesSource({"w": r}) for r in raw]
    specs = tuple({"w": TensorSpec(c, shape)} for c in codes)
    node = op.spec(InputSpecs(tuple(f"m{i}" for i in range(len(raw))), specs), params)
    collector = Collector()
    Pipeline(op, keyed(op, params, node), list(sources), specs, xp).run(collector, node, lambda k, n: None)
    code = node.tensors["w"].dtype
    return decoded(collector.joined()["w"], code, int(np.prod(shape))), code


def misaligned(array: np.ndarray, offset: int) -> np.ndarray:
    raw = array.view(np.uint8).reshape(-1)
    buffer = np.zeros(raw.size + offset, np.uint8)
    buffer[offset:] = raw
    return np.frombuffer(buffer.data, array.dtype, count=array.size, offset=offset)


def random_stored(rng: np.random.Generator, n: int, code: int) -> np.ndarray:
    """Values near 0.02 in scale, a third of them any 16-bit pattern (signalling NaNs, subnormals, -0, inf)."""
    if code == 0:
        values = (rng.standard_normal(n) * 0.02).astype(np.float32)
        odd = rng.random(n) < 0.1
        values[odd] = rng.integers(0, 1 << 16, int(odd.sum()), dtype=np.uint16).view(np.float16).astype(np.float32)
        return values
    near = rng.standard_normal(n) * 0.02
    bits = near.astype(np.float16).view(np.uint16) if code == 1 else (near.astype(np.float32).view(np.uint32) >> 16)
    bits = bits.astype(np.uint16)
    odd = rng.random(n) < 0.3
    bits[odd] = rng.integers(0, 1 << 16, int(odd.sum()), dtype=np.uint16)
    return bits.view(np.float16) if code == 1 else bits.view(BF16_STORED)


# --- the compiled loops on stored inputs give the float32 path's bits ---------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_histograms_of_stored_inputs_equal_the_widened_ones(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (0, 1, 7, 1023, 1025, 3001):
        code, minus_code = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        values, minus = random_stored(rng, n, code), random_stored(rng, n, minus_code)
        values, minus = misaligned(values, int(rng.integers(0, 4))), misaligned(minus, int(rng.integers(0, 4)))
        wide_values, wide_minus = XP.widen(values), XP.widen(minus)
        bits = (wide_values - wide_minus).view(np.uint32) & 0x7FFFFFFF
        window = min(int(bits[0] >> 16) if n else 0, BINS - 2)
        countings = [(16, window, minus, None, 0, False)]
        countings += [(0, 0, minus, np.zeros(2 * BINS, np.int64), window, coarse) for coarse in (False, True)]
        for counting in countings:
            got, want = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
            wide_fine = None if counting[3] is None else np.zeros(2 * BINS, np.int64)
            XP.magnitude_histogram(values, got, counting)
            wide_counting = (*counting[:2], wide_minus, wide_fine, counting[4], counting[5])
            magnitudes.numpy_histogram(wide_values, want, wide_counting, None)
            assert np.array_equal(got, want), (n, code, minus_code)
            assert wide_fine is None or np.array_equal(counting[3], wide_fine)


@pytest.mark.parametrize("seed", range(6))
def test_election_of_stored_inputs_equals_the_array_maths(seed: int) -> None:
    """Random codes, kinds, ties at the cut over blocks of 1024, NaN payloads, misaligned buffers."""
    rng = np.random.default_rng(seed)
    for n in (1, 7, 1023, 1025, 2500):
        count = int(rng.choice([1, 2, 3]))
        base = (rng.standard_normal(n) * 0.02).astype(np.float32)
        finetunes = [base + rng.integers(-2, 3, n).astype(np.float32) * np.float32(2**-9) for _ in range(count)]
        codes = [int(rng.integers(0, 3)) for _ in range(count + 1)]
        stored = []
        for array, code in zip([base, *finetunes], codes, strict=True):
            array[rng.random(n) < 0.02] = np.nan
            name = ("F32", "F16", "BF16")[code]
            held = array if code == 0 else XP.load(XP.store(array, name), name, (n,), widen=False)
            stored.append(misaligned(held, int(rng.integers(0, 3))))
        wide = [XP.widen(a) for a in stored]
        steps = []
        for k in range(count):
            kind = int(rng.choice([CUT, CUT, MASKED, PLAIN, ZEROED]))
            bits = (wide[k + 1] - wide[0]).view(np.uint32) & 0x7FFFFFFF
            cut = int(rng.choice(bits))
            mask = rng.random(n) < 0.5 if kind == MASKED else None
            steps.append(Step(kind, mask, cut, int(rng.integers(0, int((bits == cut).sum()) + 2)), 0.3, 0.0))
        weights = [float(w) for w in rng.choice([1.0, -0.5, 0.7], count)]
        params: Any = TiesParams(base="m0", weights=weights, consensus="count", normalize=True, scale=0.8)
        for_array = [Step(s.kind, s.mask, s.cut, s.ties, s.divide, s.multiply) for s in steps]
        want = Ties()._merged(wide[0], wide[1:], for_array, weights, params, XP)
        elected = [(m, *s.fused(), w) for m, s, w in zip(stored[1:], steps, weights, strict=True)]
        got = XP.elect(stored[0], elected, 2, True, 0.8)
        assert got is not None
        assert np.array_equal(got[0].view(np.uint32), np.asarray(want).view(np.uint32)), (n, codes)
        assert got[1] == [s.ties for s in for_array]


def test_wrong_codes_and_lengths_raise_value_error() -> None:
    assert floatconv is not None
    src, counts = np.ones(10, np.float16), np.zeros(BINS, np.int64)
    for args in [(-1, 0), (3, 0), (1, -1), (1, 3)]:
        with pytest.raises(ValueError):
            floatconv.magnitude_hist16(src, counts, -1, src, None, 0, *args)
    with pytest.raises(ValueError):  # float32 bytes read as float16 are twice as many elements as minus has
        floatconv.magnitude_hist16(np.ones(10, np.float32), counts, -1, src, None, 0, 1, 1)
    base, out = np.ones(10, np.float32), np.empty(10, np.float32)

    def model(array: Any, kind: int = 0, mask: Any = None, *code: int) -> tuple[Any, ...]:
        return (array, kind, mask, 0, 0, 0.0, 0.0, 1.0, *code)

    for models, base_code in [
        ([model(base)], 3), ([model(base)], -1), ([model(base, 0, None, 3)], 0), ([model(base, 0, None, -1)], 0),
        ([model(src)], 0), ([model(base, 0, None, 1)], 0), ([model(base, 1, np.ones(9, bool))], 0),
        ([model(base)] * 33, 0), ([], 0),
    ]:  # fmt: skip
        with pytest.raises(ValueError):
            floatconv.elect(base, out, models, 1, True, 1.0, base_code)
    with pytest.raises(ValueError):
        floatconv.elect(src, out, [model(base)], 1, True, 1.0, 0)  # a float16 base read as float32


@pytest.mark.parametrize("step", [1, 7, 1023, 1025, 1537])
@pytest.mark.parametrize("codes", [("F16",) * 3, ("BF16",) * 3, ("F32", "BF16", "F16")])
def test_ties_at_the_cut_across_odd_chunks_equal_the_float32_path(
    step: int, codes: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(op_inputs, "chunk_elements", lambda specs, stream=False: step)
    rng = np.random.default_rng(step)
    shape = (23, 97)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    inputs = [base, *(base + rng.integers(-3, 4, shape).astype(np.float32) * np.float32(2**-9) for _ in range(2))]
    raw = [encoded(a, c) for a, c in zip(inputs, codes, strict=True)]
    wide = [decoded(r, c, base.size).reshape(shape) for r, c in zip(raw, codes, strict=True)]
    for density in (0.2, 0.55):
        params = TiesParams(base="m0", density=density, weights=[1.0, 0.5])
        got, code = run(Ties(), params, raw, list(codes), shape)
        f32, _ = run(Ties(), params, [w.tobytes() for w in wide], ["F32"] * 3, shape)
        want = ref.task_vectors(
            "w", wide[0], wide[1:], how="magnitude", elects=True, weights=[1.0, 0.5], densities=[density] * 2,
            normalize=True,
        )  # fmt: skip
        assert np.array_equal(f32, want.reshape(-1).astype(np.float32))
        assert np.array_equal(got.view(np.uint8), decoded(encoded(f32, code), code, f32.size).view(np.uint8))


@pytest.mark.parametrize("code", ["F16", "BF16"])
def test_signalling_nans_and_subnormals_as_stored_equal_numpy_s_widening(
    code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw 16-bit patterns (signalling NaNs, which F16C quiets, subnormals, -0) in all three inputs: the stored
    path's output is that of numpy without merger's loops (which keeps a signalling NaN's bits)."""
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1024)
    rng = np.random.default_rng(2)
    n = 4000
    near = rng.standard_normal(n) * 0.02
    base = near.astype(np.float16).view(np.uint16) if code == "F16" else near.astype(np.float32).view(np.uint32) >> 16
    signalling = 0x7C01 if code == "F16" else 0x7F81
    raw = []
    for k in range(3):
        bits = (base.astype(np.int64) + (rng.integers(-3, 4, n) if k else 0)).astype(np.uint16)
        odd = rng.random(n) < 0.05
        specials = np.array([signalling, signalling | 0x8000, signalling + 5, 0x0001, 0x8001, 0x8000], np.uint16)
        bits[odd] = rng.choice(specials, int(odd.sum()))
        raw.append(bits.tobytes())
    params, codes = DareTiesParams(base="m0", density=0.5, seed=4, weights=[1.0, 0.5]), [code] * 3
    got, _ = run(DareTies(), params, raw, codes, (n,))
    monkeypatch.setattr(arrays, "FLOATCONV", None)
    plain, _ = run(DareTies(), params, raw, codes, (n,))
    assert np.array_equal(got.view(np.uint16), plain.view(np.uint16))
    monkeypatch.undo()
    params_ties = TiesParams(base="m0", density=0.4, weights=[1.0, 0.5])
    got, _ = run(Ties(), params_ties, raw, codes, (n,))
    monkeypatch.setattr(arrays, "FLOATCONV", None)
    assert np.array_equal(got.view(np.uint16), run(Ties(), params_ties, raw, codes, (n,))[0].view(np.uint16))


# --- the type stub, mixed widths, tiny densities, the window ---------------------------------------------


def test_type_stub_declares_the_stored_codes() -> None:
    """merger/core/_floatconv.pyi declares the stored codes: magnitude_hist16's src_code and minus_code,
    elect's base_code (and a ninth element per model), and both's tier, so that mypy takes typed calls
    with them."""
    stub = ast.parse((Path(arrays.__file__).parent / "_floatconv.pyi").read_text())
    functions = {f.name: f for f in stub.body if isinstance(f, ast.FunctionDef)}
    hist = [a.arg for a in functions["magnitude_hist16"].args.posonlyargs]
    elect = [a.arg for a in functions["elect"].args.posonlyargs]
    assert hist == ["src", "counts", "high", "minus", "fine", "window", "src_code", "minus_code", "tier"]
    assert elect == ["base", "out", "models", "consensus", "normalize", "scale", "base_code", "tier"]


def family16(shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float16).astype(np.float32)
    noise = [rng.standard_normal(shape).astype(np.float32) * 0.002 for _ in range(2)]
    return [base, *((base + e).astype(np.float16).astype(np.float32) for e in noise)]


def test_ties_of_a_float64_base_and_16_bit_models_does_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 base with float16 models: the deltas are float64, so the histograms count 64-bit patterns
    (they counted the wrong 16 bits of them, taking the width from the model's dtype, and the second pass
    found fewer than k: IndexError in merger.ops.topk.top_bin)."""
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1024)
    inputs, codes, shape = family16((60, 70), 3), ["F64", "F16", "F16"], (60, 70)
    raw = [encoded(a, c) for a, c in zip(inputs, codes, strict=True)]
    got, _ = run(Ties(), TiesParams(base="m0", density=0.3), raw, codes, shape)
    wide = [decoded(r, c, inputs[0].size).astype(np.float64).reshape(shape) for r, c in zip(raw, codes, strict=True)]
    want = ref.task_vectors(
        "w", wide[0], wide[1:], how="magnitude", elects=True, weights=[1.0, 1.0], densities=[0.3] * 2, normalize=True
    )
    assert np.array_equal(got, want.reshape(-1))


def test_ties_of_a_float32_base_and_a_float64_model_keeps_its_top_density(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A float32 base with a float64 model: the cut is found over the deltas' 64-bit patterns (over 32 bits,
    taken from the base's dtype, every 64-bit pattern exceeded it, and density 0.3 kept all 4200 deltas)."""
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1024)
    rng = np.random.default_rng(5)
    shape = (60, 70)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    model = base.astype(np.float64) + rng.standard_normal(shape) * 0.002
    got, _ = run(Ties(), TiesParams(base="m0", density=0.3), [base.tobytes(), model.tobytes()], ["F32", "F64"], shape)
    kept = int(np.sum(got != base.reshape(-1)))
    assert kept == int(0.3 * base.size)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("aimed", [True, False], ids=["aimed", "two-level"])
def test_ties_of_float32_and_float64_models_over_a_float32_base_equals_the_reference(
    monkeypatch: pytest.MonkeyPatch, backend: str, aimed: bool
) -> None:
    """Each model's cut is over its own deltas' patterns: 64 bits for the float64 model, 32 for the float32
    one (all were cut over 64 where any input was float64: the float32 model's histogram raised
    OverflowError, or its trim was wrong, on 23,220 of 53,033 elements; found by an attack round)."""
    import merger.ops.task_vectors as task_vectors
    from merger.core.arrays import TorchBackend

    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1024)
    monkeypatch.setattr(task_vectors, "AIMED", 0 if aimed else 1 << 40)
    monkeypatch.setattr(task_vectors, "SAMPLE_RUN", 512)
    rng = np.random.default_rng(0)
    shape = (181, 293)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    wide = base.astype(np.float64) + rng.standard_normal(shape) * 0.002
    narrow = base + (rng.standard_normal(shape) * 0.002).astype(np.float32)
    xp = XP if backend == "numpy" else TorchBackend("cpu")
    raw = [base.tobytes(), wide.tobytes(), narrow.tobytes()]
    got, _ = run(Ties(), TiesParams(base="m0", density=0.5), raw, ["F32", "F64", "F32"], shape, xp)
    want = ref.task_vectors(
        "w", base, [wide, narrow], how="magnitude", elects=True, weights=[1.0, 1.0], densities=[0.5, 0.5],
        normalize=True,
    )  # fmt: skip
    assert np.allclose(got.astype(np.float64), want.reshape(-1), rtol=0, atol=1e-6)


def test_dare_ties_of_a_density_below_float32_s_least_equals_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DARE's `divide` is the density: one that float32 rounds to 0 (1e-46) is left to the array maths, which
    divides by it as the reference does (the compiled election, where a factor of 0 means none, skipped it)."""
    monkeypatch.setattr(pieces_module, "PIECE_BYTES", 1024)
    rng = np.random.default_rng(0)
    shape = (30, 40)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    models = [base + (rng.standard_normal(shape) * 0.002).astype(np.float32) for _ in range(2)]
    params = DareTiesParams(base="m0", density=[1e-46, 0.5], seed=1)
    got, _ = run(DareTies(), params, [a.tobytes() for a in (base, *models)], ["F32"] * 3, shape)
    want = ref.task_vectors(
        "w", base, models, how="random", elects=True, weights=[1.0, 1.0], densities=[1e-46, 0.5], normalize=False,
        seed=1,
    )  # fmt: skip
    assert np.array_equal(got, want.reshape(-1).astype(np.float32))


def test_magnitude_hist16_rejects_a_window_outside_the_bins() -> None:
    """A fine window below 0 or past the bins is refused (-1 wrapped around the unsigned check: taken
    silently, counting nothing)."""
    assert floatconv is not None
    counts, fine = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    with pytest.raises(ValueError):
        floatconv.magnitude_hist16(np.ones(10, np.float32), counts, -1, None, fine, 65536)
    with pytest.raises(ValueError):
        floatconv.magnitude_hist16(np.ones(10, np.float32), counts, -1, None, fine, -1)
