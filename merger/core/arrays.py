"""Array backends: where tensor maths runs, and how bytes become arrays and back.

- `NumpyBackend` runs on the CPU with numpy, so a CPU merge never imports
  torch (whose import alone costs about 2 s and 600 MB). float16 and bfloat16
  are widened to float32 on load and rounded to nearest even on store (as
  numpy and torch do) by merger's compiled loops (`merger.core._floatconv`,
  F16C/AVX2 where the CPU has them: 10-40x numpy's float16 casts on CPUs
  without AVX512-FP16), or by numpy when the extension was not built.
- `TorchBackend` (merger.core.torch_backend) runs on a torch device (CUDA):
  bytes go through pinned host memory, onto the device asynchronously, and
  back.

Ops see arrays only through operators (`+`, `*`, `+=`) and the methods of the
backend they are given (`xp`), so one op serves both. Float arrays handed to
ops are in the compute dtype (float32, or float64 for float64 inputs);
random numbers always come from numpy's PCG64 on the CPU, so a random op
gives the same result on every device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from merger.core import fused, magnitudes
from merger.core.fused import Fused, LinearForm
from merger.core.magnitudes import Counting, Elected
from merger.core.specs import FLOAT_DTYPES
from merger.core.torch_backend import TorchBackend
from merger.errors import MergerError

try:  # built by setup.py when a C compiler is there; numpy does the same, slower, without it
    from merger.core import _floatconv
except ImportError:  # pragma: no cover - the tests force the numpy path by setting FLOATCONV to None
    _floatconv = None  # type: ignore[assignment]
#: the compiled loops, or None (numpy then)
FLOATCONV = _floatconv

Array = Any  # a numpy.ndarray or a torch.Tensor, by backend

NUMPY_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "BOOL": np.bool_,
}
#: dtypes numpy cannot hold natively but the numpy backend converts exactly
WIDENED = {"BF16": "F32"}
#: bfloat16 as stored, for the compiled loops that widen it themselves (merger.core.magnitudes)
BF16_STORED = np.dtype([(magnitudes.BF16_FIELD, "<u2")])


class Backend(Protocol):
    name: str
    device: str
    #: elements per block of a chunk's elementwise maths (numpy: its temporaries stay in the CPU's
    #: cache, about twice as fast as chunk-sized ones), or None: the whole chunk at once (CUDA)
    block_elements: int | None

    def load(self, data: Any, code: str, shape: tuple[int, ...], *, widen: bool = True) -> Array:
        """An array from raw bytes (C order), floats in the compute dtype, on the device; `widen` False:
        16-bit floats may stay as stored, where the backend's TIES loops read them so (`widen` later)."""
        ...

    def widen(self, array: Array) -> Array:
        """An array of `load(..., widen=False)` in the compute dtype (others as they are)."""
        ...

    def store(self, array: Array, code: str) -> memoryview:
        """The array's bytes in dtype `code`, on the CPU, C order."""
        ...

    def store_into(self, array: Array, code: str, out: memoryview) -> None:
        """`store`, into `out` (exactly the array's bytes in dtype `code`)."""
        ...

    def copy(self, array: Array) -> Array: ...

    def asarray(self, values: np.ndarray) -> Array:
        """A numpy array (e.g. random numbers) moved to this backend."""
        ...

    def repeat(self, array: Array, repeats: int, axis: int) -> Array:
        """Each element repeated `repeats` times along `axis` (numpy.repeat)."""
        ...

    def abs(self, array: Array) -> Array: ...

    def sign(self, array: Array) -> Array: ...

    def where(self, condition: Array, a: Array, b: Array | float) -> Array: ...

    def total(self, array: Array) -> float:
        """The sum of all elements, as a Python float."""
        ...

    def row_sums(self, array: Array) -> Array:
        """Sums over all but the first axis, as a column (rows, 1)."""
        ...

    def keep(self, values: Array, mask: Array) -> Array:
        """`where(mask, values, 0.0)` of a float array, bit for bit (fast on any mask)."""
        ...

    def row_dots(self, a: Array, b: Array) -> np.ndarray:
        """Per row of two (rows, n) float arrays, the sum of a * b as `row_sums` sums it, on the host
        (float64)."""
        ...

    def magnitude_histogram(self, values: Array, counts: np.ndarray, counting: Counting) -> None:
        """Add to `counts` (65536 int64) a 16-bit digit of the bit patterns of |values - minus| (or
        |values|): `counting` is (prefix_bits, prefix, minus, fine, window, coarse), see
        merger.core.magnitudes."""
        ...

    def cut_mask(self, values: Array, cut: int, ties: int) -> tuple[Array, int]:
        """A flat mask of the elements whose magnitude's bit pattern exceeds `cut` and of the first
        `ties` equal to it (C order); and how many equal ones it marked."""
        ...

    def elect(
        self, base: Array, models: Sequence[Elected], consensus: int, normalize: bool, scale: float
    ) -> tuple[Array, list[int]] | None:
        """TIES's sign election in one compiled pass (merger.core._floatconv.elect), or None where
        the backend has none (then the op's array maths runs): the merged block, and each model's
        ties left."""
        ...

    def combine_linear(
        self, inputs: Sequence[tuple[Any, str]], form: LinearForm, out_code: str, count: int, *, nonfinite: bool = False
    ) -> Fused | None:
        """`count` elements of a per-key op's `LinearForm` over raw inputs ((bytes, dtype code) each)
        as `out_code` bytes, in one compiled pass (merger.core.fused), with each input's count of
        non-finite values when `nonfinite`; None where the backend cannot (then `combine` runs)."""
        ...


def bf16_to_f32(raw: np.ndarray, *, compiled: bool = True) -> np.ndarray:
    """bfloat16 bits (uint16) widened to float32, exactly."""
    if compiled and FLOATCONV is not None:
        out = np.empty(raw.shape, dtype=np.float32)
        FLOATCONV.bf16_to_f32(np.ascontiguousarray(raw), out)
        return out
    wide = raw.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def f32_to_bf16(values: np.ndarray, *, compiled: bool = True) -> np.ndarray:
    """Round float32 to bfloat16 bits, to nearest even (NaN stays NaN)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if compiled and FLOATCONV is not None:
        out = np.empty(values.shape, dtype=np.uint16)
        FLOATCONV.f32_to_bf16(values, out)
        return out
    bits = values.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def f16_to_f32(raw: Any, *, compiled: bool = True) -> np.ndarray:
    """float16 bytes widened to float32, exactly: numpy's `astype` gives the same bits, slower (a
    signalling NaN excepted, which the compiled loops quiet, as the CPU's F16C does)."""
    half = np.frombuffer(raw, dtype=np.float16) if not isinstance(raw, np.ndarray) else raw
    if compiled and FLOATCONV is not None:
        out = np.empty(half.shape, dtype=np.float32)
        FLOATCONV.f16_to_f32(np.ascontiguousarray(half), out)
        return out
    return half.astype(np.float32)


def f32_to_f16(values: np.ndarray, *, compiled: bool = True) -> np.ndarray:
    """float32 rounded to float16, to nearest even, overflow to inf: numpy's `astype`, faster (NaN stays
    NaN; the compiled loops quiet a signalling one, numpy keeps its payload as it is)."""
    if compiled and FLOATCONV is not None and values.dtype == np.float32:
        values = np.ascontiguousarray(values)
        out = np.empty(values.shape, dtype=np.float16)
        FLOATCONV.f32_to_f16(values, out)
        return out
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(values, dtype=np.float16)  # float64 rounds once, straight to float16


class NumpyBackend:
    name = "numpy"
    device = "cpu"
    block_elements: int | None = 32 * 1024

    @staticmethod
    def supports(code: str) -> bool:
        return code in NUMPY_DTYPES or code in WIDENED

    def load(self, data: Any, code: str, shape: tuple[int, ...], *, widen: bool = True) -> np.ndarray:
        if not widen and FLOATCONV is not None and code in ("F16", "BF16"):
            return np.frombuffer(data, dtype=np.float16 if code == "F16" else BF16_STORED).reshape(shape)
        if code == "BF16":
            return bf16_to_f32(np.frombuffer(data, dtype=np.uint16)).reshape(shape)
        if code == "F16":
            return f16_to_f32(data).reshape(shape)
        array = np.frombuffer(data, dtype=NUMPY_DTYPES[code]).reshape(shape)
        if code in FLOAT_DTYPES and code not in ("F32", "F64"):
            return array.astype(np.float32)
        return array

    def widen(self, array: np.ndarray) -> np.ndarray:
        if array.dtype == np.float16:
            return f16_to_f32(array)
        if array.dtype == BF16_STORED:
            return bf16_to_f32(array.view(np.uint16))
        return array

    def store(self, array: np.ndarray, code: str) -> memoryview:
        if code == "BF16":
            out = f32_to_bf16(array)
        elif code == "F16":  # an overflow becomes inf, counted by merger.core.nonfinite
            out = f32_to_f16(array)
        elif array.dtype == NUMPY_DTYPES[code]:
            out = np.ascontiguousarray(array)
        else:
            with np.errstate(over="ignore"):  # float64 into float32: an overflow becomes inf, counted too
                out = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code])
        if out.size == 0:  # a tensor with a zero-length dimension
            return memoryview(b"")
        return memoryview(out.reshape(-1).data).cast("B")

    def store_into(self, array: np.ndarray, code: str, out: memoryview) -> None:
        if FLOATCONV is not None and code in ("F16", "BF16") and array.dtype == np.float32:
            convert = FLOATCONV.f32_to_f16 if code == "F16" else FLOATCONV.f32_to_bf16
            convert(np.ascontiguousarray(array).reshape(-1), out)
            return
        stored = self.store(array, code)
        if len(stored) != len(out):
            raise ValueError(f"{len(stored)} bytes for a buffer of {len(out)}")
        out[:] = stored

    def copy(self, array: np.ndarray) -> np.ndarray:
        return array.copy()

    def asarray(self, values: np.ndarray) -> np.ndarray:
        return values

    def repeat(self, array: np.ndarray, repeats: int, axis: int) -> np.ndarray:
        return np.repeat(array, repeats, axis=axis)

    def abs(self, array: np.ndarray) -> Array:
        return np.abs(array)

    def sign(self, array: np.ndarray) -> Array:
        return np.sign(array)

    def where(self, condition: np.ndarray, a: np.ndarray, b: np.ndarray | float) -> Array:
        return np.where(condition, a, b)

    def total(self, array: np.ndarray) -> float:
        return float(array.sum())

    def row_sums(self, array: np.ndarray) -> Array:
        return array.reshape(array.shape[0], -1).sum(axis=1, keepdims=True)

    def keep(self, values: np.ndarray, mask: np.ndarray) -> Array:
        return magnitudes.numpy_keep(values, mask)

    def row_dots(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sums: np.ndarray = np.multiply(a, b).sum(axis=1).astype(np.float64)
        return sums

    def magnitude_histogram(self, values: np.ndarray, counts: np.ndarray, counting: Counting) -> None:
        magnitudes.numpy_histogram(values, counts, counting, FLOATCONV, self.widen)

    def cut_mask(self, values: np.ndarray, cut: int, ties: int) -> tuple[Array, int]:
        return magnitudes.numpy_cut_mask(values, cut, ties)

    def elect(
        self, base: np.ndarray, models: Sequence[Elected], consensus: int, normalize: bool, scale: float
    ) -> tuple[Array, list[int]] | None:
        return magnitudes.numpy_elect(base, models, consensus, normalize, scale, FLOATCONV)

    def combine_linear(
        self, inputs: Sequence[tuple[Any, str]], form: LinearForm, out_code: str, count: int, *, nonfinite: bool = False
    ) -> Fused | None:
        return fused.combine_linear(inputs, form, out_code, count, nonfinite=nonfinite)


def cuda_possible() -> bool:
    """Whether a CUDA device could be there, without importing torch."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")


def select_backend(device: str, dtypes: set[str]) -> Backend:
    """The backend for a run: numpy on the CPU (torch only for dtypes numpy lacks), torch on CUDA."""
    if device == "auto":
        device = "cpu"
        if cuda_possible():
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if all(NumpyBackend.supports(code) for code in dtypes):
            return NumpyBackend()
        return TorchBackend("cpu")
    check_cuda(device)
    return TorchBackend(device)


def check_cuda(device: str) -> None:
    """Fail early when a CUDA device is asked for and torch sees none."""
    import torch

    if not torch.cuda.is_available():
        raise MergerError(
            f"device={device} was asked for, but torch sees no CUDA device",
            where="device",
            fix="use device=auto or device=cpu, or install a CUDA build of torch on a machine with a GPU",
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise MergerError(
            f"device={device} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)",
            where="device",
            fix=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
        )
