"""Per-key linear maths (`LinearForm`, which ops give: lerp, weighted sums, averages, add difference)
in one compiled pass over the raw bytes of float16, bfloat16 and float32 inputs (merger.core._fused),
bit for bit what numpy computes for the op's `combine`, without a float32 array per input, a
temporary per step and a conversion of the result.

`combine_linear` returns None where it cannot (no compiled module, a CPU without AVX2 and F16C,
a float64 or float8 input or output, more than MAX_INPUTS inputs): the caller then computes with
numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

try:
    from merger.core import _fused
except ImportError:  # pragma: no cover - the tests force the numpy path by setting FUSED to None
    _fused = None  # type: ignore[assignment]

FUSED: ModuleType | None = _fused
#: safetensors dtype code -> the compiled loop's letter for it
LETTERS = {"F32": "f", "F16": "h", "BF16": "b"}
SIZES = {"F32": 4, "F16": 2, "BF16": 2}
KINDS = {"sum": 0, "add_difference": 1}
MAX_INPUTS = 64  # the compiled loop's (_fused.c's MAX_INPUTS): an average of more is numpy's


@dataclass(frozen=True)
class LinearForm:
    """A per-key op's maths as float32 steps that a compiled loop can run in one pass over raw
    16- or 32-bit inputs (`combine_linear`), with the same result, bit for bit, as `combine`:

    - kind "sum": `out = x0 * w0; out += xi * wi` (i = 1..), then `out /= divisor` when given;
    - kind "add_difference": `out = x1 - x2; out *= w0; out += x0`;

    every product, sum and quotient rounded to float32 in that order (no fused multiply-add), each
    number rounded to float32 first, as numpy does with a Python float and a float32 array (an
    average's `out = copy(x0); out += xi` is the sum with weights 1: x * 1 is x)."""

    kind: Literal["sum", "add_difference"]
    weights: tuple[float, ...]
    divisor: float | None = None


#: a fused result: the output's bytes, and each input's count of non-finite values (when asked)
Fused = tuple[memoryview, list[int] | None]


def combine_linear(
    inputs: Sequence[tuple[Any, str]], form: LinearForm, out_code: str, count: int, *, nonfinite: bool = False
) -> Fused | None:
    """`count` elements of `form` over the raw `inputs` ((bytes, dtype code) each), as `out_code`
    bytes, with (`nonfinite`) how many NaN or infinite values each input holds, counted in the same
    pass; None where the compiled loop cannot run."""
    kind, weights, divisor = form.kind, form.weights, form.divisor
    if FUSED is None or not inputs or len(inputs) > MAX_INPUTS or out_code not in LETTERS:
        return None
    if any(code not in LETTERS for _, code in inputs):
        return None
    import numpy as np  # loaded already when something is computed

    out = np.empty(count * SIZES[out_code], dtype=np.uint8)
    counts = np.zeros(len(inputs), dtype=np.int64) if nonfinite else None
    letters = "".join(LETTERS[code] for _, code in inputs)
    buffers = [data for data, _ in inputs]
    if not FUSED.linear(buffers, letters, KINDS[kind], list(weights), divisor, out, LETTERS[out_code], counts):
        return None
    return memoryview(out.data), (counts.tolist() if counts is not None else None)
