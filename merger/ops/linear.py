"""Linear combinations: lerp (network interpolation), weighted sum, average, add difference.

All are per-key maths (see `merger.ops.elementwise`), written with operators
only, so they run on numpy and torch arrays alike; each combine allocates a new
array and leaves its inputs untouched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from merger.errors import MergerError
from merger.ops.base import Arity
from merger.ops.elementwise import ElementwiseOp, MergeParams
from merger.schedule import Scheduled, number

if TYPE_CHECKING:
    from merger.arrays import Array, Backend


class LerpParams(MergeParams):
    alpha: Scheduled


class Lerp(ElementwiseOp):
    """`(1 - alpha) * A + alpha * B`: ESRGAN's network interpolation (`net_interp.py`).

    alpha = 0 gives A, 1 gives B; outside [0, 1] it extrapolates (allowed, with a warning).
    """

    name = "lerp"
    params_model = LerpParams
    arity = Arity(2, 2)
    summary = "(1-alpha)*A + alpha*B: interpolate two models (DNI)"

    def check(self, params: LerpParams, n_inputs: int) -> list[str]:
        alpha = number(params.alpha)
        if not 0.0 <= alpha <= 1.0:
            return [f"alpha={alpha} is outside [0, 1]: this extrapolates past the inputs"]
        return []

    def combine(self, values: list[Array], params: LerpParams, xp: Backend) -> Array:
        a, b = values
        alpha = number(params.alpha)
        out = a * (1.0 - alpha)
        out += b * alpha
        return out


class WeightedSumParams(MergeParams):
    weights: list[Scheduled]
    normalize: bool = False


class WeightedSum(ElementwiseOp):
    """`sum_i w_i * M_i`, divided by `sum_i w_i` when `normalize` is true."""

    name = "weighted_sum"
    params_model = WeightedSumParams
    arity = Arity(1, None)
    summary = "sum of w_i * M_i (normalize: divide by the sum of weights)"

    def check(self, params: WeightedSumParams, n_inputs: int) -> list[str]:
        weights = [number(w) for w in params.weights]
        if len(weights) != n_inputs:
            raise MergerError(
                f"weights has {len(params.weights)} values for {n_inputs} inputs",
                fix="give one weight per input, in the order of inputs",
            )
        if not all(math.isfinite(w) for w in weights):
            raise MergerError("weights must be finite numbers", fix="remove inf/nan from weights")
        if params.normalize and math.isclose(sum(weights), 0.0, abs_tol=1e-12):
            raise MergerError(
                "normalize: true with weights that sum to 0 divides by zero",
                fix="use weights with a non-zero sum, or normalize: false",
            )
        return []

    def combine(self, values: list[Array], params: WeightedSumParams, xp: Backend) -> Array:
        weights = [number(w) for w in params.weights]
        out = values[0] * weights[0]
        for value, weight in zip(values[1:], weights[1:], strict=True):
            out += value * weight
        if params.normalize:
            out /= sum(weights)
        return out


class Average(ElementwiseOp):
    """`(M_1 + ... + M_n) / n`: the mean of a list or folder of models (traiNNer's `dir_interp.py`)."""

    name = "average"
    params_model = MergeParams
    arity = Arity(1, None)
    summary = "mean of N models (a list of inputs or one glob source)"

    def combine(self, values: list[Array], params: MergeParams, xp: Backend) -> Array:
        out = xp.copy(values[0])
        for value in values[1:]:
            out += value
        out /= len(values)
        return out


class AddDifferenceParams(MergeParams):
    multiplier: Scheduled = 1.0


class AddDifference(ElementwiseOp):
    """`A + multiplier * (B - C)`: graft what B learned on top of C onto A."""

    name = "add_difference"
    params_model = AddDifferenceParams
    arity = Arity(3, 3)
    summary = "A + multiplier*(B - C)"

    def combine(self, values: list[Array], params: AddDifferenceParams, xp: Backend) -> Array:
        a, b, c = values
        out = b - c
        out *= number(params.multiplier)
        out += a
        return out
