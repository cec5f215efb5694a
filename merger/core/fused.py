"""Per-key linear maths (merger.ops.base.LinearForm: lerp, weighted sums, averages, add difference)
in one compiled pass over the raw bytes of float16, bfloat16 and float32 inputs (merger.core._fused),
bit for bit what numpy computes for the op's `combine`, without a float32 array per input, a
temporary per step and a conversion of the result.

`combine_linear` returns None where it cannot (no compiled module, a CPU without AVX2 and F16C,
a float64 or float8 input or output): the caller then computes with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def combine_linear(
    inputs: Sequence[tuple[Any, str]],
    kind: Literal["sum", "add_difference"],
    weights: Sequence[float],
    divisor: float | None,
    out_code: str,
    count: int,
) -> memoryview | None:
    """`count` elements of `kind` over the raw `inputs` ((bytes, dtype code) each), as `out_code`
    bytes; None where the compiled loop cannot run."""
    if FUSED is None or out_code not in LETTERS or any(code not in LETTERS for _, code in inputs):
        return None
    import numpy as np  # loaded already when something is computed

    out = np.empty(count * SIZES[out_code], dtype=np.uint8)
    letters = "".join(LETTERS[code] for _, code in inputs)
    buffers = [data for data, _ in inputs]
    if not FUSED.linear(buffers, letters, KINDS[kind], list(weights), divisor, out, LETTERS[out_code]):
        return None
    return memoryview(out.data)
