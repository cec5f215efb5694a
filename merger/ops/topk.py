"""The k largest magnitudes of a tensor seen chunk by chunk: an exact radix selection (TIES's trim).

Magnitudes order as their float bit patterns read as unsigned integers (merger.core.magnitudes).
A pass over the chunks counts the top 16 bits of every magnitude's pattern in 65536 bins; the bin
where the count from the top reaches k holds the k-th largest, and the elements above it are kept
whatever follows. The next pass counts the next 16 bits among the elements of that bin only, and so
on: two passes for float32 (four for float64) give the k-th largest magnitude's exact pattern, the
cut, and how many of the elements equal to it are kept, the first ones in C order (a running count
in the final pass), so that exactly k are kept. A pass whose chosen bin is kept whole ends early.
With a guess of the cut's high bin from a sample (`aim`), the first pass counts instead the elements
of a few high bins around it by all their bits, and only how many lie below and above those: when the
cut falls among them, as it does but for tensors whose sample misleads, that pass gives it (and costs
no scattered count per element); else the passes begin again without a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from merger.core.arrays import Array, Backend

#: counts per 16-bit digit
BINS = 1 << 16


@dataclass
class Cut:
    """Keep the magnitudes whose pattern exceeds `bits`, and the first `ties` equal to it."""

    bits: int
    ties: int


class TopK:
    """The cut of one tensor's k largest magnitudes, 0 < k < its element count: `add` each chunk of
    a pass, `end_pass` after it, until `cut` is known. `aim` first (from a sample) lets the first
    pass count a window of high bins in full too: when the cut falls in it, one pass is enough."""

    def __init__(self, k: int, width: int) -> None:
        import numpy as np

        self.width = width  # bits of the patterns: 32 (float32) or 64
        self.need = k  # elements still to keep among those of the prefix
        self.prefix_bits = 0
        self.prefix = 0
        self.counts = np.zeros(BINS, dtype=np.int64)
        self.fine: np.ndarray | None = None  # the first pass's window: BINS counts per high bin
        self.window = 0  # its first high bin
        self.cut: Cut | None = None

    def aim(self, sample: np.ndarray, fraction: float, most: int) -> None:
        """Set the first pass's window on the high bins where the sample's top `fraction` ends, give or
        take four standard errors of a sample that size (and a bin), at most `most` bins around the
        guess (`sample`: the sample's counts by high bin, as a first pass without a window counts them)."""
        import numpy as np

        total = int(sample.sum())
        if self.width != 32 or self.prefix_bits or not total:
            return
        spread = 4 * math.sqrt(fraction * (1 - fraction) / total) + 1 / total
        guess, _ = top_bin(sample, min(total, max(1, round(fraction * total))))
        high, _ = top_bin(sample, min(total, max(1, math.floor((fraction - spread) * total))))
        low, _ = top_bin(sample, min(total, max(1, math.ceil((fraction + spread) * total))))
        first, last = max(low - 1, guess - most // 2), min(high + 1, guess + (most - 1) // 2)
        self.window = min(max(0, first), BINS - 1)
        bins = min(last, BINS - 1) - self.window + 1
        self.fine = np.zeros(bins * BINS, dtype=np.int64)

    def add(self, values: Array, xp: Backend, minus: Array | None = None) -> None:
        """Count the magnitudes of `values` (of `values - minus`) of the pass."""
        windowed = self.fine is not None  # counts[0], counts[1]: the elements below and above the window
        xp.magnitude_histogram(
            values, self.counts, (self.prefix_bits, self.prefix, minus, self.fine, self.window, windowed)
        )

    def end_pass(self) -> None:
        fine, self.fine = self.fine, None
        if fine is None:
            self._narrow(self.counts)
            return
        rows, below, above = len(fine) // BINS, int(self.counts[0]), int(self.counts[1])
        per_row = fine.reshape(rows, BINS).sum(axis=1)
        self.counts[:] = 0
        if not above < self.need <= above + int(per_row.sum()):
            return  # the cut is not in the window: the passes begin again, without one
        self.counts[self.window : self.window + rows] = per_row  # the first pass's counts, had it counted them
        if above:  # in the bin after the window's (there is one: no pattern's top half reaches 0x8000)
            self.counts[self.window + rows] = above
        if below:
            self.counts[self.window - 1] = below
        self._narrow(self.counts)  # the cut's high bin: one of the window's
        if self.cut is None:
            high = self.prefix - self.window
            self._narrow(fine[high * BINS : (high + 1) * BINS])  # the second pass's counts, had it been made

    def _narrow(self, counts: np.ndarray) -> None:
        digit, above = top_bin(counts, self.need)
        self.need -= above
        self.prefix = (self.prefix << 16) | digit
        self.prefix_bits += 16
        rest = self.width - self.prefix_bits
        if self.need == int(counts[digit]):  # the whole bin is kept: the cut is just below it
            self.cut = Cut((self.prefix << rest) - 1, 0)
        elif rest == 0:
            self.cut = Cut(self.prefix, self.need)
        else:
            self.counts[:] = 0


def top_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """(the bin holding the k-th largest of the counted elements, how many are in bins above it)."""
    import numpy as np

    from_top = np.cumsum(counts[::-1])
    index = int(np.searchsorted(from_top, k))
    digit = len(counts) - 1 - index
    return digit, int(from_top[index] - counts[digit])
