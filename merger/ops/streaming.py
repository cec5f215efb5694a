"""Whole-tensor merges in the memory of a few chunks (`StreamingOp`: slerp, task vectors, Model Stock).

Such a merge needs something of each tensor whole before its first output element (a norm, a dot
product, a top-k threshold): it makes passes over the inputs' chunks (`Passes`), the first ones to
gather those statistics, the last to compute the output chunk by chunk (in blocks of the backend's
`block_elements`, so that the temporaries stay in the CPU's cache). A tensor whose chunks take at
most KEPT_BYTES over all its inputs is read once and its chunks kept for the later passes (most of a
diffusion model's tensors), so that only larger ones (an LLM's embeddings) are read in every pass.
The ops never change the arrays of a chunk (a kept one is passed again).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.ops.base import ChunkInputs, P, PieceMode, R
from merger.ops.elementwise import AlignedOp, Merged

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend


#: a tensor whose chunks over all its inputs take at most this many bytes is read in the first pass
#: only (a Stable Diffusion UNet's largest, 1280x1280x3x3, of three float16 models: 88 MB), as much
#: as the chunks a lerp has in flight, so that a whole-tensor merge's memory stays within twice a lerp's
KEPT_BYTES = 96 * 1024 * 1024


class Passes:
    """Passes over the chunks of one tensor of several inputs (`ChunkInputs.chunks`): call it for
    each pass. A tensor of one chunk is read in the first pass only; its chunk is kept (`whole`).
    So are the chunks of a tensor of at most KEPT_BYTES."""

    def __init__(
        self,
        inputs: ChunkInputs[object],
        reads: Sequence[tuple[int, str]],
        multiple: int = 1,
        *,
        stored: bool = False,
    ) -> None:
        self._inputs = inputs
        self._reads = list(reads)
        self._multiple = multiple
        self._stored = stored  # 16-bit floats as stored (ChunkInputs.chunks)
        self._kept: list[Array] | None = None
        self._started: Iterator[list[Array]] | None = None  # a first pass that `whole` began
        self._keeps = self._bytes() <= KEPT_BYTES
        self._chunks: list[list[Array]] | None = None  # a whole pass's chunks, kept
        self.inputs = len(self._reads)
        self.reads = 0  # passes that read the inputs

    def _bytes(self) -> int:
        """The bytes of the tensor's chunks over all inputs (16-bit floats as stored, or widened)."""
        total = 0
        for index, key in self._reads:
            spec = self._inputs.specs[index][key]
            size = DTYPE_SIZES[spec.dtype]
            total += spec.numel * (size if self._stored and size == 2 else max(4, size))
        return total

    def _read(self) -> Iterator[list[Array]]:
        """A pass that reads the inputs (no other follows when its chunks are kept)."""
        return self._inputs.chunks(self._reads, multiple=self._multiple, stored=self._stored, again=not self._keeps)

    def whole(self) -> list[Array] | None:
        """The tensor's arrays whole, when it is one chunk (then no pass reads again), else None;
        before the first pass, this begins it."""
        if self.reads == 0:
            self.reads = 1
            chunks = self._read()
            first = next(chunks, None)
            second = next(chunks, None) if first is not None else None
            if first is not None and second is None:
                self._kept = first
            elif first is not None and second is not None:
                self._started = itertools.chain([first, second], chunks)
        return self._kept

    def peek(self, count: int, runs: int = 16) -> list[list[Array]]:
        """A sample of the tensor, before the passes: `runs` runs of `count` elements spread evenly
        over it (or all of it, when that is fewer), per input."""
        numel = self._inputs.specs[self._reads[0][0]][self._reads[0][1]].numel
        if numel <= count * runs:
            starts = [0] if numel else []
            count = numel
        else:
            starts = [i * (numel - count) // (runs - 1) for i in range(runs)]
        found = []
        for start in starts:
            for arrays in self._inputs.chunks(self._reads, span=(start, start + count), peek=True, stored=self._stored):
                found.append(arrays)
        return found

    def __call__(self) -> Iterator[list[Array]]:
        self.whole()
        if self._kept is not None:
            yield self._kept
            return
        if self._chunks is not None:
            yield from self._chunks
            return
        if self._started is not None:
            chunks, self._started = self._started, None
        else:
            self.reads += 1
            chunks = self._read()
        if not self._keeps:
            yield from chunks
            return
        kept = []
        for arrays in chunks:
            kept.append(arrays)
            yield arrays
        self._chunks = kept  # a whole pass (one left early is not kept)


def blocks(arrays: list[Array], size: int | None, multiple: int = 1) -> Iterator[list[Array]]:
    """The arrays (flat, of one length) in blocks of about `size` elements (whole, for None), each
    a multiple of `multiple` elements (rows of that length kept whole)."""
    count = len(arrays[0]) if arrays else 0
    if size is None or count <= size:
        yield arrays
        return
    if multiple > 1:
        size = max(multiple, size - size % multiple)
    for start in range(0, count, size):
        yield [a[start : start + size] for a in arrays]


class StreamingOp(AlignedOp[P, R]):
    """An aligned merge whose merged keys stream (piece mode "stream"): subclasses give `stream`;
    keys that are not merged are copied from the first input."""

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Merged) -> PieceMode:
        return "stream" if key in plan else "copy"

    @abstractmethod
    def stream(self, key: str, inputs: ChunkInputs[Merged], params: R, xp: Backend) -> Iterator[Array]:
        """The merged tensor `key` (every input has it, with one shape, as a float tensor), as flat
        chunks in C order."""
