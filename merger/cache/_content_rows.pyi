"""Types of the compiled writer of a content hash's rows (merger/cache/_content_rows.c)."""

from collections.abc import Callable

from merger.core.specs import TensorSpec

def rows(
    keys: list[str],
    spec: dict[str, TensorSpec],
    digests: dict[str, str],
    middle: Callable[[TensorSpec], str],
    escape: Callable[[str], str],
    /,
) -> bytes: ...
