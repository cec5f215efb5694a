"""model_stock: the interpolation ratio from the angle between task vectors.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models".
For fine-tuned models w_1..w_N of a base w_0, per tensor (or, with
`filter_wise`, per vector along the last axis of a matrix):

    cos = mean over pairs i < j of <w_i - w_0, w_j - w_0> / (|w_i - w_0| |w_j - w_0|)
    t = N cos / (1 + (N - 1) cos)                  (0 where the denominator vanishes)
    result = t * mean_i(w_i) + (1 - t) * w_0

as mergekit computes it. `clamp: true` keeps t in [0, 1] (a variant, off by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merger.ops.base import Arity, TensorInputs
from merger.ops.elementwise import Merged, MergeParams, WholeTensorOp

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend


class ModelStockParams(MergeParams):
    base: str
    filter_wise: bool = False
    clamp: bool = False


class ModelStock(WholeTensorOp[ModelStockParams, ModelStockParams]):
    """Average of the fine-tuned models, pulled towards the base by their angle."""

    name = "model_stock"
    params_model = ModelStockParams
    references = ("base",)
    arity = Arity(2, None)
    summary = "Model Stock: ratio from the angle between task vectors"

    def merge(self, key: str, inputs: TensorInputs[Merged], params: ModelStockParams, xp: Backend) -> Array:
        base = inputs.read(0, key)
        shape = base.shape
        rows = params.filter_wise and len(shape) > 1  # as mergekit: vectors along the last axis
        flat = base.reshape(-1, shape[-1]) if rows else base.reshape(1, -1)
        models = [inputs.read(i, key).reshape(flat.shape) for i in range(1, len(inputs.specs))]
        offsets = [m - flat for m in models]
        norms = [xp.row_sums(o * o) ** 0.5 for o in offsets]
        cosines = []
        for i in range(len(offsets)):
            for j in range(i + 1, len(offsets)):
                product = norms[i] * norms[j]
                product = xp.where(product < 1e-6, 1e-6, product)
                cosine = xp.row_sums(offsets[i] * offsets[j]) / product
                cosines.append(xp.where(cosine > 1.0, 1.0, xp.where(cosine < -1.0, -1.0, cosine)))
        cos = cosines[0] + 0.0
        for extra in cosines[1:]:
            cos += extra
        cos = cos / len(cosines)
        count = len(models)
        denominator = 1.0 + (count - 1) * cos
        singular = xp.abs(denominator) < 1e-6
        t = xp.where(singular, 0.0, count * cos / xp.where(singular, 1.0, denominator))
        if params.clamp:
            t = xp.where(t > 1.0, 1.0, xp.where(t < 0.0, 0.0, t))
        average = models[0] + 0.0
        for model in models[1:]:
            average += model
        average = average / count
        return (t * average + (1.0 - t) * flat).reshape(shape)
