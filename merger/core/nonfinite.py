"""Non-finite values (NaN, +-inf): counted per tensor, on the raw bytes of any float dtype.

A merge whose inputs hold NaN, or whose float16 output overflows, gives a
model that looks fine until it is used. Every tensor merger reads from a
source or writes into an entry is counted here; the run warns (or, with
`nonfinite: error`, fails) naming the first tensors and the count, and the
report records them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from merger.errors import MergerError, Where, shown

#: for dtypes without a numpy float type: (bit mask, value): a value is non-finite when bits & mask == value
_BIT_TESTS: dict[str, tuple[str, int, int]] = {
    "BF16": ("u2", 0x7F80, 0x7F80),
    "F8_E5M2": ("u1", 0x7C, 0x7C),
    "F8_E4M3": ("u1", 0x7F, 0x7F),  # float8_e4m3fn: no inf, NaN is S.1111.111
}
_FLOATS = {"F64": "f8", "F32": "f4", "F16": "f2"}
_MASKS_16 = {"F16": 0x7C00, "BF16": 0x7F80}  # the exponent bits: all set is inf or NaN
SHOWN_TENSORS = 3


def _compiled() -> Any:
    """merger's compiled loops (None without them), looked up once a call (cheap for tiny tensors)."""
    arrays = sys.modules.get("merger.core.arrays")
    if arrays is None:
        import merger.core.arrays

        arrays = merger.core.arrays
    return arrays.FLOATCONV


def count_nonfinite(data: Any, code: str) -> int:
    """How many values of dtype `code` in the raw bytes `data` are NaN or infinite (0 for integers)."""
    if not len(data) or (code not in _FLOATS and code not in _BIT_TESTS):
        return 0
    floatconv = _compiled()
    if floatconv is not None and code in _MASKS_16:  # compiled: one pass, no conversion
        return int(floatconv.count_masked16(data, _MASKS_16[code]))
    if floatconv is not None and code == "F32":
        return int(floatconv.count_masked32(data, 0x7F800000))
    import numpy as np

    if code in _FLOATS:
        values = np.frombuffer(data, dtype=_FLOATS[code])
        with np.errstate(invalid="ignore", over="ignore"):
            if np.isfinite(values.sum(dtype=np.float64)):  # fast path: a finite sum has no NaN or inf
                return 0
        return int(values.size - np.count_nonzero(np.isfinite(values)))
    kind, mask, value = _BIT_TESTS[code]
    bits = np.frombuffer(data, dtype=kind)
    return int(np.count_nonzero((bits & mask) == value))


@dataclass
class NonFiniteCounts:
    """Counts per tensor key, filled as chunks go by (from one thread at a time)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, data: Any, code: str) -> int:
        found = count_nonfinite(data, code)
        if found:
            self.counts[key] = self.counts.get(key, 0) + found
        return found

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def describe(counts: Mapping[str, int]) -> str:
    """'12 non-finite values in 2 tensors (first: a.weight 10, b.bias 2)'."""
    total = sum(counts.values())
    first = ", ".join(f"{shown(k)} {n}" for k, n in list(counts.items())[:SHOWN_TENSORS])
    more = ", ..." if len(counts) > SHOWN_TENSORS else ""
    tensors = "tensor" if len(counts) == 1 else "tensors"
    return f"{total} non-finite values (NaN or inf) in {len(counts)} {tensors} (first: {first}{more})"


def nonfinite_error(where: Where, subject: str, key: str, count: int) -> MergerError:
    return MergerError(
        f"{subject}: tensor '{shown(key)}' holds {count} non-finite values (NaN or inf)",
        where=where,
        fix="check the inputs (a diverged checkpoint?) or the parameters (extrapolation, float16 overflow);"
        " nonfinite: warn merges anyway and reports them",
    )
