"""slerp: spherical linear interpolation of two models, tensor by tensor.

Each tensor is treated as one vector (Shoemake 1985, "Animating rotation with
quaternion curves"; in model merging since Ilharco et al. and mergekit):

    cos(theta) = <A/|A|, B/|B|>,  result = sin((1-t) theta)/sin(theta) * A + sin(t theta)/sin(theta) * B

and, where the vectors are nearly parallel or opposite (|cos(theta)| above
`dot_threshold`, 0.9995 as in mergekit), `(1-t) * A + t * B`. t = 0 gives A.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from merger.ops.base import Arity, InputSpecs, NodeSpec, Op, TensorInputs
from merger.ops.elementwise import MergeParams, align
from merger.schedule import Scheduled, number
from merger.specs import TensorSpec

if TYPE_CHECKING:
    from merger.arrays import Array, Backend

EPS = 1e-8


class SlerpParams(MergeParams):
    t: Scheduled
    dot_threshold: float = 0.9995


class Slerp(Op):
    """Spherical interpolation per tensor; linear where the tensors are (anti)parallel."""

    family_check = True

    name = "slerp"
    params_model = SlerpParams
    arity = Arity(2, 2)
    summary = "spherical interpolation per tensor (lerp when nearly parallel)"

    def check(self, params: SlerpParams, n_inputs: int) -> list[str]:
        t = number(params.t)
        return [] if 0.0 <= t <= 1.0 else [f"t={t} is outside [0, 1]: this extrapolates past the inputs"]

    def spec(self, inputs: InputSpecs, params: Any) -> NodeSpec:
        return align(inputs, params)

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: set[str]) -> str:
        return "tensor" if key in plan else "copy"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: set[str]) -> list[tuple[int, str]]:
        return [(0, key), (1, key)] if key in plan else [(0, key)]

    def tensor(self, key: str, inputs: TensorInputs, params: SlerpParams, xp: Backend) -> Array:
        a = inputs.read(0, key)
        if key not in inputs.plan:
            return a
        b = inputs.read(1, key)
        t = number(params.t)
        norm_a = math.sqrt(xp.total(a * a))
        norm_b = math.sqrt(xp.total(b * b))
        norm_a = norm_a if norm_a > EPS else 1.0
        norm_b = norm_b if norm_b > EPS else 1.0
        dot = max(-1.0, min(1.0, xp.total((a / norm_a) * (b / norm_b))))
        if abs(dot) > params.dot_threshold or math.prod(a.shape) == 0:
            return a * (1.0 - t) + b * t
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        return a * (math.sin((1.0 - t) * theta) / sin_theta) + b * (math.sin(t * theta) / sin_theta)
