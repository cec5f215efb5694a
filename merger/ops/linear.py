"""Linear combinations: lerp (network interpolation), weighted sum, average, add difference.

All are per-key maths (see `merger.ops.elementwise`), written with operators
only, so they run on numpy and torch arrays alike; each combine allocates a new
array and leaves its inputs untouched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Generic

from merger.core.fused import LinearForm
from merger.errors import MergerError
from merger.ops.base import Arity
from merger.ops.elementwise import ElementwiseOp, MergeParams
from merger.ops.params import N, Scheduled

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend


class LerpParams(MergeParams, Generic[N]):
    alpha: N


class Lerp(ElementwiseOp[LerpParams[Scheduled], LerpParams[float]]):
    """`(1 - alpha) * A + alpha * B`: ESRGAN's network interpolation (`net_interp.py`).

    alpha = 0 gives A, 1 gives B; outside [0, 1] it extrapolates (allowed, with a warning).
    """

    name = "lerp"
    params_model = LerpParams[Scheduled]
    arity = Arity(2, 2)
    summary = "(1-alpha)*A + alpha*B: interpolate two models (DNI)"

    def check(self, params: LerpParams[float], n_inputs: int) -> list[str]:
        if not 0.0 <= params.alpha <= 1.0:
            return [f"alpha={params.alpha} is outside [0, 1]: this extrapolates past the inputs"]
        return []

    def linear_form(self, params: LerpParams[float], inputs: int) -> LinearForm:
        return LinearForm("sum", (1.0 - params.alpha, params.alpha))

    def combine(self, values: list[Array], params: LerpParams[float], xp: Backend) -> Array:
        a, b = values
        out = a * (1.0 - params.alpha)
        out += b * params.alpha
        return out


class WeightedSumParams(MergeParams, Generic[N]):
    weights: list[N]
    normalize: bool = False


class WeightedSum(ElementwiseOp[WeightedSumParams[Scheduled], WeightedSumParams[float]]):
    """`sum_i w_i * M_i`, divided by `sum_i w_i` when `normalize` is true."""

    name = "weighted_sum"
    params_model = WeightedSumParams[Scheduled]
    arity = Arity(1, None)
    summary = "sum of w_i * M_i (normalize: divide by the sum of weights)"

    def check(self, params: WeightedSumParams[float], n_inputs: int) -> list[str]:
        weights = params.weights
        if len(weights) != n_inputs:
            raise MergerError(
                f"weights has {len(weights)} values for {n_inputs} inputs",
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

    def linear_form(self, params: WeightedSumParams[float], inputs: int) -> LinearForm:
        return LinearForm("sum", tuple(params.weights), sum(params.weights) if params.normalize else None)

    def combine(self, values: list[Array], params: WeightedSumParams[float], xp: Backend) -> Array:
        weights = params.weights
        out = values[0] * weights[0]
        for value, weight in zip(values[1:], weights[1:], strict=True):
            out += value * weight
        if params.normalize:
            out /= sum(weights)
        return out


class Average(ElementwiseOp[MergeParams, MergeParams]):
    """`(M_1 + ... + M_n) / n`: the mean of a list or folder of models (traiNNer's `dir_interp.py`)."""

    name = "average"
    params_model = MergeParams
    arity = Arity(1, None)
    summary = "mean of N models (a list of inputs or one glob source)"

    def linear_form(self, params: MergeParams, inputs: int) -> LinearForm:
        return LinearForm("sum", (1.0,) * inputs, inputs)

    def combine(self, values: list[Array], params: MergeParams, xp: Backend) -> Array:
        out = xp.copy(values[0])
        for value in values[1:]:
            out += value
        out /= len(values)
        return out


class AddDifferenceParams(MergeParams, Generic[N]):
    multiplier: N = 1.0  # type: ignore[assignment]


class AddDifference(ElementwiseOp[AddDifferenceParams[Scheduled], AddDifferenceParams[float]]):
    """`A + multiplier * (B - C)`: graft what B learned on top of C onto A."""

    name = "add_difference"
    params_model = AddDifferenceParams[Scheduled]
    arity = Arity(3, 3)
    summary = "A + multiplier*(B - C)"

    def linear_form(self, params: AddDifferenceParams[float], inputs: int) -> LinearForm:
        return LinearForm("add_difference", (params.multiplier,))

    def combine(self, values: list[Array], params: AddDifferenceParams[float], xp: Backend) -> Array:
        a, b, c = values
        out = b - c
        out *= params.multiplier
        out += a
        return out
