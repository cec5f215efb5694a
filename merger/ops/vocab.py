"""`vocab: first`: a merge of language models whose vocabularies differ (tokens added to one of them,
32000 vs 32002 rows), with the output given the first input's vocabulary.

The planner wraps a node's op in `VocabFirst` when the node says `vocab: first` and some
embedding-like key (token embedding, LM head: see merger.archs.embeddings) has a different row
count in different inputs. For each such key:

- rows 0..m-1, the rows every input has, are what the node's op gives when each input is cut to
  them (per-key ops merge those rows; streaming ops such as TIES stream the cut tensors: rows
  0..m-1 are the first elements of a tensor in C order);
- the first input's remaining rows are copied as they are; rows only other inputs have are dropped;
- the output tensor has the first input's shape (and the op's dtype).

Every other key is the op's alone: the wrapper hands it through with the op's own plan.

"First" is the first model listed in the node's `inputs:`, for ops with a base too
(task_arithmetic, ties, dare_*: the base is input 0 as the op sees it, the first of `inputs:` is
input 1): a fine-tune that added tokens keeps them, whatever the base's vocabulary. Its tokenizer
is the one that fits the output; the planner records its name (`PlannedNode.vocab_from`).
The report's notes say, per key, how many rows the output has, how many were merged and how many
were taken whole from the first input: `{"vocab": {"lm_head.weight": {"rows": 32002, "merged":
32000, "taken_whole": 2}}}`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from merger.archs.embeddings import vocab_mismatches
from merger.core.fused import LinearForm
from merger.core.specs import TensorSpec
from merger.ops.base import AnyOp, ChunkInputs, InputSpecs, NodeSpec, Noted, Op, PieceMode, TensorInputs

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

#: the class attributes a wrapper takes from the op it wraps (its name and version key its entries)
FROM_INNER = ("name", "version", "params_model", "arity", "random", "references", "family_check", "summary")


@dataclass(frozen=True)
class Rows:
    """One vocabulary key: the output's rows (the first input's) and the rows every input has."""

    rows: int
    merged: int

    def note(self) -> dict[str, int]:
        return {"rows": self.rows, "merged": self.merged, "taken_whole": self.rows - self.merged}


@dataclass(frozen=True)
class VocabPlan:
    """The wrapped op's plan, the inputs' specs as it sees them (vocabulary keys cut to their shared
    rows), and the vocabulary keys."""

    inner: Any
    specs: tuple[dict[str, TensorSpec], ...]
    rows: dict[str, Rows]


class VocabFirst(Op[Any, Any, VocabPlan]):
    """An op with `vocab: first` (see the module docstring). Build it with `vocab_first`."""

    def __init__(self, inner: AnyOp, first: int) -> None:
        self.inner = inner
        self.first = first  # the index, as the op sees its inputs, of the first model of `inputs:`

    def check(self, params: Any, n_inputs: int) -> list[str]:
        return self.inner.check(params, n_inputs)

    def summarise_notes(self, noted: Noted) -> dict[str, Any]:
        return self.inner.summarise_notes(noted)

    def spec(self, inputs: InputSpecs, params: Any) -> NodeSpec[VocabPlan]:
        rows = {m.key: Rows(m.rows[self.first], m.shared) for m in vocab_mismatches(inputs.specs)}
        cut = tuple(
            {k: TensorSpec(t.dtype, (rows[k].merged, *t.shape[1:])) if k in rows else t for k, t in spec.items()}
            for spec in inputs.specs
        )
        inner = self.inner.spec(replace(inputs, specs=cut), params)
        tensors = {
            k: TensorSpec(t.dtype, (rows[k].rows, *t.shape[1:])) if k in rows else t for k, t in inner.tensors.items()
        }
        rows = {k: r for k, r in rows.items() if k in tensors}
        notes = {**inner.notes, "vocab": {k: r.note() for k, r in rows.items()}}
        return NodeSpec(tensors=tensors, plan=VocabPlan(inner.plan, cut, rows), notes=notes)

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: VocabPlan) -> PieceMode:
        mode = self.inner.piece_mode(key, plan.specs, plan.inner)
        return mode if key not in plan.rows or mode == "stream" else "tensor"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: VocabPlan) -> list[tuple[int, str]]:
        reads: list[tuple[int, str]] = self.inner.needs(key, plan.specs, plan.inner)
        if key in plan.rows and (self.first, key) not in reads:
            reads = [*reads, (self.first, key)]
        return reads

    def combine(self, values: list[Array], params: Any, xp: Backend) -> Array:
        return self.inner.combine(values, params, xp)

    def linear_form(self, params: Any, inputs: int) -> LinearForm | None:
        return self.inner.linear_form(params, inputs)

    def stream(self, key: str, inputs: ChunkInputs[VocabPlan], params: Any, xp: Backend) -> Iterator[Array]:
        plan = inputs.plan
        yield from self.inner.stream(key, _CutChunks(inputs), params, xp)
        rows = plan.rows.get(key)
        if rows is not None and rows.rows > rows.merged:  # the first input's other rows, as they are
            per_row = math.prod(plan.specs[self.first][key].shape[1:])
            span = (rows.merged * per_row, rows.rows * per_row)
            for (chunk,) in inputs.chunks([(self.first, key)], span=span):
                yield chunk

    def tensor(self, key: str, inputs: TensorInputs[VocabPlan], params: Any, xp: Backend) -> Array:
        plan = inputs.plan
        cut = _CutInputs(inputs)
        if key not in plan.rows:
            return self.inner.tensor(key, cut, params, xp)
        rows = plan.rows[key]
        mode = self.inner.piece_mode(key, plan.specs, plan.inner)
        reads = self.inner.needs(key, plan.specs, plan.inner)
        if mode == "merge":
            values = [cut.read(i, k).reshape(-1) for i, k in reads]
            shape = plan.specs[self.first][key].shape
            merged = self.inner.combine(values, params, xp).reshape(shape)
        elif mode == "tensor":
            merged = self.inner.tensor(key, cut, params, xp)
        else:  # the op copies the key from one input: its shared rows
            merged = cut.read(*reads[0])
        out = xp.copy(inputs.read(self.first, key))
        out[: rows.merged] = merged
        return out


class _CutInputs:
    """The inputs as the wrapped op sees them: its own plan, vocabulary keys cut to the shared rows."""

    def __init__(self, inputs: TensorInputs[VocabPlan]) -> None:
        self._inputs = inputs

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]:
        return self._inputs.plan.specs

    @property
    def plan(self) -> Any:
        return self._inputs.plan.inner

    def read(self, index: int, key: str) -> Array:
        array = self._inputs.read(index, key)
        rows = self._inputs.plan.rows.get(key)
        return array[: rows.merged] if rows is not None else array

    def note(self, name: str, value: float) -> None:
        self._inputs.note(name, value)


class _CutChunks:
    """`_CutInputs` for streaming ops: a vocabulary key's chunks span its shared rows only."""

    def __init__(self, inputs: ChunkInputs[VocabPlan]) -> None:
        self._inputs = inputs

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]:
        return self._inputs.plan.specs

    @property
    def plan(self) -> Any:
        return self._inputs.plan.inner

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
        cut = [self.specs[index][key].numel for index, key in reads if key in self._inputs.plan.rows]
        if cut and span is None:
            span = (0, cut[0])
        return self._inputs.chunks(reads, multiple=multiple, span=span, peek=peek, stored=stored, again=again)

    def note(self, name: str, value: float) -> None:
        self._inputs.note(name, value)


def vocab_first(inner: AnyOp, first: int) -> VocabFirst:
    """`inner` with `vocab: first`; `first` is the index of the node's first model of `inputs:` among
    the inputs as the op sees them (after its references, e.g. the base). The wrapper has the
    op's name, version and other class attributes: the planner puts `vocab` in the node's
    content key beside them."""
    attributes: dict[str, Any] = {name: getattr(inner, name) for name in FROM_INNER}
    wrapper: type[VocabFirst] = type(f"VocabFirst[{type(inner).__name__}]", (VocabFirst,), attributes)
    return wrapper(inner, first)
