"""Merges of task vectors (theta_i - base): task arithmetic, TIES, DARE.

One core, as mergekit's "generalized task arithmetic" (whose conventions these
follow exactly, so that equal parameters give mergekit's results):

    delta_i = theta_i - base                       (per tensor)
    delta_i = sparsify(delta_i, density_i)         TIES: keep the top max(1, int(density * n)) by |delta|
                                                         (of equal magnitudes at the cut, the first)
                                                   DARE: drop each with probability 1 - density,
                                                         rescale the rest by 1 / density
    delta_i = w_i * delta_i
    TIES sign election: s = sign(sum_i delta_i) (sum of the weighted trimmed deltas; +1 at 0);
                        delta_i counts only where sign(delta_i) == s
    mixed = sum_i delta_i
    normalize: mixed /= sum_i w_i over the models that count there (1 where none does)
    result = base + scale * mixed

- `task_arithmetic`: Ilharco et al. 2023, "Editing Models with Task Arithmetic".
- `ties`: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models".
- `dare_linear`, `dare_ties`: Yu et al. 2024, "Language Models are Super Mario" (DARE).
Where several deltas tie at TIES's cut, merger keeps the first in C order;
mergekit's torch.argsort breaks such ties in an unspecified order, so the
two differ there (and only there: such ties are common in large float32
tensors whose deltas are rounded to the base's precision).
`base` names the model the others were fine-tuned from; `inputs` are the
fine-tuned models; `weights` and `density` take one number, or one per input;
`scale` is mergekit's `lambda`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, TypeVar

from merger.errors import MergerError
from merger.ops.base import Arity, TensorInputs, seeded_rng
from merger.ops.elementwise import Merged, MergeParams, WholeTensorOp
from merger.ops.params import N, RandomParams, Scheduled

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend


class TaskArithmeticParams(MergeParams, Generic[N]):
    base: str
    weights: N | list[N] = 1.0  # type: ignore[assignment]
    scale: N = 1.0  # type: ignore[assignment]
    normalize: bool = False


class TiesParams(TaskArithmeticParams[N], Generic[N]):
    density: N | list[N] = 1.0  # type: ignore[assignment]
    normalize: bool = True
    consensus: Literal["sum", "count"] = "sum"


class DareParams(TaskArithmeticParams[N], RandomParams, Generic[N]):
    density: N | list[N] = 1.0  # type: ignore[assignment]
    rescale: Literal["inverse_density", "l1", "none"] = "inverse_density"


class DareTiesParams(DareParams[N], Generic[N]):
    consensus: Literal["sum", "count"] = "sum"


def per_model(value: float | list[float], n: int, name: str) -> list[float]:
    """One value per fine-tuned model, from a number or a list."""
    if isinstance(value, list):
        if len(value) != n:
            raise MergerError(
                f"{name} has {len(value)} values for {n} models",
                fix=f"give {name} one number for all, or one per input, in the order of inputs",
            )
        return list(value)
    return [value] * n


T = TypeVar("T", bound=TaskArithmeticParams[Scheduled])
F = TypeVar("F", bound=TaskArithmeticParams[float])


class TaskVectorOp(WholeTensorOp[T, F]):
    """The shared core; subclasses choose sparsification and consensus."""

    references = ("base",)
    arity = Arity(1, None)
    sparsify: ClassVar[str | None] = None  # "magnitude" | "random"
    elects_sign: ClassVar[bool] = False

    def check(self, params: F, n_inputs: int) -> list[str]:
        per_model(params.weights, n_inputs, "weights")
        for density in per_model(getattr(params, "density", 1.0), n_inputs, "density"):
            if not 0.0 <= density <= 1.0:
                raise MergerError(f"density {density} is not between 0 and 1", fix="use a density in [0, 1]")
        return []

    def _sparsified(self, key: str, delta: Array, density: float, index: int, params: F, xp: Backend) -> Array:
        if self.sparsify is None or density >= 1.0:
            return delta
        count = math.prod(delta.shape)
        if density <= 0.0 or count == 0:
            return delta * 0.0
        if self.sparsify == "magnitude":
            mask = xp.top_k_mask(xp.abs(delta), max(1, int(density * count)))
            return xp.where(mask, delta, 0.0)
        assert isinstance(params, DareParams)
        keep = seeded_rng(params.seed, f"{key}#{index}").random(count, dtype="float32") < density
        kept = xp.where(xp.asarray(keep.reshape(tuple(delta.shape))), delta, 0.0)
        if params.rescale == "inverse_density":
            return kept / density
        if params.rescale == "l1":
            before, after = xp.total(xp.abs(delta)), xp.total(xp.abs(kept))
            return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
        return kept

    def merge(self, key: str, inputs: TensorInputs[Merged], params: F, xp: Backend) -> Array:
        base = inputs.read(0, key)
        n = len(inputs.specs) - 1
        weights = per_model(params.weights, n, "weights")
        densities = per_model(getattr(params, "density", 1.0), n, "density")
        deltas = []
        for i in range(n):
            delta = self._sparsified(key, inputs.read(i + 1, key) - base, densities[i], i, params, xp)
            deltas.append(delta * weights[i])
        if self.elects_sign:
            assert isinstance(params, TiesParams | DareTiesParams)
            if params.consensus == "sum":
                total = deltas[0] + 0.0
                for delta in deltas[1:]:
                    total += delta
            else:
                total = xp.sign(deltas[0])
                for delta in deltas[1:]:
                    total += xp.sign(delta)
            positive = total >= 0  # the elected sign: + where the vote is 0
            mixed = base * 0.0
            divisor = base * 0.0
            for delta, weight in zip(deltas, weights, strict=True):
                agrees = xp.where(positive, delta > 0, delta < 0)  # a zero delta never agrees
                mixed += xp.where(agrees, delta, 0.0)
                divisor += xp.where(agrees, weight, 0.0)
            divisor = xp.where(divisor == 0, 1.0, divisor)
        else:
            mixed = deltas[0] + 0.0
            for delta in deltas[1:]:
                mixed += delta
            total_weight = sum(weights)
            divisor = total_weight if abs(total_weight) >= 1e-8 else 1.0
        if params.normalize:
            mixed = mixed / divisor
        scale = params.scale
        if scale != 1.0:
            mixed = mixed * scale
        return base + mixed


class TaskArithmetic(TaskVectorOp[TaskArithmeticParams[Scheduled], TaskArithmeticParams[float]]):
    """`base + scale * sum_i w_i (theta_i - base)` (divided by sum_i w_i with normalize)."""

    name = "task_arithmetic"
    params_model = TaskArithmeticParams[Scheduled]
    summary = "base + sum of weighted task vectors (theta_i - base)"


class Ties(TaskVectorOp[TiesParams[Scheduled], TiesParams[float]]):
    """TIES: trim each task vector to its top density, elect signs, average the agreeing values."""

    name = "ties"
    version = 2  # 2: deltas tied at the cut are kept in C order (version 1 entries broke such ties otherwise)
    params_model = TiesParams[Scheduled]
    sparsify = "magnitude"
    elects_sign = True
    summary = "TIES: trim to top density, elect sign, mean of agreeing deltas"


class DareLinear(TaskVectorOp[DareParams[Scheduled], DareParams[float]]):
    """DARE: drop each delta with probability 1 - density, rescale the rest, add them up."""

    name = "dare_linear"
    params_model = DareParams[Scheduled]
    sparsify = "random"
    random = True
    summary = "DARE: random drop of deltas, rescaled, summed (seeded)"


class DareTies(TaskVectorOp[DareTiesParams[Scheduled], DareTiesParams[float]]):
    """DARE's random drop, then TIES's sign election."""

    name = "dare_ties"
    params_model = DareTiesParams[Scheduled]
    sparsify = "random"
    elects_sign = True
    random = True
    summary = "DARE drop + TIES sign election (seeded)"
