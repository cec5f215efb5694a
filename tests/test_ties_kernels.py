"""TIES's compiled loops (merger/core/_floatconv.c) against their numpy forms, on the paths that
tests/test_streaming.py's small chunks do not reach: histograms of long arrays (counted in sub-histograms,
the fine window's elements picked eight at a time) and the two-model sign election (one loop per block),
with every option, non-finite values and ties at the cut; bit for bit."""

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


@pytest.mark.parametrize("n", [1000, 1_050_003])  # below and above the length counted in sub-histograms
@pytest.mark.parametrize("minus", [True, False], ids=["delta", "values"])
@pytest.mark.parametrize(("rows", "window"), [(0, 0), (6, 15109), (3, 32703), (2, 32639), (8, 0)])  # NaN, inf, 0
def test_first_pass_histogram_equals_numpy(n: int, minus: bool, rows: int, window: int) -> None:
    model, base = deltas(n, seed=n + rows)
    subtract = base if minus else None
    compiled, plain = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    compiled[::7] = plain[::7] = 3  # counts are added to
    fine = np.zeros(rows * BINS, np.int64) if rows else None
    plain_fine = None if fine is None else fine.copy()
    floatconv.magnitude_hist16(model, compiled, -1, subtract, fine, window)
    magnitudes.numpy_histogram(model, plain, (0, 0, subtract, plain_fine, window), None)
    assert np.array_equal(compiled, plain)
    if fine is not None:
        assert plain_fine is not None and np.array_equal(fine, plain_fine) and fine.sum() > 0


@pytest.mark.parametrize("n", [1000, 300_003])
def test_second_pass_histogram_equals_numpy(n: int) -> None:
    model, base = deltas(n, seed=3)
    high = int(np.bincount(((model - base).view(np.uint32) & 0x7FFFFFFF) >> 16).argmax())
    compiled, plain = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    floatconv.magnitude_hist16(model, compiled, high, base)
    magnitudes.numpy_histogram(model, plain, (16, high, base, None, 0), None)
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
