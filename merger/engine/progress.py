"""A progress bar per node: tensors and bytes, on stderr, silenced by progress=false.

On a terminal it redraws one line in place (at most ten times a second); when
stderr is not a terminal (a log file, a SLURM job) it prints nothing, since
the run report and the summary say the same at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    def __init__(self, label: str, tensors: int, nbytes: int, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.tensors_total = tensors
        self.bytes_total = max(nbytes, 1)
        self.tensors = 0
        self.bytes = 0
        self._last = 0.0
        self._key: str | None = None

    def advance(self, key: str, nbytes: int) -> None:
        """`nbytes` more of tensor `key` are done (a tensor may come in several pieces)."""
        if key != self._key:
            self._key = key
            self.tensors += 1
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.bytes >= self.bytes_total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        filled = int(WIDTH * self.bytes / self.bytes_total)
        bar = "#" * filled + "-" * (WIDTH - filled)
        line = (
            f"\r  {self.label} [{bar}] {self.tensors}/{self.tensors_total} tensors, "
            f"{human_size(self.bytes)}/{human_size(self.bytes_total)}"
        )
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
