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

Each tensor is computed in the memory of a few chunks (merger.ops.streaming), with the float32
maths of a whole-tensor computation element for element: TIES first finds each model's cut by
passes over its deltas' magnitude histograms (merger.ops.topk, exact: the k kept are the same),
DARE draws its drops chunk by chunk from one stream per model (the numbers of one whole draw), and
`rescale: l1` sums the norms in a first pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, TypeVar

from merger.errors import MergerError
from merger.ops.base import Arity, ChunkInputs
from merger.ops.elementwise import Merged, MergeParams
from merger.ops.params import N, RandomParams, Scheduled
from merger.ops.sparsify import Drop, Sparsify, Step, Trim, Zero, sparsified
from merger.ops.streaming import Passes, StreamingOp, blocks
from merger.ops.topk import BINS

if TYPE_CHECKING:
    import numpy as np

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


#: TIES samples a tensor of at least AIMED elements (16 runs of SAMPLE_RUN elements spread over it,
#: or as many elements evenly spread over a tensor of one chunk) to aim its first pass, which counts
#: at most WINDOW_BINS high bins in full around the sample's cut (512 KB each), see merger.ops.topk
AIMED = 1 << 20
SAMPLE_RUN = 8192
WINDOW_BINS = 8

T = TypeVar("T", bound=TaskArithmeticParams[Scheduled])
F = TypeVar("F", bound=TaskArithmeticParams[float])


def _sample(passes: Passes) -> list[list[Array]]:
    """A sample of every input's chunk arrays (spread evenly over the tensor), read once for every
    model's aim."""
    whole = passes.whole()
    if whole is None:
        return passes.peek(SAMPLE_RUN)
    step = max(1, len(whole[0]) // (16 * SAMPLE_RUN))
    return [[array[::step] for array in whole]]


def _sample_counts(sample: list[list[Array]], index: int, xp: Backend) -> np.ndarray:
    """The high-bin counts of the sample of input `index`'s deltas from input 0."""
    import numpy as np

    counts = np.zeros(BINS, dtype=np.int64)
    for arrays in sample:
        xp.magnitude_histogram(arrays[index], counts, (0, 0, arrays[0], None, 0, False))
    return counts


class TaskVectorOp(StreamingOp[T, F]):
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

    def stream(self, key: str, inputs: ChunkInputs[Merged], params: F, xp: Backend) -> Iterator[Array]:
        n = len(inputs.specs) - 1
        weights = per_model(params.weights, n, "weights")
        densities = per_model(getattr(params, "density", 1.0), n, "density")
        spec = inputs.specs[0][key]
        count, base_wide = spec.numel, spec.dtype == "F64"
        parts: list[Sparsify] = []
        for i, density in enumerate(densities):
            if self.sparsify is None or density >= 1.0:
                parts.append(Sparsify())
            elif density <= 0.0 or count == 0:
                parts.append(Zero())
            elif self.sparsify == "magnitude":
                k = max(1, int(density * count))
                # a model's deltas are float64 (their patterns 64 bits) where it or the base is
                width = 64 if base_wide or inputs.specs[i + 1][key].dtype == "F64" else 32
                parts.append(Trim(k, width) if k < count else Sparsify())
            else:
                assert isinstance(params, DareParams)
                parts.append(Drop(params.seed, f"{key}#{i}", density, params.rescale))
        # the compiled election and histograms read 16-bit floats as stored; DARE's L1 norms are array maths
        stored = self.elects_sign and not any(isinstance(p, Drop) and p.rescale == "l1" for p in parts)
        passes = Passes(inputs, [(i, key) for i in range(n + 1)], stored=stored)
        self._first_passes(passes, parts, count, xp)
        fused = self.elects_sign  # the compiled election takes whole chunks (it blocks them itself)
        for chunk in passes():
            for block in [chunk] if fused else blocks(chunk, xp.block_elements):
                out, fused = self._merge_block(block, parts, weights, params, xp, fused)
                yield out

    def _first_passes(self, passes: Passes, parts: list[Sparsify], count: int, xp: Backend) -> None:
        """What the sparsifiers need of whole tensors: TIES's cuts, DARE's L1 norms (rescale: l1)."""
        trims = [(i, p) for i, p in enumerate(parts) if isinstance(p, Trim)]
        if trims and count >= AIMED:  # aim each first pass's window by a sample
            sample = _sample(passes)
            for i, part in trims:
                most = WINDOW_BINS if len(trims) <= 4 else 2
                part.top.aim(_sample_counts(sample, i + 1, xp), part.top.need / count, most)
        while any(p.top.cut is None for _, p in trims):
            pending = [(i, p) for i, p in trims if p.top.cut is None]
            for chunk in passes():
                for i, part in pending:
                    part.top.add(chunk[i + 1], xp, minus=chunk[0])  # the deltas' magnitudes
            for _, part in pending:
                part.top.end_pass()
        for _, part in trims:
            part.start()
        drops = [(i, p) for i, p in enumerate(parts) if isinstance(p, Drop) and p.rescale == "l1"]
        if drops:  # a tensor of one chunk is summed whole, as version 1 summed it
            size = None if passes.whole() is not None else xp.block_elements
            for chunk in passes():
                for block in blocks(chunk, size):
                    for i, drop in drops:
                        drop.measure(block[i + 1] - block[0], xp)
            for _, drop in drops:
                before, after = drop.before, drop.after
                drop.ratio = before / after if before >= 1e-7 and after >= 1e-7 else None
                drop.start()

    def _merge_block(
        self, block: list[Array], parts: list[Sparsify], weights: list[float], params: F, xp: Backend, fused: bool
    ) -> tuple[Array, bool]:
        """The merged block, and whether the compiled election made it (else the array maths did)."""
        base, models = block[0], block[1:]
        steps = [part.step(len(base)) for part in parts]
        try:
            if fused:
                assert isinstance(params, TiesParams | DareTiesParams)
                consensus = 1 if params.consensus == "sum" else 2
                models_steps = [(m, *s.fused(), w) for m, s, w in zip(models, steps, weights, strict=True)]
                elected = xp.elect(base, models_steps, consensus, params.normalize, params.scale)
                if elected is not None:
                    out, ties = elected
                    for step, left in zip(steps, ties, strict=True):
                        step.ties = left
                    return out, True
            wide = [xp.widen(array) for array in models]  # chunks read as stored, for the array maths
            return self._merged(xp.widen(base), wide, steps, weights, params, xp), False
        finally:
            for part, step in zip(parts, steps, strict=True):
                part.done(step)

    def _merged(
        self, base: Array, models: list[Array], steps: list[Step], weights: list[float], params: F, xp: Backend
    ) -> Array:
        """The array form of the merge (the compiled `elect` does the same float32 operations)."""
        pairs = zip(models, steps, weights, strict=True)
        deltas = [sparsified(model - base, step, xp) * weight for model, step, weight in pairs]
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
            negative = ~positive
            mixed = base * 0.0
            divisor = base * 0.0
            for delta, weight in zip(deltas, weights, strict=True):
                agrees = (positive & (delta > 0)) | (negative & (delta < 0))  # a zero delta never agrees
                mixed += xp.keep(delta, agrees)
                divisor += xp.keep(base * 0.0 + weight, agrees)  # the weight, in the maths' dtype
            divisor = divisor + (divisor == 0)  # 1 where no model agrees
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
    #: 2: deltas tied at the cut are kept in C order (version 1 entries broke such ties otherwise); 3: a model or
    #: base of float64 among narrower inputs is cut over the deltas' 64-bit patterns (version 2 kept every delta);
    #: 4: each model over its own deltas' patterns (version 3 cut a float32 model's over 64 bits beside a float64 one)
    version = 4
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
    version = 2  # 2: a density float32 rounds to 0 divides as the array maths does (version 1 skipped it)
    params_model = DareTiesParams[Scheduled]
    sparsify = "random"
    elects_sign = True
    random = True
    summary = "DARE drop + TIES sign election (seeded)"
