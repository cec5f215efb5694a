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
POOLED_MIN_BYTES = 64 * 1024  # nor smaller ones (small tensors' reads get their own)
QUEUE_DEPTH = 2
COMPUTE_WORKERS = 2  # chunks computed at once on the CPU (see Pipeline._compute_workers)
SMALL_PIECE_ELEMENTS = 16 * 1024  # pieces this small are read, computed and written in batches
BATCH_PIECES = 2048  # pieces in one batch at most (and half of PIECE_BYTES of reads)
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
        if nbytes < POOLED_MIN_BYTES:  # a small tensor: new memory costs less than a chunk-sized buffer held
            return self._allocate(max(nbytes, 1))
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) >= nbytes:
                    return self._free.pop(i)
        return self._allocate(nbytes)

    def put(self, buffers: list[Any]) -> None:
        kept = [b for b in buffers if POOLED_MIN_BYTES <= len(b) <= POOLED_MAX_BYTES]
        if kept:
            with self._lock:
                self._free.extend(kept)
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
        """Fetched pieces into `out`, in order; small per-key pieces travel in lists (batches), so a
        model of many small tensors costs one hand-off per batch rather than one per tensor."""
        try:
            batch: list[Fetched] = []
            batch_bytes = 0
            for piece in pieces:
                if self._stop.is_set():
                    return
                fetched = self._fetch(piece)
                if piece.mode in ("merge", "copy") and piece.stop - piece.start <= SMALL_PIECE_ELEMENTS:
                    batch.append(fetched)
                    batch_bytes += sum(len(d) for d in fetched.data.values())
                    if len(batch) >= BATCH_PIECES or batch_bytes >= PIECE_BYTES // 2:
                        out.put(batch)
                        batch, batch_bytes = [], 0
                    continue
                if batch:
                    out.put(batch)
                    batch, batch_bytes = [], 0
                out.put(fetched)
            if batch:
                out.put(batch)
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
            for key, data, buffers in job:  # a piece's chunk, or a batch's
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

    def _compute_all(self, items: list[Fetched], node: NodeSpec[Any]) -> list[memoryview]:
        return [self._compute(item, node.tensors[item.piece.key]) for item in items]

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
        """A "stream" piece: the op's output chunks (of any size: blocks of `block_elements` too),
        stored into writes of about a chunk each."""
        xp, size = self.backend, DTYPE_SIZES[out_spec.dtype]
        inputs = _ChunkInputs(self, piece)
        capacity = inputs.step * size
        buffer, used, written = np.empty(capacity, dtype=np.uint8), 0, 0

        def put(data: memoryview) -> None:
            write_queue.put([(piece.key, data, [])])  # the writer takes lists of chunks
            advance(piece.key, len(data))

        with inputs:
            for chunk in self.op.stream(piece.key, inputs, self.params_for(piece.key), xp):
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
            raise RuntimeError(f"op {self.op.name} streamed {written} bytes of {piece.key!r}, {out_spec.nbytes} due")

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
        computing: collections.deque[tuple[list[Fetched], concurrent.futures.Future[list[memoryview]]]]
        computing = collections.deque()
        workers = self._compute_workers()

        def hand_on(items: list[Fetched], results: list[memoryview]) -> None:
            jobs = []
            for item, data in zip(items, results, strict=True):
                keep = item.buffers if _aliases(data, item.buffers) else []
                if not keep:  # the result is new memory: the inputs' buffers can be reused now
                    self._pool.put(item.buffers)
                jobs.append((item.piece.key, data, keep))
            write_queue.put(jobs)
            for item, data in zip(items, results, strict=True):
                advance(item.piece.key, len(data))

        def drain(limit: int) -> None:  # hand on finished pieces, in order, until `limit` are left
            while len(computing) > limit:
                items, future = computing.popleft()
                hand_on(items, future.result())

        try:
            while True:
                item = read_queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if errors:
                    raise errors[0]
                items: list[Fetched] = item if isinstance(item, list) else [item]
                mode = items[0].piece.mode
                if workers is not None and mode in ("merge", "copy"):
                    computing.append((items, workers.submit(self._compute_all, items, node)))
                    drain(COMPUTE_WORKERS - 1)
                    continue
                drain(0)  # whole tensors and streams one at a time (their memory), in order
                if mode == "stream":
                    self._stream(items[0].piece, node.tensors[items[0].piece.key], write_queue, errors, advance)
                    continue
                hand_on(items, self._compute_all(items, node))
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
    """`ChunkInputs` for streaming ops: passes over input chunks, the next chunk read (and converted
    to the compute dtype) on another thread while one is computed; non-finite values of watched
    inputs are counted in the first pass over each element range of a tensor only."""

    def __init__(self, pipeline: Pipeline, piece: Piece) -> None:
        self._pipeline = pipeline
        self._piece = piece
        self._counted: set[tuple[int, str, int, int]] = set()
        self._ahead: concurrent.futures.ThreadPoolExecutor | None = None
        self.step = chunk_elements(pipeline.specs)

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

    def _read(
        self, reads: Sequence[tuple[int, str]], specs: list[TensorSpec], start: int, stop: int, count: bool
    ) -> list[Array]:
        pipeline = self._pipeline
        out = []
        for (index, key), spec in zip(reads, specs, strict=True):
            size = DTYPE_SIZES[spec.dtype]
            buffer = memoryview(np.empty(max(1, (stop - start) * size), dtype=np.uint8).data)
            data = pipeline.sources[index].read_into(key, start * size, stop * size, buffer)
            if count and index in pipeline._watched:
                pipeline._count(index, key, data, spec.dtype)
            out.append(pipeline.backend.load(data, spec.dtype, (stop - start,)))
        return out

    def chunks(
        self,
        reads: Sequence[tuple[int, str]],
        *,
        multiple: int = 1,
        span: tuple[int, int] | None = None,
        peek: bool = False,
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
        if self._ahead is None:
            self._ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merger-stream")
        step = max(multiple, self.step - self.step % max(multiple, 1))
        bounds = [(start, min(start + step, last)) for start in range(first, last, step)]
        pending = self._ahead.submit(self._read, reads, specs, *bounds[0], count) if bounds else None
        for i in range(len(bounds)):
            assert pending is not None
            arrays = pending.result()
            if i + 1 < len(bounds):
                pending = self._ahead.submit(self._read, reads, specs, *bounds[i + 1], count)
            yield arrays
        if not peek:
            self._counted.update(ranges)

    def note(self, name: str, value: float) -> None:
        self._pipeline._note(name, self._piece.key, value)


def _address(buffer: Any) -> tuple[int, int]:
    array = np.frombuffer(buffer, dtype=np.uint8)
    return array.ctypes.data, array.ctypes.data + array.size


def _owner(data: Any) -> Any:
    """The object at the root of a chain of memoryviews and numpy views (what holds the memory)."""
    while True:
        if isinstance(data, memoryview):
            data = data.obj
        elif isinstance(data, np.ndarray) and data.base is not None:
            data = data.base
        else:
            return data


def _aliases(data: memoryview, buffers: list[Any]) -> bool:
    """Whether `data` lies in one of `buffers` (then they must live until it is written)."""
    if not len(data) or not buffers:
        return False
    owner = _owner(data)
    if any(owner is buffer for buffer in buffers):
        return True
    if isinstance(owner, bytearray | bytes) or (isinstance(owner, np.ndarray) and owner.flags.owndata):
        return False  # its own memory (a result): no need to compare addresses
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
