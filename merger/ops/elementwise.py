"""Merges over aligned keys: per-key maths fed in chunks (`ElementwiseOp`: lerp, weighted sums, ...)
and maths on whole tensors (`WholeTensorOp`, for ops of one's own; the built-in whole-tensor methods,
slerp, task vectors and Model Stock, stream instead: merger.ops.streaming).

Key policy (`keys:` on the node):
- `strict` (default): every input has the same keys with the same shapes, or
  the plan fails and names up to 10 differences with both shapes.
- `intersection`: keys that every input has with one shape are merged; the
  rest is copied from the first input, and the report says how many
  (`not_shared`) and which (`copied_keys`, the first 50).
Non-float tensors (e.g. BatchNorm's `num_batches_tracked`) are copied from the
first input. Maths runs in float32 at least, whatever the storage dtype; the
result takes the first input's dtype (a node that feeds other nodes keeps its
float16 / bfloat16 results at float32 in its entry: merger.engine.plan). Copies
pass bytes through untouched (cast only from such a float32 entry).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from merger.core.patterns import compile_regex
from merger.core.specs import FLOAT_DTYPES, TensorSpec, spec_differences
from merger.errors import MergerError
from merger.ops.base import InputSpecs, NodeSpec, Op, P, PieceMode, R, TensorInputs
from merger.ops.params import OpParams

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

MAX_LISTED = 10
#: the plan of an aligned merge: the keys that are merged (the others are copied from the first input)
Merged = set[str]


class MergeParams(OpParams):
    keys: Literal["strict", "intersection"] = "strict"
    include: str | None = None  # regex: only keys it finds are merged
    exclude: str | None = None  # regex: keys it finds are not merged
    rest: Literal["copy", "drop"] = "copy"  # keys not merged: from the first input, or left out


def key_filter(params: MergeParams) -> Callable[[str], bool]:
    """Whether a key is to be merged, by `include` / `exclude` (unanchored regex searches)."""
    include = compile_regex(params.include, "include") if params.include is not None else None
    exclude = compile_regex(params.exclude, "exclude") if params.exclude is not None else None
    return lambda key: (include is None or bool(include.search(key))) and not (exclude and exclude.search(key))


def mergeable(key: str, specs: Sequence[dict[str, TensorSpec]]) -> bool:
    """True when every input has `key` with the first input's shape, as a float tensor."""
    first = specs[0].get(key)
    if first is None or not first.is_float:
        return False
    for spec in specs[1:]:
        other = spec.get(key)
        if other is None or other.shape != first.shape or not other.is_float:
            return False
    return True


def align(inputs: InputSpecs, params: MergeParams) -> NodeSpec[Merged]:
    """The output spec of a per-key merge: keys policy, include/exclude and rest applied.

    The plan is the set of keys to merge; every other key of the first input is
    copied from it (or, with `rest: drop`, left out). Inputs with equal specs (the usual case, and
    a dict comparison in C) skip the per-key comparisons.
    """
    filtering = params.include is not None or params.exclude is not None
    selected = key_filter(params)
    first = inputs.specs[0]
    same = all(spec == first for spec in inputs.specs[1:])  # same keys with equal specs: nothing differs
    if len(inputs) > 1 and params.keys == "strict" and not same:
        if filtering:
            chosen = [{k: v for k, v in spec.items() if selected(k)} for spec in inputs.specs]
        else:
            chosen = list(inputs.specs)
        diffs = spec_differences(inputs.names, chosen)
        if diffs:
            shown_diffs = "\n".join(f"  {line}" for line in diffs[:MAX_LISTED])
            more = f"\n  ... and {len(diffs) - MAX_LISTED} more" if len(diffs) > MAX_LISTED else ""
            raise MergerError(
                f"the inputs' keys or shapes differ ({len(diffs)} differences):\n{shown_diffs}{more}",
                fix="merge models of one architecture, or set `keys: intersection` on the node"
                " to merge the common keys and copy the rest from the first input",
            )
    filtered = {k for k in first if not selected(k)} if filtering else set()
    if same:  # every input has the key with this spec: mergeable when it is a float tensor
        merged = [k for k, v in first.items() if v.dtype in FLOAT_DTYPES and k not in filtered]
    else:
        merged = [k for k in first if k not in filtered and mergeable(k, inputs.specs)]
    merged_set = set(merged)
    copied = [k for k in first if k not in merged_set and (params.rest == "copy" or k not in filtered)]
    not_float = sum(not first[k].is_float for k in copied if k not in filtered)
    not_shared = len([k for k in copied if k not in filtered]) - not_float
    notes: dict[str, Any] = {"merged": len(merged), "copied": len(copied), "not_shared": not_shared}
    if filtered:
        notes["filtered" if params.rest == "copy" else "dropped"] = len(filtered)
    if copied:
        notes["copied_keys"] = copied[:50]
    if len(merged) + len(copied) == len(first):  # every key is kept
        tensors = dict(first)
    else:
        kept = merged_set.union(copied)
        tensors = {k: v for k, v in first.items() if k in kept}
    return NodeSpec(tensors=tensors, notes=notes, plan=merged_set)


class AlignedOp(Op[P, R, Merged]):
    """A merge over aligned keys: the keys every input has with one shape are merged (see `align`);
    the others come from the first input. Subclasses are per-key (`ElementwiseOp`) or whole-tensor
    (`WholeTensorOp`) maths."""

    family_check = True

    def spec(self, inputs: InputSpecs, params: P) -> NodeSpec[Merged]:
        assert isinstance(params, MergeParams)
        return align(inputs, params)

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Merged) -> list[tuple[int, str]]:
        return [(i, key) for i in range(len(specs))] if key in plan else [(0, key)]


class ElementwiseOp(AlignedOp[P, R]):
    """A per-key op: subclasses give `combine`, the maths over aligned float arrays.

    The executor feeds `combine` flat chunks of each merged tensor, in float32
    (or float64), and casts the result to the first input's dtype (or, for a node
    that feeds others, keeps it at float32 or wider).
    """

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Merged) -> PieceMode:
        return "merge" if key in plan else "copy"

    def aligned(self, plan: Merged) -> Merged | None:
        own = type(self)
        if own.piece_mode is not ElementwiseOp.piece_mode or own.needs is not AlignedOp.needs:
            return None  # a subclass that reads otherwise: asked key by key
        return plan

    def tensor(self, key: str, inputs: TensorInputs[Merged], params: R, xp: Backend) -> Array:
        if key not in inputs.plan:
            return inputs.read(0, key)
        return self.combine([inputs.read(i, key) for i in range(len(inputs.specs))], params, xp)

    @abstractmethod
    def combine(self, values: list[Array], params: R, xp: Backend) -> Array:
        """The merged array from the inputs' arrays (same shape, float32 or wider); must
        not modify its inputs."""


class WholeTensorOp(AlignedOp[P, R]):
    """A merge that needs each merged tensor whole (norms, top-k, random masks): subclasses give
    `merge`; keys that are not merged are copied from the first input. Memory holds a few whole
    tensors: `merger.ops.streaming.StreamingOp` computes such merges in a few chunks."""

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Merged) -> PieceMode:
        return "tensor" if key in plan else "copy"

    def tensor(self, key: str, inputs: TensorInputs[Merged], params: R, xp: Backend) -> Array:
        if key not in inputs.plan:
            return inputs.read(0, key)
        return self.merge(key, inputs, params, xp)

    @abstractmethod
    def merge(self, key: str, inputs: TensorInputs[Merged], params: R, xp: Backend) -> Array:
        """The merged tensor `key` (every input has it, with one shape, as a float tensor)."""
