"""The inner loop of a node: read -> compute -> write, as three overlapping stages.

A reader thread walks the node's output tensors in order and reads what each
needs (hashing sources on the way) into a bounded queue; the calling thread
computes; a writer thread streams the results into the entry file (hashing
it and starting write-back as it goes). Per-key ops (lerp, sums, ...) are fed
in chunks of PIECE_BYTES across all inputs (each input's chunk shrinks as
inputs are added), so memory holds a few chunks whatever the model size, the
tensor size or the number of inputs; other ops get whole tensors. Non-finite
values are counted off the compute thread: in what the reader reads from the
watched inputs (sources) and in what the writer writes (see merger.core.nonfinite).
A "copy" from an input kept wider than the tensor written (an upstream node's float32
entry, see merger.engine.plan) is cast on the way; otherwise its bytes pass untouched.
Numbers an op notes about the key it computes (`TensorInputs.note`) are gathered in
`Pipeline.noted` for the executor, which keeps them with the node's cache entry.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from merger.core.arrays import Array, Backend
from merger.core.nonfinite import count_nonfinite
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.ops.base import AnyOp, NodeSpec
from merger.ops.params import OpParams
from merger.recipe.schedule import KeyedParams

#: bytes of one chunk of work: the inputs' chunks, the result and the float32 maths
PIECE_BYTES = 24 * 1024 * 1024
POOLED_MAX_BYTES = 16 * 1024 * 1024  # larger read buffers are not kept for reuse
QUEUE_DEPTH = 2
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
    reads: tuple[tuple[int, str], ...]  # (input index, key) to fetch


@dataclass
class Fetched:
    piece: Piece
    data: dict[tuple[int, str], memoryview]
    buffers: list[bytearray] = field(default_factory=list)


def plan_pieces(op: AnyOp, specs: tuple[dict[str, TensorSpec], ...], node: NodeSpec[Any]) -> Iterator[Piece]:
    per_element = 8 + sum(max((DTYPE_SIZES[t.dtype] for t in s.values()), default=4) for s in specs)
    chunk = max(1024, PIECE_BYTES // per_element)
    for key, spec in node.tensors.items():
        mode = op.piece_mode(key, specs, node.plan)
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
            values = [xp.load(fetched.data[(i, k)], self.specs[i][k].dtype, (count,)) for i, k in piece.reads]
            result: Array = self.op.combine(values, self.params_for(piece.key), xp)
        else:
            inputs = _TensorInputs(self, fetched)
            result = self.op.tensor(piece.key, inputs, self.params_for(piece.key), xp)
        return xp.store(result, out_spec.dtype)

    def run(self, writer: ChunkWriter, node: NodeSpec[Any], advance: Callable[[str, int], None]) -> None:
        """Compute every tensor of `node` into `writer`; `advance(key, nbytes)` after each piece."""
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
                data = self._compute(item, spec)
                keep = item.buffers if _aliases(data, item.buffers) else []
                if not keep:  # the result is new memory: the inputs' buffers can be reused now
                    self._pool.put(item.buffers)
                write_queue.put((item.piece.key, data, keep))
                advance(item.piece.key, len(data))
            finished = True
        finally:
            if not finished:  # stop the reader and let the writer drop what is queued
                self._stop.set()
                while reader.is_alive():  # a blocked reader finishes its put
                    with contextlib.suppress(queue.Empty):
                        read_queue.get(timeout=0.05)
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
