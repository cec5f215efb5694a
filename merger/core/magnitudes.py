"""The backends' part of TIES streamed over chunks: histograms of magnitudes' bit patterns, the masks
they give, a branch-free select, and the compiled sign election (merger.ops.topk, merger.ops.sparsify
and merger.ops.task_vectors use them through merger.core.arrays' backends).

A float's magnitude |x| orders as its bit pattern read as an unsigned integer (float32: 32 bits,
float64: 64; NaN above inf), and two magnitudes are equal exactly when their patterns are. A
histogram counts one 16-bit digit of those patterns: the top 16 bits of every element, or the next
16 of the elements whose higher bits are a given prefix; two (float32) or four (float64) passes
over a tensor's chunks thus find its k-th largest magnitude exactly, in 65536 counts of memory.

The compiled histograms and election read float16 and bfloat16 chunks as they are stored (`stored_code`;
the numpy backend's `load(..., widen=False)`), widening a block at a time in the CPU's cache: a pass then
moves the stored bytes once, not a float32 copy of twice their size made first. The maths is float32's,
element for element the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

#: counts of a histogram: one per 16-bit digit
BINS = 1 << 16
#: one model of a compiled sign election: (model, kind, mask, cut, ties, divide, multiply, weight); see
#: merger.ops.sparsify.Step and merger.core._floatconv.elect
Elected = tuple[Any, int, Any, int, int, float, float, float]
#: the most models the compiled election takes
ELECT_MAX = 32
#: what a histogram counts (see numpy_histogram): (prefix_bits, prefix, minus, fine, window, coarse)
Counting = tuple[int, int, Any, Any, int, bool]
#: the field of the numpy dtype that holds bfloat16 chunks as stored (merger.core.arrays.BF16_STORED)
BF16_FIELD = "bfloat16"


def stored_code(array: Any) -> int | None:
    """The compiled loops' code of a numpy array's dtype: 0 float32, 1 float16, 2 bfloat16 as stored;
    None for others (float64: numpy's maths)."""
    import numpy as np

    dtype = array.dtype
    if dtype == np.float32:
        return 0
    if dtype == np.float16:
        return 1
    return 2 if dtype.names == (BF16_FIELD,) else None


def _unsigned(values: np.ndarray) -> np.ndarray:
    """|values|'s bit patterns (float32 -> uint32, float64 -> uint64), flat."""
    import numpy as np

    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype == np.float32:
        return flat.view(np.uint32) & np.uint32(0x7FFFFFFF)
    return flat.view(np.uint64) & np.uint64(0x7FFFFFFFFFFFFFFF)


def numpy_histogram(
    values: np.ndarray, counts: np.ndarray, counting: Counting, compiled: Any, widen: Any = None
) -> None:
    """Add to `counts` the next 16-bit digit of the patterns of |values - minus| (of |values|
    without `minus`) after their top `prefix_bits` bits, among the elements whose top bits are
    `prefix` (all of them for prefix_bits 0); with `fine` (prefix_bits 0, float32), also the low
    16 bits of those whose top 16 are in the window of rows `fine` has from `window` on, and with
    `coarse` (and `fine`) the window's only: counts[0] gets the elements below it, counts[1] those
    above, and no digit is counted (a scattered count per element costs most of a pass).
    `compiled`: merger.core._floatconv, or None (numpy's bincount, several times slower); `widen`:
    the backend's, for arrays of 16-bit floats as stored (see `stored_code`)."""
    import numpy as np

    prefix_bits, prefix, minus, fine, window, coarse = counting
    code = stored_code(values)
    minus_code = 0 if minus is None else stored_code(minus)
    if compiled is not None and code is not None and minus_code is not None and prefix_bits in (0, 16):
        high = prefix if prefix_bits else -2 if coarse else -1
        contiguous = None if minus is None else np.ascontiguousarray(minus)
        compiled.magnitude_hist16(
            np.ascontiguousarray(values), counts, high, contiguous, fine, window, code, minus_code
        )
        return
    if widen is not None:
        values, minus = widen(values), None if minus is None else widen(minus)
    deltas = values if minus is None else values - minus  # float64 where either is
    width = deltas.dtype.itemsize * 8
    bits = _unsigned(deltas)
    if fine is not None:
        inside = bits[((bits >> 16) >= window) & ((bits >> 16) < window + len(fine) // BINS)]
        fine += np.bincount((inside - (window << 16)).astype(np.intp), minlength=len(fine))
        if coarse:
            counts[0] += int(np.count_nonzero((bits >> 16) < window))
            counts[1] += int(np.count_nonzero((bits >> 16) >= window + len(fine) // BINS))
            return
    if prefix_bits:
        bits = bits[(bits >> (width - prefix_bits)) == prefix]
    digits = (bits >> (width - prefix_bits - 16)) & 0xFFFF
    counts += np.bincount(digits.astype(np.intp), minlength=BINS)


def numpy_cut_mask(values: np.ndarray, cut: int, ties: int) -> tuple[np.ndarray, int]:
    """(the elements whose magnitude's pattern exceeds `cut`, with the first `ties` of those equal to
    it in C order; how many equal ones were marked), flat."""
    import numpy as np

    bits = _unsigned(values)
    mask = bits > cut
    if ties <= 0:
        return mask, 0
    equal = np.flatnonzero(bits == cut)[:ties]
    mask[equal] = True
    return mask, len(equal)


def numpy_keep(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`numpy.where(mask, values, 0.0)`, bit for bit, by masking bits: numpy's where branches per
    element, about 6 ns each on a random mask, this about 1."""
    import numpy as np

    flat = np.ascontiguousarray(values).reshape(-1)
    unsigned = np.uint32 if flat.dtype == np.float32 else np.uint64
    select = mask.reshape(-1).astype(unsigned)
    np.negative(select, out=select)  # True -> all ones, False -> 0
    np.bitwise_and(select, flat.view(unsigned), out=select)
    return select.view(flat.dtype).reshape(values.shape)


def numpy_elect(
    base: np.ndarray, models: Sequence[Elected], consensus: int, normalize: bool, scale: float, compiled: Any
) -> tuple[np.ndarray, list[int]] | None:
    """The compiled sign election of float32 arrays, or of 16-bit floats as stored (None: float64, too
    many models, or no compiled loops); the merged block is float32."""
    import numpy as np

    if compiled is None or not 0 < len(models) <= ELECT_MAX:
        return None
    base_code, codes = stored_code(base), [stored_code(m[0]) for m in models]
    if base_code is None or None in codes:
        return None
    for _, _, _, _, _, divide, multiply, _ in models:  # a factor of 0 is none to the compiled loop
        if any(factor != 0.0 and np.float32(factor) == 0.0 for factor in (divide, multiply)):
            return None  # one that float32 rounds to 0: the array maths divides by it
    out = np.empty(base.shape, dtype=np.float32)
    elected = [(np.ascontiguousarray(m[0]), *m[1:], code) for m, code in zip(models, codes, strict=True)]
    ties = compiled.elect(np.ascontiguousarray(base), out, elected, consensus, normalize, scale, base_code)
    return out, ties


def _torch_unsigned(values: torch.Tensor) -> torch.Tensor:
    import torch

    flat = values.contiguous().reshape(-1)
    if flat.dtype == torch.float32:
        return flat.view(torch.int32) & 0x7FFFFFFF
    return flat.view(torch.int64) & 0x7FFFFFFFFFFFFFFF


def torch_histogram(values: torch.Tensor, counts: np.ndarray, counting: Counting) -> None:
    """`numpy_histogram` on a torch device (the counts come back to the host)."""
    import torch

    prefix_bits, prefix, minus, fine, window, coarse = counting
    width = values.element_size() * 8
    bits = _torch_unsigned(values if minus is None else values - minus)
    if fine is not None:
        inside = bits[((bits >> 16) >= window) & ((bits >> 16) < window + len(fine) // BINS)]
        fine += torch.bincount((inside - (window << 16)).to(torch.int64), minlength=len(fine)).cpu().numpy()
        if coarse:
            counts[0] += int(torch.count_nonzero((bits >> 16) < window))
            counts[1] += int(torch.count_nonzero((bits >> 16) >= window + len(fine) // BINS))
            return
    if prefix_bits:
        bits = bits[(bits >> (width - prefix_bits)) == prefix]
    digits = (bits >> (width - prefix_bits - 16)) & 0xFFFF
    counts += torch.bincount(digits.to(torch.int64), minlength=BINS).cpu().numpy()


def torch_cut_mask(values: torch.Tensor, cut: int, ties: int) -> tuple[torch.Tensor, int]:
    """`numpy_cut_mask` on a torch device."""
    import torch

    bits = _torch_unsigned(values)
    mask = bits > cut
    if ties <= 0:
        return mask, 0
    equal = torch.nonzero(bits == cut).reshape(-1)[:ties]
    mask[equal] = True
    return mask, int(equal.numel())
