"""TIES's compiled loops (merger/core/_ties.c) against their numpy forms, on the paths that
tests/test_streaming.py's small chunks do not reach: histograms of long arrays (the fine window's
elements picked eight at a time), of float16 and bfloat16 read as stored, and the two-model sign
election (one loop per block), with every option, non-finite values and ties at the cut; bit for bit,
in each tier of loops the CPU runs (AVX-512, AVX2, portable C)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merger.core import arrays, magnitudes
from merger.core.arrays import NumpyBackend
from merger.ops.sparsify import CUT, MASKED, PLAIN, ZEROED, Step
from merger.ops.task_vectors import Ties, TiesParams
from merger.ops.topk import BINS

floatconv = arrays.FLOATCONV
pytestmark = [
    pytest.mark.skipif(floatconv is None, reason="merger's compiled loops are not built"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),  # inf * 0 in the array maths
]


class Tiered:
    """The compiled module with its TIES loops held to one tier (their last argument)."""

    def __init__(self, tier: int) -> None:
        self.tier = tier

    def __getattr__(self, name: str) -> Any:
        return getattr(floatconv, name)

    def magnitude_hist16(self, *args: Any) -> None:
        defaults = (None, None, 0, 0, 0)  # minus, fine, window, src_code, minus_code
        floatconv.magnitude_hist16(*args, *defaults[len(args) - 3 :], self.tier)

    def elect(self, *args: Any) -> list[int]:
        result: list[int] = floatconv.elect(*args, *(0,)[len(args) - 6 :], self.tier)  # base_code
        return result


TIERS = [0, 1, 2]


@pytest.fixture(autouse=True, params=TIERS, ids=["portable", "avx2", "avx512"])
def tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every test here runs with the loops of each tier the CPU has (the others are skipped)."""
    if floatconv is None or request.param > floatconv.simd():
        pytest.skip("the CPU lacks this tier's instructions")
    tiered = Tiered(request.param)
    monkeypatch.setattr(arrays, "FLOATCONV", tiered)
    return tiered


def family(n: int, count: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and `count` models near it, float32 on float16's grid (many equal magnitudes), with NaN, inf,
    -0 and subnormal deltas."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(n) * 0.02).astype(np.float16).astype(np.float32)
    base[5::991] = base[7::983] = 0.0
    models = []
    for i in range(count):
        model = (base + rng.standard_normal(n).astype(np.float32) * 0.002).astype(np.float16).astype(np.float32)
        model[i::1009] = np.nan
        model[3 + i :: 997] = -np.inf
        model[5::991], model[7::983] = -0.0, np.float32(1e-40)
        models.append(model)
    return base, models


def deltas(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(model, base): see `family`."""
    base, (model,) = family(n, 1, seed)
    return model, base


WINDOWS = [(6, 15109), (3, 32703), (2, 32639), (8, 0)]  # on NaN, inf, 0


@pytest.mark.parametrize("n", [1000, 300_003])  # one block and a rest, many blocks
@pytest.mark.parametrize("minus", [True, False], ids=["delta", "values"])
@pytest.mark.parametrize(
    ("rows", "window", "coarse"),  # counting every bin, or the window's only
    [(0, 0, False), *((rows, window, coarse) for rows, window in WINDOWS for coarse in (False, True))],
)
def test_first_pass_histogram_equals_numpy(
    n: int, minus: bool, rows: int, window: int, coarse: bool, tier: Tiered
) -> None:
    model, base = deltas(n, seed=n + rows)
    subtract = base if minus else None
    compiled, plain = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    compiled[::7] = plain[::7] = 3  # counts are added to
    fine = np.zeros(rows * BINS, np.int64) if rows else None
    plain_fine = None if fine is None else fine.copy()
    tier.magnitude_hist16(model, compiled, -2 if coarse else -1, subtract, fine, window)
    magnitudes.numpy_histogram(model, plain, (0, 0, subtract, plain_fine, window, coarse), None)
    assert np.array_equal(compiled, plain)
    if fine is not None:
        assert plain_fine is not None and np.array_equal(fine, plain_fine) and fine.sum() > 0
    if coarse:  # how many lie below the window and above it, and no digit's count
        high = ((model - base if minus else model).view(np.uint32) & 0x7FFFFFFF) >> 16
        assert compiled[0] == 3 + np.count_nonzero(high < window)
        assert compiled[1] == np.count_nonzero(high >= window + rows)
        assert np.array_equal(compiled[2:], np.where(np.arange(2, BINS) % 7 == 0, 3, 0))


@pytest.mark.parametrize("n", [1000, 300_003])
def test_second_pass_histogram_equals_numpy(n: int, tier: Tiered) -> None:
    model, base = deltas(n, seed=3)
    high = int(np.bincount(((model - base).view(np.uint32) & 0x7FFFFFFF) >> 16).argmax())
    compiled, plain = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    tier.magnitude_hist16(model, compiled, high, base)
    magnitudes.numpy_histogram(model, plain, (16, high, base, None, 0, False), None)
    assert np.array_equal(compiled, plain) and compiled.sum() > 0


def steps_for(models: list[np.ndarray], base: np.ndarray, kinds: list[int]) -> list[Step]:
    """A step of each kind; CUT at the most common magnitude, with some of its ties to keep."""
    steps = []
    for i, (model, kind) in enumerate(zip(models, kinds, strict=True)):
        bits = (model - base).view(np.uint32) & 0x7FFFFFFF
        cut = int(np.bincount(bits[bits < 0x7F800000] >> 8).argmax()) << 8
        cut = int(bits[(bits >> 8) == (cut >> 8)][0])
        mask = np.random.default_rng(i).random(len(base)) < 0.6
        steps.append(Step(kind, mask=mask if kind == MASKED else None, cut=cut, ties=int((bits == cut).sum()) // 2 + i))
    return steps


def copied(steps: list[Step]) -> list[Step]:
    return [Step(s.kind, s.mask, s.cut, s.ties, s.divide, s.multiply) for s in steps]


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("kinds", [(CUT, CUT, CUT), (CUT, MASKED, PLAIN), (ZEROED, CUT, MASKED)])
@pytest.mark.parametrize(
    ("consensus", "normalize", "scale", "scaling"),
    [("sum", True, 1.0, False), ("count", True, 0.8, True), ("sum", False, 1.3, False), ("count", False, 1.0, True)],
)
def test_compiled_election_equals_the_array_maths(
    count: int, kinds: tuple[int, ...], consensus: str, normalize: bool, scale: float, scaling: bool
) -> None:
    n = 5000  # blocks of 1024 and a rest
    base, models = family(n, count, seed=10)
    weights = [1.0, -0.5, 0.7][:count]
    steps = steps_for(models, base, list(kinds[:count]))
    if scaling:
        for step in steps:
            step.divide, step.multiply = 0.3, 1.7
    params: Any = TiesParams(base="m0", weights=weights, consensus=consensus, normalize=normalize, scale=scale)
    for_array = copied(steps)
    xp = NumpyBackend()
    want = Ties()._merged(base, models, for_array, weights, params, xp)
    fused = [(m, *s.fused(), w) for m, s, w in zip(models, steps, weights, strict=True)]
    elected = xp.elect(base, fused, 1 if consensus == "sum" else 2, normalize, scale)
    assert elected is not None
    got, ties = elected
    assert np.array_equal(got.view(np.uint32), np.asarray(want).view(np.uint32))
    assert ties == [s.ties for s in for_array]  # what is left to keep of each cut's ties


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    levels=st.integers(1, 6),
    share=st.floats(0.0, 1.2),
    seed=st.integers(0, 2**16),
)
def test_ties_at_the_cut_are_the_first_in_c_order(n: int, levels: int, share: float, seed: int) -> None:
    """Deltas of a few magnitudes only (so blocks of 1024 hold many equal to the cut, fewer or more than
    the ties left): the election keeps exactly the first `ties` equal ones, as the array maths does."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(n) * 0.02).astype(np.float16).astype(np.float32)
    steps = rng.integers(-levels, levels + 1, n).astype(np.float32) * np.float32(2**-10)
    model = base + steps
    bits = (model - base).view(np.uint32) & 0x7FFFFFFF
    cut = int(rng.choice(bits))
    ties = int(share * int((bits == cut).sum()))
    step = Step(CUT, cut=cut, ties=ties)
    params: Any = TiesParams(base="m0", weights=[1.0])
    xp = NumpyBackend()
    for_array = copied([step])
    want = Ties()._merged(base, [model], for_array, [1.0], params, xp)
    elected = xp.elect(base, [(model, *step.fused(), 1.0)], 1, True, 1.0)
    assert elected is not None
    got, left = elected
    assert np.array_equal(got.view(np.uint32), np.asarray(want).view(np.uint32))
    assert left == [for_array[0].ties] == [max(0, ties - int((bits == cut).sum()))]


def as_stored(values: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """(values rounded to `code` as the numpy backend holds them stored, the same widened to float32)."""
    xp = NumpyBackend()
    if code == "F32":
        return values, values
    raw = xp.store(values, code)
    stored = xp.load(raw, code, (len(values),), widen=False)
    return stored, xp.widen(stored)


@pytest.mark.parametrize(("code", "minus_code"), [("F16", "F16"), ("BF16", "BF16"), ("F16", "F32"), ("F32", "BF16")])
@pytest.mark.parametrize("high", [False, True], ids=["first", "second"])
def test_histograms_of_16_bit_floats_read_as_stored_equal_those_of_them_widened(
    code: str, minus_code: str, high: bool
) -> None:
    model, base = deltas(70_001, seed=4)
    values, wide_values = as_stored(model, code)
    minus, wide_minus = as_stored(base, minus_code)
    assert values.dtype != np.float32 or minus.dtype != np.float32  # the stored path is taken
    bits = (wide_values - wide_minus).view(np.uint32) & 0x7FFFFFFF
    top = int(np.bincount(bits[bits < 0x7F800000] >> 16).argmax())
    counting = (16, top, minus, None, 0, False) if high else (0, 0, minus, np.zeros(3 * BINS, np.int64), top - 1, True)
    wide_fine = None if high else np.zeros(3 * BINS, np.int64)
    wide_counting = (counting[0], counting[1], wide_minus, wide_fine, counting[4], counting[5])
    got, want = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    NumpyBackend().magnitude_histogram(values, got, counting)
    magnitudes.numpy_histogram(wide_values, want, wide_counting, None)
    assert np.array_equal(got, want) and got.sum() > 0
    if not high:
        assert np.array_equal(counting[3], wide_counting[3]) and counting[3].sum() > 0


@pytest.mark.parametrize("codes", [("F16",) * 3, ("BF16",) * 3, ("F32", "F16", "BF16"), ("BF16", "F32", "F16")])
def test_election_of_16_bit_floats_read_as_stored_equals_that_of_them_widened(codes: tuple[str, ...]) -> None:
    base, models = family(9000, 2, seed=12)
    stored = [as_stored(array, code) for array, code in zip([base, *models], codes, strict=True)]
    wide = [w for _, w in stored]
    steps = steps_for(wide[1:], wide[0], [CUT, MASKED])
    xp = NumpyBackend()
    for_wide = copied(steps)
    want = xp.elect(
        wide[0], [(m, *s.fused(), w) for m, s, w in zip(wide[1:], for_wide, [1.0, 0.6], strict=True)], 1, True, 1.0
    )
    got = xp.elect(
        stored[0][0],
        [(m, *s.fused(), w) for (m, _), s, w in zip(stored[1:], steps, [1.0, 0.6], strict=True)],
        1,
        True,
        1.0,
    )
    assert want is not None and got is not None
    assert got[0].dtype == np.float32 and np.array_equal(got[0].view(np.uint32), want[0].view(np.uint32))
    assert got[1] == want[1]
