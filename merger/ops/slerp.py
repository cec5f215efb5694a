"""slerp: spherical linear interpolation of two models, tensor by tensor.

Each tensor is treated as one vector (Shoemake 1985, "Animating rotation with
quaternion curves"; in model merging since Ilharco et al. and mergekit):

    cos(theta) = <A/|A|, B/|B|>,  result = sin((1-t) theta)/sin(theta) * A + sin(t theta)/sin(theta) * B

and, where the vectors are nearly parallel or opposite (|cos(theta)| above
`dot_threshold`, 0.9995 as in mergekit), `(1-t) * A + t * B`. t = 0 gives A.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Generic

from merger.ops.base import Arity, TensorInputs
from merger.ops.elementwise import Merged, MergeParams, WholeTensorOp
from merger.ops.params import N, Scheduled

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

EPS = 1e-8


class SlerpParams(MergeParams, Generic[N]):
    t: N
    dot_threshold: float = 0.9995


class Slerp(WholeTensorOp[SlerpParams[Scheduled], SlerpParams[float]]):
    """Spherical interpolation per tensor; lerp where the tensors are nearly parallel."""

    name = "slerp"
    params_model = SlerpParams[Scheduled]
    arity = Arity(2, 2)
    summary = "spherical interpolation per tensor (lerp when nearly parallel)"

    def check(self, params: SlerpParams[float], n_inputs: int) -> list[str]:
        t = params.t
        return [] if 0.0 <= t <= 1.0 else [f"t={t} is outside [0, 1]: this extrapolates past the inputs"]

    def merge(self, key: str, inputs: TensorInputs[Merged], params: SlerpParams[float], xp: Backend) -> Array:
        a, b, t = inputs.read(0, key), inputs.read(1, key), params.t
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
