"""The inner loop of a node: read -> compute -> write, as three overlapping stages.

A reader thread walks the node's pieces (merger.engine.pieces) in output order and reads what each
needs (hashing sources on the way) into a bounded queue; compute threads do the maths, handing the
results on in order; a writer thread streams them into the entry file (hashing it and starting
write-back as it goes). Per-key ops (lerp, sums, ...) are fed in chunks of PIECE_BYTES across all
inputs (each input's chunk shrinks as inputs are added), so memory holds a few chunks whatever the
model size, the tensor size or the number of inputs; small whole tensors travel as runs (one flat
array per input for many tensors, one computation, one write); streaming ops (TIES, DARE, SLERP,
...: `op.stream` makes passes over the inputs' chunks, read one chunk ahead, and yields the output
in chunks); other ops get whole tensors. Non-finite values are counted off the compute threads: in
what the reader reads from the watched inputs (sources) and in what the writer writes (see
merger.core.nonfinite). A "copy" from an input kept wider than the tensor written (an upstream
node's float32 entry, see merger.engine.plan) is cast on the way; otherwise its bytes pass
untouched. Numbers an op notes about the key it computes (`TensorInputs.note`) are gathered in
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from merger.core.arrays import Backend
from merger.core.nonfinite import count_nonfinite
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.engine.buffers import BufferPool, aliases, backend_allocator
from merger.engine.byte_io import ByteSource, ChunkWriter, NonFiniteSink, Noted
from merger.engine.memory import keep_freed_blocks
from merger.engine.op_inputs import PipelineTensorInputs, stream_piece
from merger.engine.pieces import SMALL_PIECE_ELEMENTS, Computed, Fetched, FetchedRun, Item, Piece, Run, plan_pieces
from merger.io.sources import read_whole_tensors
from merger.ops.base import AnyOp, NodeSpec
from merger.ops.params import OpParams
from merger.recipe.schedule import KeyedParams

QUEUE_DEPTH = 2
COMPUTE_WORKERS = 2  # chunks computed at once on the CPU (see Pipeline._compute_workers)
BATCH_PIECES = 64  # small pieces and runs handed on together at most
BATCH_BYTES = 12 * 1024 * 1024  # and bytes of their reads
_DONE = object()


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
        self._varying = params.scheduled  # whether the parameters differ between keys
        self.sources = sources
        self.specs = specs
        self.backend = backend
        self.plan: Any = None
        self._pool = BufferPool(backend_allocator(backend))
        self._stream_reads: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self.watched = watched if on_nonfinite else frozenset()
        #: a "merge" item's watched inputs are counted where it is computed (on the CPU's compute
        #: threads; the fused loop counts them in the pass it reads them in), not by the reader
        self._late_inputs = backend.name == "numpy"
        self._on_nonfinite = on_nonfinite
        self.noted: Noted = {}
        self._noted_lock = threading.Lock()

    def note(self, name: str, key: str, value: float) -> None:
        number = float(value)
        with self._noted_lock:
            self.noted.setdefault(name, {})[key] = number if math.isfinite(number) else None

    def count(self, index: int | None, key: str, data: memoryview, code: str) -> None:
        self._report(index, self._found((key,), (), data, code))

    def _count_run(
        self, index: int | None, keys: Sequence[str], counts: Sequence[int], data: memoryview, code: str
    ) -> None:
        self._report(index, self._found(keys, counts, data, code))

    def _found(self, keys: Sequence[str], counts: Sequence[int], data: memoryview, code: str) -> list[tuple[str, int]]:
        """(key, how many) of the tensors in `data` (one, or a run's of `counts` elements one after another)
        that hold non-finite values: counted together, and tensor by tensor (to name them) only when there
        are some."""
        if self._on_nonfinite is None:
            return []
        total = count_nonfinite(data, code)
        if not total or len(keys) == 1:
            return [(keys[0], total)] if total else []
        found, size, offset = [], DTYPE_SIZES[code], 0
        for key, count in zip(keys, counts, strict=True):
            if here := count_nonfinite(data[offset : offset + count * size], code):
                found.append((key, here))
            offset += count * size
        return found

    def _report(self, index: int | None, found: list[tuple[str, int]]) -> None:
        sink = self._on_nonfinite
        if sink is not None:
            for key, count in found:
                sink(index, key, count)

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
            if index in self.watched and not (self._late_inputs and piece.mode == "merge"):
                self.count(index, key, data, spec.dtype)
        return fetched

    def _fetch_run(self, run: Run) -> FetchedRun:
        fetched = FetchedRun(run, [])
        for index, keys in run.reads:
            code = self.specs[index][keys[0]].dtype
            size = DTYPE_SIZES[code]
            sizes = [count * size for count in run.counts]
            buffer = self._pool.get(run.elements * size)
            fetched.buffers.append(buffer)
            data = read_whole_tensors(self.sources[index], keys, sizes, memoryview(buffer)[: run.elements * size])
            fetched.data.append(data)
            if index in self.watched and not (self._late_inputs and run.mode == "merge"):
                self._count_run(index, keys, run.counts, data, code)
        return fetched

    def _reader(self, pieces: Iterator[Piece | Run], out: queue.Queue[Any]) -> None:
        """Fetched pieces into `out`, in order; small pieces and runs travel in lists (batches), so a
        model of many small tensors costs one hand-off per batch rather than one per tensor."""
        try:
            batch: list[Item] = []
            batch_bytes = 0
            for piece in pieces:
                if self._stop.is_set():
                    return
                if isinstance(piece, Run):
                    fetched: Item = self._fetch_run(piece)
                    nbytes = sum(len(d) for d in fetched.data)
                    small = piece.elements <= SMALL_PIECE_ELEMENTS
                else:
                    fetched = self._fetch(piece)
                    nbytes = sum(len(d) for d in fetched.data.values())
                    small = piece.mode in ("merge", "copy") and piece.stop - piece.start <= SMALL_PIECE_ELEMENTS
                if small:
                    batch.append(fetched)
                    batch_bytes += nbytes
                    if len(batch) >= BATCH_PIECES or batch_bytes >= BATCH_BYTES:
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
        write_tensors = getattr(writer, "write_tensors", None)
        while True:
            job = jobs.get()
            if job is _DONE:
                return
            for what, data, buffers, counted in job:  # a piece's chunk (its key), or a run's tensors
                if errors or self._stop.is_set():
                    self._pool.put(buffers)
                    continue
                try:
                    if isinstance(what, Run):
                        self._write_run(writer, write_tensors, what, data)
                    else:
                        if not counted:  # a stream's chunk (others were counted where they were computed)
                            self.count(None, what, data, node.tensors[what].dtype)
                        writer.write_chunk(what, data)
                except BaseException as e:
                    errors.append(e)
                self._pool.put(buffers)

    @staticmethod
    def _write_run(writer: ChunkWriter, write_tensors: Any, run: Run, data: memoryview) -> None:
        """A run's output: in one write when the writer can (`write_tensors`), else tensor by tensor."""
        if write_tensors is not None:
            write_tensors(run.keys, data)
            return
        size, offset = DTYPE_SIZES[run.dtype], 0
        for key, count in zip(run.keys, run.counts, strict=True):
            writer.write_chunk(key, data[offset : offset + count * size])
            offset += count * size

    # --- stage 2: compute --------------------------------------------------------------------

    def _compute(self, fetched: Item, node: NodeSpec[Any]) -> tuple[memoryview, list[tuple[int, str, int]]]:
        """The item's result, and (input index, key, how many) of the non-finite values of the inputs
        counted here (a "merge" item's watched inputs on the numpy backend: see `_late_inputs`)."""
        if isinstance(fetched, FetchedRun):
            return self._compute_run(fetched)
        piece = fetched.piece
        out_spec = node.tensors[piece.key]
        xp = self.backend
        count = piece.stop - piece.start
        if piece.mode == "copy":  # the bytes of the one input tensor the op named
            index, key = piece.reads[0]
            code = self.specs[index][key].dtype
            return self._copied(fetched.data[piece.reads[0]], code, out_spec.dtype, count), []
        if piece.mode == "merge":
            inputs = [(fetched.data[(i, k)], self.specs[i][k].dtype) for i, k in piece.reads]
            late = [self._late_inputs and i in self.watched for i, _ in piece.reads]
            data, counts = self._combined(inputs, self.params_for(piece.key), out_spec.dtype, count, late)
            return data, [(i, k, n) for (i, k), n in zip(piece.reads, counts, strict=True) if n]
        result = self.op.tensor(piece.key, PipelineTensorInputs(self, fetched), self.params_for(piece.key), xp)
        return xp.store(result, out_spec.dtype), []

    def _compute_run(self, fetched: FetchedRun) -> tuple[memoryview, list[tuple[int, str, int]]]:
        run = fetched.run
        codes = [self.specs[index][keys[0]].dtype for index, keys in run.reads]
        if run.mode == "copy":
            return self._copied(fetched.data[0], codes[0], run.dtype, run.elements), []
        inputs = list(zip(fetched.data, codes, strict=True))
        late = [self._late_inputs and index in self.watched for index, _ in run.reads]
        data, counts = self._combined(inputs, self.params_for(run.keys[0]), run.dtype, run.elements, late)
        found: list[tuple[int, str, int]] = []
        for (index, keys), (raw, code), total in zip(run.reads, inputs, counts, strict=True):
            if total:  # named tensor by tensor
                found.extend((index, key, n) for key, n in self._found(keys, run.counts, raw, code))
        return data, found

    def _copied(self, data: memoryview, code: str, out_code: str, count: int) -> memoryview:
        if code == out_code:
            return data
        # a float tensor of an input kept wider than the op's dtype (a float32 entry of an upstream
        # node), into a node that is not: cast once
        xp = self.backend
        return xp.store(xp.load(data, code, (count,)), out_code)

    def _combined(
        self, inputs: list[tuple[memoryview, str]], params: OpParams, out_code: str, count: int, late: list[bool]
    ) -> tuple[memoryview, list[int]]:
        """`op.combine` over `count` elements of each input (flat), and how many non-finite values the
        inputs marked in `late` hold (0 for the others): in one compiled pass when the op is a
        `LinearForm` the backend can run (merger.core.fused; it counts in the same pass), else in
        blocks of the backend's `block_elements` into one output buffer (the temporaries stay in
        cache)."""
        form = self.op.linear_form(params, len(inputs))
        if form is not None:
            fused = self.backend.combine_linear(inputs, form, out_code, count, nonfinite=any(late))
            if fused is not None:
                data, counts = fused
                return data, [n if wanted else 0 for n, wanted in zip(counts or late, late, strict=True)]
        found = [
            count_nonfinite(data, code) if wanted else 0 for (data, code), wanted in zip(inputs, late, strict=True)
        ]
        return self._blocks(inputs, params, out_code, count), found

    def _blocks(self, inputs: list[tuple[memoryview, str]], params: OpParams, out_code: str, count: int) -> memoryview:
        xp = self.backend
        block = xp.block_elements
        if block is None or count <= block:
            values = [xp.load(data, code, (count,)) for data, code in inputs]
            return xp.store(self.op.combine(values, params, xp), out_code)
        sizes = [DTYPE_SIZES[code] for _, code in inputs]
        out_size = DTYPE_SIZES[out_code]
        out = memoryview(np.empty(count * out_size, dtype=np.uint8).data)
        for start in range(0, count, block):
            stop = min(start + block, count)
            values = [
                xp.load(data[start * size : stop * size], code, (stop - start,))
                for (data, code), size in zip(inputs, sizes, strict=True)
            ]
            xp.store_into(self.op.combine(values, params, xp), out_code, out[start * out_size : stop * out_size])
        return out

    def _compute_all(self, items: list[Item], node: NodeSpec[Any]) -> list[Computed]:
        """Each item's result, and its non-finite values by tensor (counted here, on a compute thread,
        while the result is in the CPU's cache, rather than on the writer's)."""
        results = []
        for item in items:
            data, inputs_found = self._compute(item, node)
            if isinstance(item, FetchedRun):
                found = self._found(item.run.keys, item.run.counts, data, item.run.dtype)
            else:
                found = self._found((item.piece.key,), (), data, node.tensors[item.piece.key].dtype)
            results.append((data, found, inputs_found))
        return results

    def stream_reads(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that reads streamed pieces' chunks ahead (merger.engine.op_inputs), one for the
        node's pieces, started at the first (a thread per tensor cost about 3 % of a streamed TIES)."""
        if self._stream_reads is None:
            self._stream_reads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merger-stream")
        return self._stream_reads

    def _compute_workers(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """Two threads for chunk maths on a CPU of several cores (numpy and the conversion loops
        release the GIL), so one core does not compute while the other waits; None: the calling
        thread computes (CUDA: one stream of work)."""
        if self.backend.name != "numpy" or (os.cpu_count() or 1) < 2:
            return None
        return concurrent.futures.ThreadPoolExecutor(COMPUTE_WORKERS, thread_name_prefix="merger-compute")

    def run(self, writer: ChunkWriter, node: NodeSpec[Any], advance: Callable[[str, int], None]) -> None:
        """Compute every tensor of `node` into `writer`; `advance(key, nbytes)` after each piece
        (after each tensor of a run)."""
        keep_freed_blocks()
        self.plan = node.plan
        read_queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        write_queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        errors: list[BaseException] = []
        pieces = plan_pieces(self.op, self.specs, node, self.params_for, varying=self._varying)
        reader = threading.Thread(target=self._reader, args=(pieces, read_queue), daemon=True)
        writing = threading.Thread(target=self._writer, args=(writer, node, write_queue, errors), daemon=True)
        reader.start()
        writing.start()
        finished = False
        computing: collections.deque[tuple[list[Item], concurrent.futures.Future[list[Computed]]]]
        computing = collections.deque()
        workers = self._compute_workers()

        def hand_on(items: list[Item], results: list[Computed]) -> None:
            jobs: list[tuple[str | Run, memoryview, list[Any], bool]] = []
            for item, (data, found, inputs_found) in zip(items, results, strict=True):
                for index, key, count in inputs_found:  # in output order (under `nonfinite: error`, they raise)
                    self._report(index, [(key, count)])
                self._report(None, found)
                keep = item.buffers if aliases(data, item.buffers) else []
                if not keep:  # the result is new memory: the inputs' buffers can be reused now
                    self._pool.put(item.buffers)
                jobs.append((item.run if isinstance(item, FetchedRun) else item.piece.key, data, keep, True))
            write_queue.put(jobs)
            for item, (data, _, _) in zip(items, results, strict=True):
                if isinstance(item, FetchedRun):
                    size = DTYPE_SIZES[item.run.dtype]
                    for key, count in zip(item.run.keys, item.run.counts, strict=True):
                        advance(key, count * size)
                else:
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
                items: list[Item] = item if isinstance(item, list) else [item]
                first = items[0]
                mode = first.run.mode if isinstance(first, FetchedRun) else first.piece.mode
                if workers is not None and mode in ("merge", "copy"):
                    computing.append((items, workers.submit(self._compute_all, items, node)))
                    drain(COMPUTE_WORKERS - 1)
                    continue
                drain(0)  # whole tensors and streams one at a time (their memory), in order
                if isinstance(first, Fetched) and mode == "stream":
                    key = first.piece.key

                    def put(data: memoryview, key: str = key) -> None:
                        write_queue.put([(key, data, [], False)])  # the writer takes lists of chunks
                        advance(key, len(data))

                    stream_piece(self, first.piece, node.tensors[key], put, errors)
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
            if self._stream_reads is not None:
                self._stream_reads.shutdown(wait=True, cancel_futures=True)
                self._stream_reads = None
            write_queue.put(_DONE)
            writing.join()
            reader.join()
        if errors:
            raise errors[0]
