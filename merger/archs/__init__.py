"""Knowledge of architectures, from state dicts alone (keys and shapes, no model code).

Only ESRGAN (RRDBNet) for now; `describe` names what a spec is, for
`merger-inspect` and for messages.
"""

from __future__ import annotations

from collections.abc import Mapping

from merger.archs import esrgan
from merger.specs import TensorSpec


def describe(spec: Mapping[str, TensorSpec]) -> str | None:
    """A one-line description of a known architecture, or None."""
    found = esrgan.detect(spec)
    return found.describe() if found else None
