"""slerp: spherical linear interpolation of two models, tensor by tensor.

Each tensor is treated as one vector (Shoemake 1985, "Animating rotation with
quaternion curves"; in model merging since Ilharco et al. and mergekit):

    cos(theta) = <A/|A|, B/|B|>,  result = sin((1-t) theta)/sin(theta) * A + sin(t theta)/sin(theta) * B

and, where the vectors are nearly parallel or opposite (|cos(theta)| above
`dot_threshold`, 0.9995 as in mergekit), `(1-t) * A + t * B`. t = 0 gives A.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic

from merger.ops.base import Arity, ChunkInputs
from merger.ops.elementwise import Merged, MergeParams
from merger.ops.params import N, Scheduled
from merger.ops.streaming import Passes, StreamingOp, blocks

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

EPS = 1e-8


class SlerpParams(MergeParams, Generic[N]):
    t: N
    dot_threshold: float = 0.9995


class Slerp(StreamingOp[SlerpParams[Scheduled], SlerpParams[float]]):
    """Spherical interpolation per tensor; lerp where the tensors are nearly parallel."""

    name = "slerp"
    params_model = SlerpParams[Scheduled]
    arity = Arity(2, 2)
    summary = "spherical interpolation per tensor (lerp when nearly parallel)"

    def check(self, params: SlerpParams[float], n_inputs: int) -> list[str]:
        t = params.t
        return [] if 0.0 <= t <= 1.0 else [f"t={t} is outside [0, 1]: this extrapolates past the inputs"]

    def stream(self, key: str, inputs: ChunkInputs[Merged], params: SlerpParams[float], xp: Backend) -> Iterator[Array]:
        passes, t = Passes(inputs, [(0, key), (1, key)]), params.t
        dot = max(-1.0, min(1.0, cosine(passes, xp)))
        if abs(dot) > params.dot_threshold:
            weight_a, weight_b = 1.0 - t, t
        else:
            theta = math.acos(dot)
            sin_theta = math.sin(theta)
            weight_a, weight_b = math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
        for chunk in passes():
            for a, b in blocks(chunk, xp.block_elements):
                yield a * weight_a + b * weight_b


def cosine(passes: Passes, xp: Backend) -> float:
    """<A/|A|, B/|B|> (a zero norm counts as 1): of a tensor of one chunk as version 1 computed it, bit
    for bit; of a larger one from the squared norms and the dot product summed over blocks in float64."""
    whole = passes.whole()
    if whole is not None:
        a, b = whole
        norm_a, norm_b = _norm(xp.total(a * a)), _norm(xp.total(b * b))
        return xp.total((a / norm_a) * (b / norm_b))
    aa = bb = ab = 0.0
    for chunk in passes():
        for x, y in blocks(chunk, xp.block_elements):
            rows_x, rows_y = x.reshape(1, -1), y.reshape(1, -1)
            aa += float(xp.row_dots(rows_x, rows_x)[0])
            bb += float(xp.row_dots(rows_y, rows_y)[0])
            ab += float(xp.row_dots(rows_x, rows_y)[0])
    return ab / (_norm(aa) * _norm(bb))


def _norm(squares: float) -> float:
    norm = math.sqrt(squares)
    return norm if norm > EPS else 1.0
