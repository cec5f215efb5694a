"""A node's work cut into pieces, in output order: what the pipeline (merger.engine.pipeline) reads,
computes and writes one at a time.

A `Piece` is elements [start, stop) of one output tensor: a chunk of a per-key merge, a copy, a
whole tensor, or a stream the op reads itself. A `Run` is many small whole tensors that one array
computation can do at once: consecutive output tensors of one mode ("merge" or "copy") whose reads
come from the same inputs in the same dtypes, with the same parameters and output dtype. Their
bytes are read into one flat array per input, `op.combine` runs once over it (a per-key op's maths
is elementwise over a tensor's flat elements, whichever tensor they belong to), and the output is
written as one span, so a model of 200,000 tiny tensors costs a few hundred array computations,
not 200,000.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Any

from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.ops.base import AnyOp, NodeSpec
from merger.ops.params import OpParams

#: bytes of one chunk of work: the inputs' chunks, the result and the float32 maths
PIECE_BYTES = 24 * 1024 * 1024
SMALL_PIECE_ELEMENTS = 16 * 1024  # whole tensors this small are gathered into runs
RUN_TENSORS = 4096  # tensors in one run at most
#: a streaming op (TIES, DARE, ...) reads chunks this many times smaller: its passes keep several float32
#: arrays a chunk (deltas, magnitudes, masks), which then stay near the CPU's cache, and the chunk read
#: ahead is ready sooner at each pass's start (TIES of three float16 models: 20 % less wall time)
STREAM_SHARE = 6


@dataclass(frozen=True)
class Piece:
    """A unit of work: elements [start, stop) of output tensor `key` (all of it when whole)."""

    key: str
    start: int
    stop: int
    mode: str  # "merge": op.combine on chunks | "copy": bytes of reads[0] | "tensor": op.tensor on the whole
    # | "stream": op.stream, which reads its own chunks (nothing is read ahead for it)
    reads: tuple[tuple[int, str], ...]  # (input index, key) to fetch


@dataclass(frozen=True)
class Run:
    """Whole small output tensors `keys` (of `counts` elements) computed as one flat array.

    `reads` holds, per operand, the input index and the key read for each output tensor (the same
    index for all of them, of one dtype); `mode` is "merge" or "copy" (one operand)."""

    keys: tuple[str, ...]
    counts: tuple[int, ...]
    mode: str
    reads: tuple[tuple[int, tuple[str, ...]], ...]
    dtype: str  # of the output tensors

    @property
    def elements(self) -> int:
        return sum(self.counts)


def chunk_elements(specs: tuple[dict[str, TensorSpec], ...], *, stream: bool = False) -> int:
    """Elements of one chunk: PIECE_BYTES over the bytes an element takes in every input and the maths
    (a streaming op's chunks: STREAM_SHARE times fewer, see there)."""
    per_element = 8 + sum(max((DTYPE_SIZES[t.dtype] for t in s.values()), default=4) for s in specs)
    return max(1024, PIECE_BYTES // (STREAM_SHARE if stream else 1) // per_element)


def plan_pieces(
    op: AnyOp,
    specs: tuple[dict[str, TensorSpec], ...],
    node: NodeSpec[Any],
    params_for: Callable[[str], OpParams] | None = None,
    *,
    varying: bool = True,
) -> Iterator[Piece | Run]:
    """The node's pieces in output order; with `params_for` (the parameters of a key; `varying`:
    whether they differ between keys, by a schedule), small whole tensors are gathered into runs
    (without it every tensor is a piece of its own)."""
    chunk = chunk_elements(specs)
    small = min(SMALL_PIECE_ELEMENTS, chunk) if params_for is not None else -1
    plan, piece_mode, needs = node.plan, op.piece_mode, op.needs
    merged = op.aligned(plan) if params_for is not None else None
    if merged is not None:
        yield from _aligned_pieces(specs, node, merged, params_for if varying else None, chunk, small)
        return
    run = _Gathered()
    for key, spec in node.tensors.items():
        mode = piece_mode(key, specs, plan)
        if mode == "stream":
            if run.keys:
                yield run.flush()
            yield Piece(key, 0, spec.numel, mode, ())
            continue
        reads = needs(key, specs, plan)
        numel = spec.numel
        if numel <= small and mode in _RUN_MODES:
            assert params_for is not None
            signature = (mode, spec.dtype, id(params_for(key)), *[(i, specs[i][k].dtype) for i, k in reads])
            if signature != run.signature or len(run.keys) >= RUN_TENSORS or run.elements + numel > chunk:
                if run.keys:
                    yield run.flush()
                run.start(signature, reads)
            run.keys.append(key)
            run.counts.append(numel)
            run.elements += numel
            for keys, (_, read_key) in zip(run.read_keys, reads, strict=True):
                keys.append(read_key)
            continue
        if run.keys:
            yield run.flush()
        if mode == "tensor":
            yield Piece(key, 0, numel, mode, tuple(reads))
            continue
        for start in range(0, max(numel, 1), chunk):
            yield Piece(key, start, min(start + chunk, numel), mode, tuple(reads))
    if run.keys:
        yield run.flush()


_RUN_MODES = frozenset({"merge", "copy"})


def _aligned_pieces(
    specs: tuple[dict[str, TensorSpec], ...],
    node: NodeSpec[Any],
    merged: Container[str],
    params_for: Callable[[str], OpParams] | None,
    chunk: int,
    small: int,
) -> Iterator[Piece | Run]:
    """`plan_pieces` of an op whose merged keys read themselves from every input and whose other keys
    are copies from the first (`Op.aligned`): a key's run signature is whether it is merged (with the
    dtypes, when a model mixes them, and the parameters, when a schedule varies them), so a model of
    200,000 keys is planned in well under a microsecond a key."""
    first, count = specs[0], len(specs)
    dtypes = {t.dtype for t in node.tensors.values()}
    uniform = len(dtypes) <= 1 and all(len({t.dtype for t in s.values()}) <= 1 for s in specs)
    out_dtype = next(iter(dtypes), "F32")
    keys: list[str] = []
    counts: list[int] = []
    elements, signature, dtype, mode = 0, None, out_dtype, "copy"
    for key, spec in node.tensors.items():
        numel = spec.numel
        is_merged = key in merged
        if numel > small:
            if keys:
                yield _aligned_run(keys, counts, mode, count, dtype)
                keys, counts, elements, signature = [], [], 0, None
            reads = tuple((i, key) for i in range(count)) if is_merged else ((0, key),)
            piece_mode = "merge" if is_merged else "copy"
            for start in range(0, max(numel, 1), chunk):
                yield Piece(key, start, min(start + chunk, numel), piece_mode, reads)
            continue
        here: object = is_merged
        if not uniform:
            here = (is_merged, spec.dtype, *([s[key].dtype for s in specs] if is_merged else [first[key].dtype]))
        if params_for is not None:
            here = (here, id(params_for(key)))
        if here != signature or len(keys) >= RUN_TENSORS or elements + numel > chunk:
            if keys:
                yield _aligned_run(keys, counts, mode, count, dtype)
                keys, counts, elements = [], [], 0
            signature, mode, dtype = here, "merge" if is_merged else "copy", spec.dtype
        keys.append(key)
        counts.append(numel)
        elements += numel
    if keys:
        yield _aligned_run(keys, counts, mode, count, dtype)


def _aligned_run(keys: list[str], counts: list[int], mode: str, inputs: int, dtype: str) -> Run:
    names = tuple(keys)
    reads = tuple((i, names) for i in range(inputs)) if mode == "merge" else ((0, names),)
    return Run(names, tuple(counts), mode, reads, dtype)


class _Gathered:
    """The run being gathered: consecutive small tensors of one signature (mode, output dtype,
    parameters, and each operand's input and dtype)."""

    def __init__(self) -> None:
        self.signature: tuple[object, ...] | None = None
        self.keys: list[str] = []
        self.counts: list[int] = []
        self.read_keys: list[list[str]] = []
        self.indices: list[int] = []
        self.elements = 0

    def start(self, signature: tuple[object, ...], reads: list[tuple[int, str]]) -> None:
        self.signature = signature
        self.indices = [index for index, _ in reads]
        self.read_keys = [[] for _ in reads]

    def flush(self) -> Run:
        assert self.signature is not None
        mode, dtype = str(self.signature[0]), str(self.signature[1])
        reads = tuple((index, tuple(keys)) for index, keys in zip(self.indices, self.read_keys, strict=True))
        done = Run(tuple(self.keys), tuple(self.counts), mode, reads, dtype)
        self.keys, self.counts, self.read_keys, self.elements, self.signature = [], [], [], 0, None
        return done


@dataclass
class Fetched:
    piece: Piece
    data: dict[tuple[int, str], memoryview]
    buffers: list[bytearray] = field(default_factory=list)


@dataclass
class FetchedRun:
    run: Run
    data: list[memoryview]  # per operand of the run: its tensors' bytes, one after another
    buffers: list[bytearray] = field(default_factory=list)


Item = Fetched | FetchedRun
#: an item's result, (key, how many) of its tensors that hold non-finite values, and (input index, key,
#: how many) of the inputs' that were counted where it was computed
Computed = tuple[memoryview, list[tuple[str, int]], list[tuple[int, str, int]]]
