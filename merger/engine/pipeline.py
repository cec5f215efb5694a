"""The inner loop of a node: read -> compute -> write, as three overlapping stages.

A reader thread walks the node's output tensors in order and reads what each
needs (hashing sources on the way) into a bounded queue; the calling thread
computes; a writer thread streams the results into the entry file (hashing
it and starting write-back as it goes). Per-key ops (lerp, sums, ...) are fed
in chunks of PIECE_BYTES across all inputs (each input's chunk shrinks as
inputs are added), so memory holds a few chunks whatever the model size, the
tensor size or the number of inputs; so are streaming ops (TIES, DARE, SLERP,
...: `op.stream` makes passes over the inputs' chunks, read one chunk ahead,
and yields the output in chunks); other ops get whole tensors. Non-finite
values are counted off the compute thread: in what the reader reads from the
watched inputs (sources) and in what the writer writes (see merger.core.nonfinite).
A "copy" from an input kept wider than the tensor written (an upstream node's float32
entry, see merger.engine.plan) is cast on the way; otherwise its bytes pass untouched.
Numbers an op notes about the key it computes (`TensorInputs.note`) are gathered in
`Pipeline.noted` for the executor, which keeps them with the node's cache entry.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from merger.core.arrays import Array, Backend
from merger.core.nonfinite import count_nonfinite
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.engine.memory import keep_freed_blocks
from merger.ops.base import AnyOp, NodeSpec
from merger.ops.params import OpParams
from merger.recipe.schedule import KeyedParams

#: bytes of one chunk of work: the inputs' chunks, the result and the float32 maths
PIECE_BYTES = 24 * 1024 * 1024
POOLED_MAX_BYTES = 16 * 1024 * 1024  # larger read buffers are not kept for reuse
QUEUE_DEPTH = 2
COMPUTE_WORKERS = 2  # chunks computed at once on the CPU (see Pipeline._compute_workers)
MAX_POOLED = 32
_DONE = object()


class ByteSource(Protocol):
    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview: ...


class ChunkWriter(Protocol):
    def write_chunk(self, key: str, data: memoryview) -> None: ...


#: called with (input index, or None for the output; tensor key; how many non-finite values a chunk held)
NonFiniteSink = Callable[[int | None, str, int], None]
#: what an op noted while computing: name -> output key -> value (None: it was not finite)
Noted = dict[str, dict[str, float | None]]  # as merger.ops.base.Noted, filled in while computing


class RenamedSource:
    """A source read under other key names (`rename`: source key -> presented key)."""

    def __init__(self, source: ByteSource, rename: Mapping[str, str]) -> None:
        self._source = source
        self._back = {presented: stored for stored, presented in rename.items()}

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        return self._source.read_into(self._back[key], start, stop, out)


@dataclass(frozen=True)
class Piece:
    """A unit of work: elements [start, stop) of output tensor `key` (all of it when whole)."""

    key: str
    start: int
    stop: int
    mode: str  # "merge": op.combine on chunks | "copy": bytes of reads[0] | "tensor": op.tensor on the whole
    # | "stream": op.stream, which reads its own chunks (nothing is read ahead for it)
    reads: tuple[tuple[int, str], ...]  # (input index, key) to fetch


@dataclass
class Fetched:
    piece: Piece
    data: dict[tuple[int, str], memoryview]
    buffers: list[bytearray] = field(default_factory=list)


def chunk_elements(specs: tuple[dict[str, TensorSpec], ...]) -> int:
    """Elements of one chunk: PIECE_BYTES over the bytes an element takes in every input and the maths."""
    per_element = 8 + sum(max((DTYPE_SIZES[t.dtype] for t in s.values()), default=4) for s in specs)
    return max(1024, PIECE_BYTES // per_element)


def plan_pieces(op: AnyOp, specs: tuple[dict[str, TensorSpec], ...], node: NodeSpec[Any]) -> Iterator[Piece]:
    chunk = chunk_elements(specs)
    for key, spec in node.tensors.items():
        mode = op.piece_mode(key, specs, node.plan)
        if mode == "stream":
            yield Piece(key, 0, spec.numel, mode, ())
            continue
        reads = tuple(op.needs(key, specs, node.plan))
        if mode == "tensor":
            yield Piece(key, 0, spec.numel, mode, reads)
            continue
        for start in range(0, max(spec.numel, 1), chunk):
            yield Piece(key, start, min(start + chunk, spec.numel), mode, reads)


class _Pool:
    """Reusable read buffers, handed out and given back (bounds memory)."""

    def __init__(self, allocate: Callable[[int], Any]) -> None:
        self._allocate = allocate
        self._free: list[Any] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> Any:
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) >= nbytes:
                    return self._free.pop(i)
        return self._allocate(max(nbytes, 1))

    def put(self, buffers: list[Any]) -> None:
        with self._lock:
            self._free.extend(b for b in buffers if len(b) <= POOLED_MAX_BYTES)
            del self._free[MAX_POOLED:]


class Pipeline:
    """Runs one node's pieces through read, compute and write."""

    def __init__(
        self,
        op: AnyOp,
        params: KeyedParams,
        sources: list[ByteSource],
        specs: tuple[dict[str, TensorSpec], ...],
        backend: Backend,
        *,
        watched: frozenset[int] = frozenset(),
        on_nonfinite: NonFiniteSink | None = None,
    ) -> None:
        """`watched`: the inputs whose reads are counted for non-finite values (with the output's
        writes) and reported to `on_nonfinite`, which may raise to stop the node."""
        self.op = op
        self.params_for: Callable[[str], OpParams] = params.for_key
        self.sources = sources
        self.specs = specs
        self.backend = backend
        self._plan: Any = None
        self._pool = _Pool(backend_allocator(backend))
        self._stop = threading.Event()
        self._watched = watched if on_nonfinite else frozenset()
        self._on_nonfinite = on_nonfinite
        self.noted: Noted = {}
        self._noted_lock = threading.Lock()

    def _note(self, name: str, key: str, value: float) -> None:
        number = float(value)
        with self._noted_lock:
            self.noted.setdefault(name, {})[key] = number if math.isfinite(number) else None

    def _count(self, index: int | None, key: str, data: memoryview, code: str) -> None:
        if self._on_nonfinite is not None:
            found = count_nonfinite(data, code)
            if found:
                self._on_nonfinite(index, key, found)

    # --- stage 1: read -----------------------------------------------------------------------

    def _fetch(self, piece: Piece) -> Fetched:
        fetched = Fetched(piece, {})
        for index, key in piece.reads:
            spec = self.specs[index][key]
            size = DTYPE_SIZES[spec.dtype]
            start, stop = piece.start * size, piece.stop * size
            if piece.mode == "tensor":
                start, stop = 0, spec.nbytes
            buffer = self._pool.get(stop - start)
            fetched.buffers.append(buffer)
            fetched.data[(index, key)] = data = self.sources[index].read_into(key, start, stop, memoryview(buffer))
            if index in self._watched:
                self._count(index, key, data, spec.dtype)
        return fetched

    def _reader(self, pieces: Iterator[Piece], out: queue.Queue[Any]) -> None:
        try:
            for piece in pieces:
                if self._stop.is_set():
                    return
                out.put(self._fetch(piece))
            out.put(_DONE)
        except BaseException as e:  # handed to the computing thread
            out.put(e)

    # --- stage 3: write ----------------------------------------------------------------------

    def _writer(
        self, writer: ChunkWriter, node: NodeSpec[Any], jobs: queue.Queue[Any], errors: list[BaseException]
    ) -> None:
        while True:
            job = jobs.get()
            if job is _DONE:
                return
            key, data, buffers = job
            if errors or self._stop.is_set():
                self._pool.put(buffers)
                continue
            try:
                self._count(None, key, data, node.tensors[key].dtype)
                writer.write_chunk(key, data)
            except BaseException as e:
                errors.append(e)
            self._pool.put(buffers)

    # --- stage 2: compute --------------------------------------------------------------------

    def _compute(self, fetched: Fetched, out_spec: TensorSpec) -> memoryview:
        piece = fetched.piece
        xp = self.backend
        count = piece.stop - piece.start
        if piece.mode == "copy":  # the bytes of the one input tensor the op named
            data = fetched.data[piece.reads[0]]
            index, key = piece.reads[0]
            code = self.specs[index][key].dtype
            if code == out_spec.dtype:
                return data
            # a float tensor of an input kept wider than the op's dtype (a float32 entry of an upstream
            # node), into a node that is not: cast once
            return xp.store(xp.load(data, code, (count,)), out_spec.dtype)
        if piece.mode == "merge":
            block = xp.block_elements
            if block is not None and count > block:
                return self._combine_blocks(fetched, out_spec, block)
            values = [xp.load(fetched.data[(i, k)], self.specs[i][k].dtype, (count,)) for i, k in piece.reads]
            result: Array = self.op.combine(values, self.params_for(piece.key), xp)
        else:
            inputs = _TensorInputs(self, fetched)
            result = self.op.tensor(piece.key, inputs, self.params_for(piece.key), xp)
        return xp.store(result, out_spec.dtype)

    def _compute_workers(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """Two threads for chunk maths on a CPU of several cores (numpy and the conversion loops
        release the GIL), so one core does not compute while the other waits; None: the calling
        thread computes (CUDA: one stream of work)."""
        if self.backend.name != "numpy" or (os.cpu_count() or 1) < 2:
            return None
        return concurrent.futures.ThreadPoolExecutor(COMPUTE_WORKERS, thread_name_prefix="merger-compute")

    def _combine_blocks(self, fetched: Fetched, out_spec: TensorSpec, block: int) -> memoryview:
        """A "merge" piece, block by block into one output buffer (the temporaries stay in cache)."""
        piece, xp = fetched.piece, self.backend
        params = self.params_for(piece.key)
        inputs = [(fetched.data[(i, k)], self.specs[i][k].dtype) for i, k in piece.reads]
        sizes = [DTYPE_SIZES[code] for _, code in inputs]
        out_size = DTYPE_SIZES[out_spec.dtype]
        out = memoryview(np.empty((piece.stop - piece.start) * out_size, dtype=np.uint8).data)
        for start in range(0, piece.stop - piece.start, block):
            stop = min(start + block, piece.stop - piece.start)
            values = [
                xp.load(data[start * size : stop * size], code, (stop - start,))
                for (data, code), size in zip(inputs, sizes, strict=True)
            ]
            xp.store_into(self.op.combine(values, params, xp), out_spec.dtype, out[start * out_size : stop * out_size])
        return out

    def _stream(
        self,
        piece: Piece,
        out_spec: TensorSpec,
        write_queue: queue.Queue[Any],
        errors: list[BaseException],
        advance: Callable[[str, int], None],
    ) -> None:
        inputs = _ChunkInputs(self, piece)
        with inputs:
            for chunk in self.op.stream(piece.key, inputs, self.params_for(piece.key), self.backend):
                if errors:
                    raise errors[0]
                data = self.backend.store(chunk, out_spec.dtype)
                write_queue.put((piece.key, data, []))
                advance(piece.key, len(data))

    def run(self, writer: ChunkWriter, node: NodeSpec[Any], advance: Callable[[str, int], None]) -> None:
        """Compute every tensor of `node` into `writer`; `advance(key, nbytes)` after each piece."""
        keep_freed_blocks()
        self._plan = node.plan
        read_queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        write_queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        errors: list[BaseException] = []
        reader = threading.Thread(
            target=self._reader, args=(plan_pieces(self.op, self.specs, node), read_queue), daemon=True
        )
        writing = threading.Thread(target=self._writer, args=(writer, node, write_queue, errors), daemon=True)
        reader.start()
        writing.start()
        finished = False
        computing: collections.deque[tuple[Fetched, concurrent.futures.Future[memoryview]]] = collections.deque()
        workers = self._compute_workers()

        def hand_on(item: Fetched, data: memoryview) -> None:
            keep = item.buffers if _aliases(data, item.buffers) else []
            if not keep:  # the result is new memory: the inputs' buffers can be reused now
                self._pool.put(item.buffers)
            write_queue.put((item.piece.key, data, keep))
            advance(item.piece.key, len(data))

        def drain(limit: int) -> None:  # hand on finished pieces, in order, until `limit` are left
            while len(computing) > limit:
                item, future = computing.popleft()
                hand_on(item, future.result())

        try:
            while True:
                item = read_queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if errors:
                    raise errors[0]
                spec = node.tensors[item.piece.key]
                if workers is not None and item.piece.mode in ("merge", "copy"):
                    computing.append((item, workers.submit(self._compute, item, spec)))
                    drain(COMPUTE_WORKERS - 1)
                    continue
                drain(0)  # whole tensors and streams one at a time (their memory), in order
                if item.piece.mode == "stream":
                    self._stream(item.piece, spec, write_queue, errors, advance)
                    continue
                hand_on(item, self._compute(item, spec))
            drain(0)
            finished = True
        finally:
            if not finished:  # stop the reader and let the writer drop what is queued
                self._stop.set()
                while reader.is_alive():  # a blocked reader finishes its put
                    with contextlib.suppress(queue.Empty):
                        read_queue.get(timeout=0.05)
            if workers is not None:
                workers.shutdown(wait=True, cancel_futures=True)
            write_queue.put(_DONE)
            writing.join()
            reader.join()
        if errors:
            raise errors[0]


class _TensorInputs:
    """`TensorInputs` for whole-tensor ops: prefetched reads, others read on demand."""

    def __init__(self, pipeline: Pipeline, fetched: Fetched) -> None:
        self._pipeline = pipeline
        self._fetched = fetched

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]:
        return self._pipeline.specs

    @property
    def plan(self) -> Any:
        return self._pipeline._plan

    def read(self, index: int, key: str) -> Array:
        spec = self._pipeline.specs[index][key]
        data = self._fetched.data.get((index, key))
        if data is None:
            buffer = bytearray(spec.nbytes)
            data = self._pipeline.sources[index].read_into(key, 0, spec.nbytes, memoryview(buffer))
            if index in self._pipeline._watched:
                self._pipeline._count(index, key, data, spec.dtype)
        return self._pipeline.backend.load(data, spec.dtype, spec.shape)

    def note(self, name: str, value: float) -> None:
        self._pipeline._note(name, self._fetched.piece.key, value)


class _ChunkInputs:
    """`ChunkInputs` for streaming ops: passes over input chunks, the next chunk read while one is
    computed; non-finite values of watched inputs are counted in the first pass over a tensor only."""

    def __init__(self, pipeline: Pipeline, piece: Piece) -> None:
        self._pipeline = pipeline
        self._piece = piece
        self._counted: set[tuple[int, str]] = set()
        self._ahead: concurrent.futures.ThreadPoolExecutor | None = None

    def __enter__(self) -> _ChunkInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ahead is not None:
            self._ahead.shutdown(wait=True, cancel_futures=True)

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]:
        return self._pipeline.specs

    @property
    def plan(self) -> Any:
        return self._pipeline._plan

    def _read(self, reads: Sequence[tuple[int, str]], start: int, stop: int, count: bool) -> list[memoryview]:
        pipeline = self._pipeline
        out = []
        for index, key in reads:
            size = DTYPE_SIZES[pipeline.specs[index][key].dtype]
            buffer = memoryview(bytearray(max(1, (stop - start) * size)))
            data = pipeline.sources[index].read_into(key, start * size, stop * size, buffer)
            if count and index in pipeline._watched:
                pipeline._count(index, key, data, pipeline.specs[index][key].dtype)
            out.append(data)
        return out

    def chunks(self, reads: Sequence[tuple[int, str]]) -> Iterator[list[Array]]:
        pipeline = self._pipeline
        specs = [pipeline.specs[index][key] for index, key in reads]
        numel = specs[0].numel if specs else 0
        if any(spec.numel != numel for spec in specs):
            raise ValueError(f"chunks of tensors of different sizes: {[s.numel for s in specs]}")
        count = not set(reads) <= self._counted
        if self._ahead is None:
            self._ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merger-stream")
        step = chunk_elements(pipeline.specs)
        bounds = [(start, min(start + step, numel)) for start in range(0, numel, step)]
        pending = self._ahead.submit(self._read, reads, *bounds[0], count) if bounds else None
        for i, (start, stop) in enumerate(bounds):
            assert pending is not None
            data = pending.result()
            if i + 1 < len(bounds):
                pending = self._ahead.submit(self._read, reads, *bounds[i + 1], count)
            yield [pipeline.backend.load(d, spec.dtype, (stop - start,)) for d, spec in zip(data, specs, strict=True)]
        self._counted.update(reads)

    def note(self, name: str, value: float) -> None:
        self._pipeline._note(name, self._piece.key, value)


def _address(buffer: Any) -> tuple[int, int]:
    array = np.frombuffer(buffer, dtype=np.uint8)
    return array.ctypes.data, array.ctypes.data + array.size


def _aliases(data: memoryview, buffers: list[Any]) -> bool:
    """Whether `data` lies in one of `buffers` (then they must live until it is written)."""
    if not len(data) or not buffers:
        return False
    start, stop = _address(data)
    for buffer in buffers:
        if not len(buffer):
            continue
        begin, end = _address(buffer)
        if start < end and begin < stop:
            return True
    return False


def backend_allocator(backend: Backend) -> Callable[[int], Any]:
    """Read buffers: page-locked on CUDA (for asynchronous copies), plain elsewhere."""
    if backend.name == "torch" and backend.device.startswith("cuda"):
        import torch

        return lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy()
    return bytearray
