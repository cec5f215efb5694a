"""Family check: are these models fine-tunes of one parent, or unrelated?

For the weight tensors (two or more dimensions, so that LayerNorm weights of
ones, identical in any two models, do not count) that every model has with
one shape, the cosine similarity of each model's tensor to the first model's,
on evenly spread samples of each tensor. Models fine-tuned from one parent sit
near 1; independently initialised ones near 0. Below FAMILY_THRESHOLD (median
over the tensors) the models are called unrelated: interpolating them gives
garbage (the ESRGAN authors' "same family tree" rule).

What a merge does about it is its `family:` setting (the node's, else the
run's): `warn` (the default) logs the warning below before the node computes,
`error` fails the run with it, `off` skips the comparison. The figures are
kept with the node's cache entry, so a cache hit warns (or fails) alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.errors import Location, MergerError

FAMILY_THRESHOLD = 0.5
SPANS = 4
#: the cache entry note holding the figures: {"first": name, "inputs": {name: {"median": m, "tensors": n}}}
FAMILY_NOTE = "family"


class Peekable(Protocol):
    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview: ...


@dataclass(frozen=True)
class Similarity:
    """How one model compares with the first."""

    name: str
    tensors: int
    median: float
    minimum: float
    lowest: tuple[tuple[str, float], ...]  # the least similar tensors

    @property
    def related(self) -> bool:
        return self.median >= FAMILY_THRESHOLD

    def describe(self, first: str) -> str:
        verdict = "same family" if self.related else "UNRELATED"
        return (
            f"{self.name} vs {first}: median cosine {self.median:.4f}, min {self.minimum:.4f}"
            f" over {self.tensors} weight tensors -> {verdict}"
        )


def _candidates(specs: Sequence[dict[str, TensorSpec]], limit: int) -> list[str]:
    first = specs[0]
    keys = [
        key
        for key, spec in first.items()
        if spec.is_float
        and len(spec.shape) >= 2
        and all(key in s and s[key].shape == spec.shape and s[key].is_float for s in specs[1:])
    ]
    if len(keys) <= limit:
        return keys
    step = len(keys) / limit
    return [keys[int(i * step)] for i in range(limit)]


def _sample(source: Peekable, key: str, spec: TensorSpec, elements: int) -> list[memoryview]:
    size = DTYPE_SIZES[spec.dtype]
    if spec.numel <= elements:
        return [source.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes)))]
    span = elements // SPANS
    starts = [int(i * (spec.numel - span) / (SPANS - 1)) for i in range(SPANS)]
    return [source.read_into(key, s * size, (s + span) * size, memoryview(bytearray(span * size))) for s in starts]


def compare(
    sources: Sequence[Peekable],
    specs: Sequence[dict[str, TensorSpec]],
    names: Sequence[str],
    *,
    max_tensors: int = 16,
    max_elements: int = 16384,
) -> list[Similarity]:
    """Each model after the first, compared with the first on sampled weight tensors."""
    import numpy as np

    from merger.core.arrays import NumpyBackend
    from merger.core.float8 import FLOAT8_TABLES, float8_to_f32

    xp = NumpyBackend()
    keys = _candidates(specs, max_tensors)
    scores: list[list[tuple[str, float]]] = [[] for _ in sources[1:]]

    def sampled(source: Peekable, spec: TensorSpec, key: str) -> np.ndarray:
        parts = _sample(source, key, spec, max_elements)
        size = DTYPE_SIZES[spec.dtype]
        if spec.dtype in FLOAT8_TABLES:  # numpy has no float8: widen through a table
            return np.concatenate([float8_to_f32(p, spec.dtype) for p in parts]).astype(np.float64)
        return np.concatenate([xp.load(p, spec.dtype, (len(p) // size,)) for p in parts]).astype(np.float64)

    for key in keys:
        a = sampled(sources[0], specs[0][key], key)
        for i, source in enumerate(sources[1:]):
            b = sampled(source, specs[i + 1][key], key)
            norms = math.sqrt(float(a @ a)) * math.sqrt(float(b @ b))
            score = float(a @ b) / norms if norms > 0 else 0.0
            if math.isfinite(score):  # a tensor with NaN or inf says nothing here (merger.core.nonfinite reports it)
                scores[i].append((key, score))
    results = []
    for name, found in zip(names[1:], scores, strict=True):
        values = sorted(score for _, score in found)
        median = values[len(values) // 2] if values else float("nan")
        lowest = tuple(sorted(found, key=lambda item: item[1])[:3])
        results.append(Similarity(name, len(values), median, values[0] if values else float("nan"), lowest))
    return results


def unrelated_warning(name: str, first: str, median: float, tensors: int) -> str:
    """What a merge says of an input that looks unrelated to its first."""
    return (
        f"input '{name}' looks unrelated to '{first}' (median cosine {median:.3f} over {tensors} weight tensors,"
        f" below {FAMILY_THRESHOLD}); merging models that do not share a parent gives garbage"
    )


def family_error(where: Location, warning: str) -> MergerError:
    """`family: error`: the warning, as the run's error."""
    return MergerError(
        warning,
        where=where,
        fix="merge fine-tunes of one parent (merger-inspect A B compares them); to merge these anyway,"
        " set family: warn on the node (or family=warn for the run)",
    )


def family_figures(notes: Mapping[str, Any]) -> tuple[str, dict[str, tuple[float, int]]] | None:
    """The family check's figures a cache entry's notes record: (first input, {input: (median, tensors)}),
    or None when they have none (not a merge, `family: off` when computed, or an older entry); anything
    malformed reads as none (the notes are data from the cache)."""
    note = notes.get(FAMILY_NOTE)
    if not isinstance(note, Mapping) or not isinstance(note.get("first"), str):
        return None
    inputs = note.get("inputs")
    found: dict[str, tuple[float, int]] = {}
    for name, figures in inputs.items() if isinstance(inputs, Mapping) else ():
        median = figures.get("median") if isinstance(figures, Mapping) else None
        tensors = figures.get("tensors") if isinstance(figures, Mapping) else None
        if (
            isinstance(name, str)
            and isinstance(median, int | float)
            and math.isfinite(median)
            and isinstance(tensors, int)
        ):
            found[name] = (float(median), tensors)
    return note["first"], found
