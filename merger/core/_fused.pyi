"""Types of the compiled linear loop (merger/core/_fused.c); inputs and out are any objects with the
buffer protocol, checked when called."""

from collections.abc import Sequence

def linear(
    inputs: Sequence[object],
    codes: str,
    kind: int,
    weights: Sequence[float],
    divisor: float | None,
    out: object,
    out_code: str,
    counts: object = None,
    /,
) -> bool: ...
