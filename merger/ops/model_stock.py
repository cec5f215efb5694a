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

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from merger.ops.base import Arity, ChunkInputs
from merger.ops.elementwise import Merged, MergeParams
from merger.ops.streaming import Passes, StreamingOp, blocks

if TYPE_CHECKING:
    import numpy as np

    from merger.core.arrays import Array, Backend


class ModelStockParams(MergeParams):
    base: str
    filter_wise: bool = False
    clamp: bool = False


class ModelStock(StreamingOp[ModelStockParams, ModelStockParams]):
    """Average of the fine-tuned models, pulled towards the base by their angle."""

    name = "model_stock"
    params_model = ModelStockParams
    references = ("base",)
    arity = Arity(2, None)
    summary = "Model Stock: ratio from the angle between task vectors"

    def stream(self, key: str, inputs: ChunkInputs[Merged], params: ModelStockParams, xp: Backend) -> Iterator[Array]:
        shape = inputs.specs[0][key].shape
        rows = params.filter_wise and len(shape) > 1  # as mergekit: vectors along the last axis
        width = shape[-1] if rows else math.prod(shape)  # the elements of one vector
        models = len(inputs.specs) - 1
        passes = Passes(inputs, [(i, key) for i in range(models + 1)], multiple=width if rows else 1)
        wide = any(spec[key].dtype == "F64" for spec in inputs.specs)
        t = xp.asarray(self._ratios(passes, shape, rows, wide, params, xp).reshape(-1, 1))
        row = 0
        for chunk in passes():
            for block in blocks(chunk, xp.block_elements, multiple=width if rows else 1):
                base, *tuned = (a.reshape(-1, width) if rows else a.reshape(1, -1) for a in block)
                ratio = t[row : row + len(base)] if rows else t
                row += len(base) if rows else 0
                average = tuned[0] + 0.0
                for model in tuned[1:]:
                    average += model
                average = average / models
                yield (ratio * average + (1.0 - ratio) * base).reshape(-1)

    def _ratios(
        self, passes: Passes, shape: tuple[int, ...], rows: bool, wide: bool, params: ModelStockParams, xp: Backend
    ) -> np.ndarray:
        """t per vector, from a pass that sums the offsets' squares and products per vector. Each
        vector (a row, with `filter_wise`) is summed whole in the maths' dtype, as version 1 did, so
        that t is version 1's bit for bit; a whole tensor of several chunks is summed block by block,
        the blocks' sums added in float64."""
        import numpy as np

        width = shape[-1] if rows else math.prod(shape)  # the elements of one vector
        vectors = (math.prod(shape) // width if width else 0) if rows else 1
        dtype: Any = np.float64 if wide else np.float32
        models = passes.inputs - 1
        pairs = [(i, j) for i in range(models) for j in range(i, models)]
        sums = {pair: np.zeros(vectors) for pair in pairs}
        whole = passes.whole()
        row = 0
        for chunk in passes():
            if rows:
                pieces = blocks(chunk, xp.block_elements, multiple=width)
            else:  # one vector: a tensor of one chunk in one piece (version 1's sum), else by blocks
                pieces = iter([chunk]) if whole is not None else blocks(chunk, xp.block_elements)
            for block in pieces:
                base = block[0].reshape(-1, width) if rows else block[0].reshape(1, -1)
                offsets = [m.reshape(base.shape) - base for m in block[1:]]
                for i, j in pairs:
                    sums[i, j][row : row + len(base)] += xp.row_dots(offsets[i], offsets[j])
                row += len(base) if rows else 0
        # from here on version 1's maths, in the maths' dtype
        norms = [sums[i, i].astype(dtype) ** 0.5 for i in range(models)]
        cosines = []
        for i in range(models):
            for j in range(i + 1, models):
                product = norms[i] * norms[j]
                product = np.where(product < 1e-6, 1e-6, product)
                cosine = sums[i, j].astype(dtype) / product
                cosines.append(np.where(cosine > 1.0, 1.0, np.where(cosine < -1.0, -1.0, cosine)))
        cos = cosines[0] + 0.0
        for extra in cosines[1:]:
            cos += extra
        cos = cos / len(cosines)
        denominator = 1.0 + (models - 1) * cos
        singular = np.abs(denominator) < 1e-6
        t = np.where(singular, 0.0, models * cos / np.where(singular, 1.0, denominator))
        if params.clamp:
            t = np.where(t > 1.0, 1.0, np.where(t < 0.0, 0.0, t))
        return t.astype(dtype)
