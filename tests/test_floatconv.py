"""The compiled float16/bfloat16 loops (merger.core._floatconv): bit for bit what numpy (float16) and
torch (bfloat16) give, on the CPU's F16C path and on the portable one, and the numpy fallback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import merger.core.arrays as arrays
from merger.core.arrays import NumpyBackend, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16
from merger.core.nonfinite import count_nonfinite

floatconv = arrays.FLOATCONV
compiled = pytest.mark.skipif(floatconv is None, reason="merger.core._floatconv was not built (no C compiler)")
PATHS = [False, True]  # F16C (where the CPU has it), portable C


def every_half() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def hard_floats() -> np.ndarray:
    """Random bit patterns, values around float16's range and subnormals, and exact halfway cases."""
    rng = np.random.default_rng(7)
    random_bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    scaled = rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)
    halves = every_half().view(np.float16).astype(np.float64)
    finite = halves[np.isfinite(halves)]
    ordered = np.unique(finite)
    halfway = (ordered[:-1] + ordered[1:]) / 2  # ties: round to the even one
    edges = [65504, 65519.996, 65520, 65536, 1e9, 2.0**-24, 2.0**-25, 2.0**-26, 3 * 2.0**-26, 6e-8, 0.0, -0.0]
    specials = np.float32([np.inf, -np.inf, np.nan, -np.nan])
    return np.concatenate(
        [random_bits, scaled.astype(np.float32), halfway.astype(np.float32), np.float32(edges), specials]
    )


def same_bits(got: np.ndarray, want: np.ndarray, kind: Any) -> None:
    nan = np.isnan(want.view(kind))
    assert np.array_equal(np.isnan(got.view(kind)), nan)
    bits = {np.float16: np.uint16, np.float32: np.uint32}[kind]
    mismatch = np.flatnonzero(got.view(bits)[~nan] != want.view(bits)[~nan])
    assert mismatch.size == 0, f"{mismatch.size} differ, first at {mismatch[:3]}"


@compiled
@pytest.mark.parametrize("portable", PATHS, ids=["simd", "portable"])
def test_float16_widens_exactly_for_every_value(portable: bool) -> None:
    halves = every_half()
    out = np.empty(halves.size, np.float32)
    floatconv.f16_to_f32(halves, out, portable)
    same_bits(out, halves.view(np.float16).astype(np.float32), np.float32)


@compiled
@pytest.mark.parametrize("portable", PATHS, ids=["simd", "portable"])
def test_float16_narrowing_rounds_as_numpy(portable: bool) -> None:
    values = hard_floats()
    out = np.empty(values.size, np.uint16)
    floatconv.f32_to_f16(values, out, portable)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    same_bits(out, want, np.float16)


def test_bfloat16_both_ways_match_torch() -> None:
    values = hard_floats()
    want = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = f32_to_bf16(values)
    nan = np.isnan(values)
    assert np.array_equal(got[~nan], want[~nan]) and (got[nan] == 0x7FC0).all()
    assert np.array_equal(got, f32_to_bf16(values, compiled=False))
    raw = every_half()
    widened = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    same_bits(bf16_to_f32(raw), widened, np.float32)
    same_bits(bf16_to_f32(raw, compiled=False), widened, np.float32)


def test_module_functions_agree_with_numpy_on_both_paths() -> None:
    values = hard_floats()
    for compiled in (True, False):
        with np.errstate(over="ignore"):
            same_bits(f32_to_f16(values, compiled=compiled), values.astype(np.float16), np.float16)
        halves = every_half().view(np.float16)
        same_bits(f16_to_f32(halves, compiled=compiled), halves.astype(np.float32), np.float32)
    doubles = np.array([1 + 2.0**-11 + 2.0**-40], np.float64)  # rounds up once; via float32 it would tie to even
    assert f32_to_f16(doubles)[0] == np.float16(doubles[0])


@pytest.mark.parametrize("code", ["F16", "BF16"])
def test_numpy_backend_gives_the_same_bytes_without_the_extension(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    xp = NumpyBackend()
    values = hard_floats()
    stored = bytes(xp.store(values, code))
    loaded = xp.load(stored, code, (values.size,))
    into = memoryview(bytearray(len(stored)))
    xp.store_into(values, code, into)
    assert bytes(into) == stored
    monkeypatch.setattr(arrays, "FLOATCONV", None)
    bits = np.frombuffer(stored, np.uint16)
    fallback = np.frombuffer(bytes(xp.store(values, code)), np.uint16)
    nan = np.isnan(loaded)  # NaN stays NaN (numpy keeps a float16 NaN's payload unquieted, F16C quiets it)
    assert np.array_equal(fallback[~nan], bits[~nan])
    assert np.array_equal(np.isnan(xp.load(fallback.tobytes(), code, (values.size,))), nan)
    np.testing.assert_array_equal(xp.load(stored, code, (values.size,)), loaded)
    assert count_nonfinite(stored, code) == int((~np.isfinite(loaded)).sum())


@compiled
def test_nonfinite_count_of_16_bit_floats() -> None:
    halves = every_half()
    assert count_nonfinite(halves.tobytes(), "F16") == int((~np.isfinite(halves.view(np.float16))).sum()) == 2048
    assert floatconv.count_masked16(halves, 0x7F80) == 256  # bfloat16: 2 signs x 128 mantissas


@compiled
def test_sizes_that_do_not_match_are_refused() -> None:
    with pytest.raises(ValueError, match="buffer sizes do not match"):
        floatconv.f16_to_f32(np.zeros(4, np.uint16), np.empty(3, np.float32))
    with pytest.raises(ValueError, match="buffer sizes do not match"):
        floatconv.f32_to_bf16(np.zeros(3, np.uint8), np.empty(3, np.uint16))
    with pytest.raises(TypeError):
        floatconv.f16_to_f32(np.zeros(4, np.uint16), b"read-only destination")


@compiled
def test_empty_buffers_convert_to_nothing() -> None:
    floatconv.f16_to_f32(b"", bytearray())
    assert f16_to_f32(b"").size == 0 and NumpyBackend().store(np.zeros(0, np.float32), "F16").nbytes == 0


def test_nonfinite_count_of_float32_with_and_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    values = hard_floats()
    want = int((~np.isfinite(values)).sum())
    assert want > 4 and count_nonfinite(values.tobytes(), "F32") == want
    monkeypatch.setattr(arrays, "FLOATCONV", None)
    assert count_nonfinite(values.tobytes(), "F32") == want


@compiled
@pytest.mark.parametrize("code", ["F16", "BF16", "F32"])
def test_counts_over_many_blocks_are_exact(code: str) -> None:
    """Counts add up in blocks (65,535 16-bit values, whose sum then fills a 16-bit lane): every value
    non-finite, none, and a random share, over lengths around the block's."""
    rng = np.random.default_rng(5)
    size = {"F16": 2, "BF16": 2, "F32": 4}[code]
    for n in (65_534, 65_535, 65_536, 200_001):
        values = rng.standard_normal(n).astype(np.float32)
        values[rng.random(n) < 0.3] = np.inf
        for array in (values, np.full(n, np.nan, np.float32), np.zeros(n, np.float32)):
            if code == "F16":
                raw = array.astype(np.float16).tobytes()
            elif code == "BF16":
                raw = (array.view(np.uint32) >> 16).astype(np.uint16).tobytes()
            else:
                raw = array.tobytes()
            assert len(raw) == n * size
            assert count_nonfinite(raw, code) == int((~np.isfinite(array)).sum()), (n, code)
