"""The shared helper for per-key maths over aligned keys (lerp, weighted sums, ...).

Key policy (`keys:` on the node):
- `strict` (default): every input has the same keys with the same shapes, or
  the plan fails and names up to 10 differences with both shapes.
- `intersection`: keys that every input has with one shape are merged; the
  rest is copied from the first input, and the report says how many
  (`not_shared`) and which (`copied_keys`, the first 50).
Non-float tensors (e.g. BatchNorm's `num_batches_tracked`) are copied from the
first input. Maths runs in float32 at least, whatever the storage dtype; the
result takes the first input's dtype. Copies pass bytes through untouched.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from merger.errors import MergerError
from merger.ops.base import InputSpecs, NodeSpec, Op, OpParams, TensorInputs
from merger.specs import TensorSpec, spec_differences

if TYPE_CHECKING:
    from merger.arrays import Array, Backend

MAX_LISTED = 10


class MergeParams(OpParams):
    keys: Literal["strict", "intersection"] = "strict"


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


def align(inputs: InputSpecs, policy: str) -> NodeSpec:
    """The output spec of a per-key merge under the key policy, or the mismatch error."""
    first = inputs.specs[0]
    if len(inputs) > 1 and policy == "strict":
        diffs = spec_differences(inputs.names, inputs.specs)
        if diffs:
            shown = "\n".join(f"  {line}" for line in diffs[:MAX_LISTED])
            more = f"\n  ... and {len(diffs) - MAX_LISTED} more" if len(diffs) > MAX_LISTED else ""
            raise MergerError(
                f"the inputs' keys or shapes differ ({len(diffs)} differences):\n{shown}{more}",
                fix="merge models of one architecture, or set `keys: intersection` on the node"
                " to merge the common keys and copy the rest from the first input",
            )
    merged = [k for k in first if mergeable(k, inputs.specs)]
    merged_set = set(merged)
    copied = [k for k in first if k not in merged_set]
    not_float = sum(not first[k].is_float for k in copied)
    notes: dict[str, Any] = {"merged": len(merged), "copied": len(copied), "not_shared": len(copied) - not_float}
    if copied:
        notes["copied_keys"] = copied[:50]
    return NodeSpec(tensors=dict(first), notes=notes)


class ElementwiseOp(Op):
    """A per-key op: subclasses give `combine`, the maths over aligned float arrays.

    The executor feeds `combine` flat chunks of each merged tensor, in float32
    (or float64), and casts the result to the first input's dtype.
    """

    def spec(self, inputs: InputSpecs, params: Any) -> NodeSpec:
        return align(inputs, params.keys)

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Any) -> str:
        return "merge" if mergeable(key, specs) else "copy"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Any) -> list[tuple[int, str]]:
        return [(i, key) for i in range(len(specs))] if mergeable(key, specs) else [(0, key)]

    def tensor(self, key: str, inputs: TensorInputs, params: Any, xp: Backend) -> Array:
        if not mergeable(key, inputs.specs):
            return inputs.read(0, key)
        return self.combine([inputs.read(i, key) for i in range(len(inputs.specs))], params, xp)

    @abstractmethod
    def combine(self, values: list[Array], params: Any, xp: Backend) -> Array:
        """The merged array from the inputs' arrays (same shape, float32 or wider); must
        not modify its inputs."""
