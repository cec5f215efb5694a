"""How ops read their inputs inside the pipeline (merger.engine.pipeline): whole tensors for
"tensor" pieces (`PipelineTensorInputs`, merger.ops.base.TensorInputs) and passes over chunks for
"stream" pieces (`PipelineChunkInputs`, merger.ops.base.ChunkInputs), whose output `stream_piece`
gathers into writes."""

from __future__ import annotations

import collections
import concurrent.futures
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from merger.core.arrays import Array
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.engine.pieces import Piece, chunk_elements

#: chunks a pass reads ahead of the one computed (each a few MB: a streaming op's chunks are small)
READ_AHEAD = 2

if TYPE_CHECKING:
    from merger.engine.pieces import Fetched
    from merger.engine.pipeline import Pipeline


class PipelineTensorInputs:
    """`TensorInputs` for whole-tensor ops: prefetched reads, others read on demand."""

    def __init__(self, pipeline: Pipeline, fetched: Fetched) -> None:
        self._pipeline = pipeline
        self._fetched = fetched

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]:
        return self._pipeline.specs

    @property
    def plan(self) -> Any:
        return self._pipeline.plan

    def read(self, index: int, key: str) -> Array:
        spec = self._pipeline.specs[index][key]
        data = self._fetched.data.get((index, key))
        if data is None:
            buffer = bytearray(spec.nbytes)
            data = self._pipeline.sources[index].read_into(key, 0, spec.nbytes, memoryview(buffer))
            if index in self._pipeline.watched:
                self._pipeline.count(index, key, data, spec.dtype)
        return self._pipeline.backend.load(data, spec.dtype, spec.shape)

    def note(self, name: str, value: float) -> None:
        self._pipeline.note(name, self._fetched.piece.key, value)


class PipelineChunkInputs:
    """`ChunkInputs` for streaming ops: passes over input chunks, the next chunk read (and converted
    to the compute dtype, unless read as stored) on the node's read-ahead thread while one is
    computed, and at a pass's end the first chunk of the next (most streaming ops make several
    passes: it is dropped when none follows);
    non-finite values of watched inputs are counted in the first pass over each element range of a
    tensor only."""

    def __init__(self, pipeline: Pipeline, piece: Piece) -> None:
        self._pipeline = pipeline
        self._piece = piece
        self._counted: set[tuple[int, str, int, int]] = set()
        self._submitted: list[concurrent.futures.Future[list[Array]]] = []  # this piece's reads, dropped at its end
        #: the first chunk of a pass, read at the end of the pass before (reads, first bounds; its read)
        self._spare: tuple[tuple[object, ...], concurrent.futures.Future[list[Array]]] | None = None
        self.step = chunk_elements(pipeline.specs, stream=True)

    def __enter__(self) -> PipelineChunkInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        """The reads still queued are dropped, and the one under way finished (the thread is the node's)."""
        for future in self._submitted:
            future.cancel()
        concurrent.futures.wait(self._submitted)
        self._submitted.clear()

    def _ahead(self, *args: Any) -> concurrent.futures.Future[list[Array]]:
        """`_read(*args)` on the node's read-ahead thread."""
        self._submitted = [f for f in self._submitted if not f.done()]
        future = self._pipeline.stream_reads().submit(self._read, *args)
        self._submitted.append(future)
        return future

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]:
        return self._pipeline.specs

    @property
    def plan(self) -> Any:
        return self._pipeline.plan

    def _read(
        self,
        reads: Sequence[tuple[int, str]],
        specs: list[TensorSpec],
        start: int,
        stop: int,
        count: bool,
        stored: bool = False,
    ) -> list[Array]:
        pipeline = self._pipeline
        out = []
        for (index, key), spec in zip(reads, specs, strict=True):
            size = DTYPE_SIZES[spec.dtype]
            buffer = memoryview(np.empty(max(1, (stop - start) * size), dtype=np.uint8).data)
            data = pipeline.sources[index].read_into(key, start * size, stop * size, buffer)
            if count and index in pipeline.watched:
                pipeline.count(index, key, data, spec.dtype)
            out.append(pipeline.backend.load(data, spec.dtype, (stop - start,), widen=not stored))
        return out

    def chunks(
        self,
        reads: Sequence[tuple[int, str]],
        *,
        multiple: int = 1,
        span: tuple[int, int] | None = None,
        peek: bool = False,
        stored: bool = False,
        again: bool = True,
    ) -> Iterator[list[Array]]:
        pipeline = self._pipeline
        specs = [pipeline.specs[index][key] for index, key in reads]
        numel = specs[0].numel if specs else 0
        if span is None and any(spec.numel != numel for spec in specs):
            raise ValueError(f"chunks of tensors of different sizes: {[s.numel for s in specs]}")
        first, last = span if span is not None else (0, numel)
        if not 0 <= first <= last or any(spec.numel < last for spec in specs):
            raise ValueError(f"elements {first}..{last} of tensors of {[s.numel for s in specs]}")
        ranges = {(index, key, first, last) for index, key in reads}
        count = not peek and not ranges <= self._counted
        step = max(multiple, self.step - self.step % max(multiple, 1))
        bounds = [(start, min(start + step, last)) for start in range(first, last, step)]
        if peek:  # a few small spans: read here, without a hand-off to the reading thread
            for start, stop in bounds:
                yield self._read(reads, specs, start, stop, False, stored)
            return
        what = (tuple(reads), bounds[0] if bounds else None, stored)
        spare, self._spare = self._spare, None
        pending: concurrent.futures.Future[list[Array]] | None = None
        if spare is not None and spare[0] == what and not count:
            pending = spare[1]  # the first chunk, read ahead at the end of the pass before
        elif spare is not None:
            spare[1].cancel()
        if pending is None and bounds:
            pending = self._ahead(reads, specs, *bounds[0], count, stored)
        ahead = collections.deque([pending] if pending is not None else [])
        for i in range(len(bounds)):
            while len(ahead) < READ_AHEAD and i + len(ahead) < len(bounds):  # the next chunks, being read
                ahead.append(self._ahead(reads, specs, *bounds[i + len(ahead)], count, stored))
            if again and i + len(ahead) == len(bounds) and len(bounds) > 1 and self._spare is None:
                # another pass over the same chunks may follow: its first, read ahead too
                self._spare = (what, self._ahead(reads, specs, *bounds[0], False, stored))
            arrays = ahead.popleft().result()
            yield arrays
        self._counted.update(ranges)

    def note(self, name: str, value: float) -> None:
        self._pipeline.note(name, self._piece.key, value)


def stream_piece(
    pipeline: Pipeline,
    piece: Piece,
    out_spec: TensorSpec,
    put: Callable[[memoryview], None],
    errors: list[BaseException],
) -> None:
    """A "stream" piece: the op's output chunks (of any size: blocks of `block_elements` too), stored
    into writes of about a chunk each and handed to `put`; stops at the writer's first error."""
    xp, size = pipeline.backend, DTYPE_SIZES[out_spec.dtype]
    inputs = PipelineChunkInputs(pipeline, piece)
    capacity = inputs.step * size
    buffer, used, written = np.empty(capacity, dtype=np.uint8), 0, 0
    with inputs:
        for chunk in pipeline.op.stream(piece.key, inputs, pipeline.params_for(piece.key), xp):
            if errors:
                raise errors[0]
            nbytes = math.prod(chunk.shape) * size
            written += nbytes
            if used and used + nbytes > capacity:
                put(memoryview(buffer[:used].data))
                buffer, used = np.empty(capacity, dtype=np.uint8), 0
            if nbytes > capacity:
                put(xp.store(chunk, out_spec.dtype))
                continue
            xp.store_into(chunk, out_spec.dtype, memoryview(buffer[used : used + nbytes].data))
            used += nbytes
    if used or not written:  # an empty tensor is written too (as no bytes)
        put(memoryview(buffer[:used].data))
    if written != out_spec.nbytes:
        raise RuntimeError(f"op {pipeline.op.name} streamed {written} bytes of {piece.key!r}, {out_spec.nbytes} due")
