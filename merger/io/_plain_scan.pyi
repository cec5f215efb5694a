"""Types of the compiled header pass (merger/io/_plain_scan.c); raw is any object with the buffer
protocol, checked when called."""

from collections.abc import Callable

from merger.core.specs import TensorSpec

def tiled(
    raw: object,
    start: int,
    stop: int,
    max_entries: int,
    spec_of: Callable[[str, str], tuple[TensorSpec, int, bool] | None],
    /,
) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], int] | None: ...
