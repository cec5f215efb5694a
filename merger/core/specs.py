"""What a model looks like without its data: keys, shapes and dtypes.

Specs come from file headers (or the source memo), so the planner can check a
whole merge before any tensor is read. Dtypes are safetensors' codes ("F32",
"BF16", ...); this module never imports torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from merger.errors import shown

#: safetensors dtype code -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def compute_code(code: str) -> str:
    """The dtype float maths runs in for a stored dtype."""
    return "F64" if code == "F64" else "F32" if code in FLOAT_DTYPES else code


#: names users write in recipes (output dtype) -> safetensors code
DTYPE_NAMES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's dtype (safetensors code) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @functools.cached_property
    def numel(self) -> int:  # cached: read per key by the planner, the pipeline and the writer
        return math.prod(self.shape)

    @functools.cached_property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


#: an ordered mapping key -> TensorSpec (the order is the order tensors are produced in)
ModelSpec = Mapping[str, TensorSpec]


def total_bytes(spec: ModelSpec) -> int:
    return sum(t.nbytes for t in spec.values())


def total_params(spec: ModelSpec) -> int:
    return sum(t.numel for t in spec.values())


def spec_differences(names: Sequence[str], specs: Sequence[ModelSpec]) -> list[str]:
    """Each way models 2..n differ from model 1 in keys or shapes, one line each."""
    first_name, first = names[0], specs[0]
    lines: list[str] = []
    for name, spec in zip(names[1:], specs[1:], strict=True):
        for key, tensor in first.items():
            other = spec.get(key)
            if other is None:
                lines.append(f"'{shown(key)}' is in '{first_name}' {tensor.describe()} but not in '{name}'")
            elif other.shape != tensor.shape:
                lines.append(
                    f"'{shown(key)}' is {list(tensor.shape)} in '{first_name}' but {list(other.shape)} in '{name}'"
                )
        lines.extend(
            f"'{shown(key)}' is in '{name}' {other.describe()} but not in '{first_name}'"
            for key, other in spec.items()
            if key not in first
        )
    return lines
