"""Regular expressions from recipes: one way to compile them, one wording when one is invalid.

Every regex in a recipe is an unanchored search (Python's `re.search`): `mlp` finds
`model.layers.0.mlp.up_proj.weight`.
"""

from __future__ import annotations

import re

from merger.errors import MergerError, Where, shown


def compile_regex(pattern: str, what: str, *, where: Where | None = None) -> re.Pattern[str]:
    """`pattern` compiled; a MergerError naming `what` (e.g. "include") when it is not a valid regex."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise MergerError(
            f"{what} '{shown(pattern)}' is not a valid regular expression: {e}",
            where=where,
            fix=f"fix the {what} regex",
        ) from None
