"""splice: a model made of pieces drawn at random from several (traiNNer's net_splice.py, generalised).

`granularity: tensor` (the default) takes each whole key from one input;
`granularity: filter` takes each output filter (row of dim 0) from one input,
and a layer's weight and bias rows together (they are drawn by layer name).
Input i is drawn with probability `probabilities[i]`; for two inputs, `p` is
the chance of taking the second. Draws come from the seed in force and the
key or layer name, so a recipe gives the same model whatever the order,
device or cache state, and two identical nodes give identical results.
Non-float tensors, and keys not every input shares (`keys: intersection`),
come from the first input.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from merger.core.specs import TensorSpec
from merger.errors import MergerError
from merger.ops.base import Arity, InputSpecs, NodeSpec, Op, PieceMode, TensorInputs, seeded_rng
from merger.ops.elementwise import MergeParams, align
from merger.ops.params import RandomParams

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend


class SpliceParams(MergeParams, RandomParams):
    probabilities: list[float] | None = None
    p: float | None = None
    granularity: Literal["tensor", "filter"] = "tensor"


def _probabilities(params: SpliceParams, n: int) -> list[float]:
    if params.p is not None:
        return [1.0 - params.p, params.p]
    if params.probabilities is not None:
        return params.probabilities
    return [1.0 / n] * n


#: the plan of a splice: per merged key, the input it comes from, or one input per filter (an int array)
Drawn = dict[str, Any]


def layer_of(key: str) -> str:
    """The layer a tensor belongs to: its key without a trailing .weight or .bias."""
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


class Splice(Op[SpliceParams, SpliceParams, Drawn]):
    """Each key (or each filter) drawn from one input, at random, seeded."""

    family_check = True
    name = "splice"
    params_model = SpliceParams
    arity = Arity(2, None)
    random = True
    summary = "each key or filter taken from one input at random (seeded)"

    def check(self, params: SpliceParams, n_inputs: int) -> list[str]:
        if params.p is not None and params.probabilities is not None:
            raise MergerError("give p or probabilities, not both", fix="keep one of them")
        if params.p is not None:
            if n_inputs != 2:
                raise MergerError(
                    f"p is for two inputs (the chance of taking the second), this node has {n_inputs}",
                    fix="give probabilities: one per input, summing to 1",
                )
            if not 0.0 <= params.p <= 1.0:
                raise MergerError(f"p={params.p} is not a probability", fix="use a p between 0 and 1")
        if params.probabilities is not None:
            probs = params.probabilities
            if len(probs) != n_inputs or any(q < 0 for q in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise MergerError(
                    f"probabilities {probs} must give one non-negative value per input ({n_inputs}), summing to 1",
                    fix="e.g. probabilities: [0.5, 0.3, 0.2]",
                )
        return []

    def spec(self, inputs: InputSpecs, params: SpliceParams) -> NodeSpec[Drawn]:
        import numpy as np

        aligned = align(inputs, params)
        probs = np.asarray(_probabilities(params, len(inputs)), dtype=np.float64)
        plan: Drawn = {}
        taken = np.zeros(len(inputs))
        for key, spec in aligned.tensors.items():
            if key not in aligned.plan:
                taken[0] += spec.numel
                continue
            if params.granularity == "filter" and spec.shape:
                rows = seeded_rng(params.seed, layer_of(key)).choice(len(inputs), size=spec.shape[0], p=probs)
                plan[key] = rows
                taken += np.bincount(rows, minlength=len(inputs)) * (spec.numel // max(spec.shape[0], 1))
            else:
                plan[key] = int(seeded_rng(params.seed, key).choice(len(inputs), p=probs))
                taken[plan[key]] += spec.numel
        total = max(taken.sum(), 1)
        notes = dict(aligned.notes)
        notes["fractions"] = {name: round(float(t / total), 4) for name, t in zip(inputs.names, taken, strict=True)}
        return NodeSpec(tensors=aligned.tensors, notes=notes, plan=plan)

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Drawn) -> PieceMode:
        choice = plan.get(key, 0)
        if not isinstance(choice, int) or specs[choice][key].dtype != specs[0][key].dtype:
            return "tensor"  # rows from several inputs, or a dtype to convert
        return "copy"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Drawn) -> list[tuple[int, str]]:
        choice = plan.get(key, 0)
        if isinstance(choice, int):
            return [(choice, key)]
        return [(int(i), key) for i in sorted(set(choice.tolist()))]

    def tensor(self, key: str, inputs: TensorInputs[Drawn], params: SpliceParams, xp: Backend) -> Array:
        rows = inputs.plan.get(key, 0)
        if isinstance(rows, int):
            return inputs.read(rows, key)
        chosen = sorted(set(rows.tolist()))
        out = xp.copy(inputs.read(chosen[0], key))
        for i in chosen[1:]:
            mask = xp.asarray(rows == i)
            out[mask] = inputs.read(i, key)[mask]
        return out
