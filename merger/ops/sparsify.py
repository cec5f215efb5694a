"""How each task vector is sparsified, block by block in C order (merger.ops.task_vectors): kept as it
is, zeroed (density 0), trimmed to its top k by magnitude (TIES), or randomly dropped (DARE).

For each block a model's `Sparsify` gives a `Step`: what to do to its deltas there, either by array
maths (`sparsified`, any backend) or by the compiled sign election (the numpy backend's `elect`),
which do the same float32 operations in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merger.ops.base import seeded_rng
from merger.ops.topk import TopK

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

#: Step.kind: as it is, where `mask`, times 0, trimmed at `cut`
PLAIN, MASKED, ZEROED, CUT = 0, 1, 2, 3


@dataclass
class Step:
    """One block of one model's deltas: `kind`, then divided by `divide` and multiplied by `multiply`
    (each when not 0); for CUT, `ties` of those equal to the cut are still to keep (updated)."""

    kind: int = PLAIN
    mask: Any = None  # MASKED: a numpy bool array, one per element
    cut: int = 0
    ties: int = 0
    divide: float = 0.0
    multiply: float = 0.0

    def fused(self) -> tuple[int, Any, int, int, float, float]:
        return self.kind, self.mask, self.cut, self.ties, self.divide, self.multiply


def sparsified(delta: Array, step: Step, xp: Backend) -> Array:
    """The block's deltas after `step`, by array maths (the compiled election does the same)."""
    if step.kind == MASKED:
        delta = xp.keep(delta, xp.asarray(step.mask))
    elif step.kind == ZEROED:
        delta = delta * 0.0
    elif step.kind == CUT:
        mask, marked = xp.cut_mask(delta, step.cut, step.ties)
        step.ties -= marked
        delta = xp.keep(delta, mask)
    if step.divide:
        delta = delta / step.divide
    if step.multiply:
        delta = delta * step.multiply
    return delta


class Sparsify:
    """A model's sparsification: none."""

    def step(self, count: int) -> Step:
        """What to do to the next `count` deltas (blocks come in C order)."""
        return Step()

    def done(self, step: Step) -> None:
        """After the block of `step`."""


class Zero(Sparsify):
    """Density 0 (or an empty tensor): nothing is kept."""

    def step(self, count: int) -> Step:
        return Step(ZEROED)


class Trim(Sparsify):
    """TIES: the top k by magnitude (of those tied at the cut, the first in C order); the cut is
    found by passes over the chunks first (`top`, merger.ops.topk)."""

    def __init__(self, k: int, width: int) -> None:
        self.top = TopK(k, width)
        self.ties = 0  # of those equal to the cut, how many are still to keep

    def start(self) -> None:
        assert self.top.cut is not None
        self.ties = self.top.cut.ties

    def step(self, count: int) -> Step:
        assert self.top.cut is not None
        return Step(CUT, cut=self.top.cut.bits, ties=self.ties)

    def done(self, step: Step) -> None:
        self.ties = step.ties


class Drop(Sparsify):
    """DARE: drop each delta with probability 1 - density (the draws of `seeded_rng(seed, name)`,
    taken block by block: the same numbers as one draw of the whole tensor), rescale the rest."""

    def __init__(self, seed: int | None, name: str, density: float, rescale: str) -> None:
        self.seed, self.name, self.density, self.rescale = seed, name, density, rescale
        self.ratio: float | None = None  # rescale: l1, the L1 norm before over after, once known
        self.start()

    def start(self) -> None:
        """Draw from the stream's start again (after a pass that measured)."""
        self.draws = seeded_rng(self.seed, self.name)
        self.before = self.after = 0.0

    def step(self, count: int) -> Step:
        keep = self.draws.random(count, dtype="float32") < self.density
        divide = self.density if self.rescale == "inverse_density" else 0.0
        return Step(MASKED, keep, divide=divide, multiply=self.ratio or 0.0)

    def measure(self, delta: Array, xp: Backend) -> None:
        """rescale: l1, a first pass: add the block to the L1 norms before and after the drop."""
        keep = self.draws.random(math.prod(delta.shape), dtype="float32") < self.density
        self.before += xp.total(xp.abs(delta))
        self.after += xp.total(xp.abs(xp.keep(delta, xp.asarray(keep))))
