"""Knowledge of architectures, from state dicts alone (keys and shapes, no model code).

Only ESRGAN (RRDBNet) for now; `describe` names what a spec is, for
`merger-inspect` and for messages.

May import: merger.core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from merger.archs import esrgan
from merger.core.specs import TensorSpec


def describe(spec: Mapping[str, TensorSpec]) -> str | None:
    """A one-line description of a known architecture, or None."""
    found = esrgan.detect(spec)
    return found.describe() if found else None


@dataclass(frozen=True)
class Adaptation:
    """How one input is presented to a node: its keys renamed (source key -> node key)."""

    tag: str  # what was done, for the node's content key, e.g. "esrgan-layout:old"
    rename: Mapping[str, str]


def align_layouts(specs: Sequence[Mapping[str, TensorSpec]]) -> list[Adaptation | None]:
    """For each input, the renaming that brings it to the first input's layout (None: as is).

    ESRGAN models in the old, new and basicsr layouts are the same network under
    other names; a merge of models in mixed layouts merges them in the first one's.
    """
    first = esrgan.detect(specs[0]) if specs else None
    result: list[Adaptation | None] = [None] * len(specs)
    if first is None:
        return result
    for i, spec in enumerate(specs[1:], start=1):
        other = esrgan.detect(spec)
        if other is not None and other.layout != first.layout:
            result[i] = Adaptation(f"esrgan-layout:{first.layout}", other.rename(first.layout))
    return result
