"""extract_lora: a PEFT LoRA adapter that approximates a fine-tune as base + B @ A, by truncated SVD.

    inputs: [base, finetune]
    rank: 16            # the rank of every factor pair (a tensor's is at most min(out, in))
    energy: 0.9         # or: per tensor, the smallest rank whose singular values hold this share of
                        #     the delta's squared spectrum (sum of S_i^2); `rank` is then the largest
    min_dim: 2          # 2-D weights with a dimension below this are left out
    include_embeddings: false
    include / exclude   # regexes (unanchored searches) on the weight's key

Which weights: every float weight whose key ends in `.weight`, 2-D in both inputs with one shape,
other than the token embeddings and LM heads (merger.archs.embeddings) and other embedding tables
(positions, token types), unless `include_embeddings` (an embedding becomes peft's
`lora_embedding_A/B`, an LM head a plain `lora_A/B`). Norms, biases and every other tensor are not in
the adapter: the report counts them (`lora.not_extracted`); a fine-tune that changed them is only
partly captured.

For each weight: delta = finetune - base, delta = U S Vh (torch.linalg.svd on the backend's device;
on the CPU of the numpy arrays too, where it is twice numpy's speed; in float32 or wider), and with
sqrt(S) on both factors (as mergekit does, for balanced magnitudes):

    lora_A = sqrt(S[:r]) * Vh[:r]     [r, in]     base_model.model.<module>.lora_A.weight
    lora_B = U[:, :r] * sqrt(S[:r])   [out, r]    base_model.model.<module>.lora_B.weight

with lora_alpha = r for every module, so peft's scale alpha / r is 1 and base + B @ A is the
reconstruction. A `rank` above a tensor's min(out, in) is an error (mergekit clamps it silently);
with `energy`, `rank` is a cap, and where a tensor allows less it is cut to min(out, in) (the pair is
then exact; the notes say so, `lora.clamped`), the adapter's `rank_pattern` / `alpha_pattern` giving
such modules their rank. The
output's shapes are fixed before any tensor is read (safetensors headers come first), so with
`energy` every pair has `rank` rows (or its clamp) and the rows past the rank the energy asks for
are zeros: exact, loadable by peft as it is; the report gives each module's rank (`lora.ranks`),
and a folder output writes each pair cut to that rank, with those ranks in `rank_pattern` and
`alpha_pattern` (merger.engine.adapter_trim).

The node's notes carry `peft`: the adapter_config.json of the output (`target_modules` are the
modules' leaf names, sorted, unless a leaf name would also match a module left out; then full
module paths). The run report gives, per module, the relative reconstruction error
||delta - B @ A||_F / ||delta||_F (0 where the delta is 0), its rank, and the total error over all
modules, sqrt(sum of squared residuals / sum of squared delta norms).

The SVD runs once per module: computing lora_A also makes lora_B, which waits in the plan's memo
(one pair, under a lock) for the next key, lora_B; lora_B reads nothing ahead, and recomputes if the
memo does not hold its module.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from merger.archs.embeddings import is_input_embedding, is_lm_head
from merger.core.patterns import compile_regex
from merger.core.specs import TensorSpec
from merger.errors import MergerError, shown
from merger.ops.base import Arity, InputSpecs, NodeSpec, Op, PieceMode, TensorInputs
from merger.ops.lora import PEFT_PREFIX, lora_keys
from merger.ops.params import OpParams

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

#: embedding tables beyond the token embeddings: peft's Embedding modules, left out with them
OTHER_EMBEDDING_ENDINGS = ("wpe.weight", "position_embeddings.weight", "token_type_embeddings.weight")
#: the notes each module's lora_A key takes (summarised in `summarise_notes`)
RESIDUAL, NORM, RANK = "squared_residual", "squared_norm", "rank"


class ExtractLoraParams(OpParams):
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    min_dim: int = Field(default=2, ge=1)
    include_embeddings: bool = False
    include: str | None = None
    exclude: str | None = None


@dataclass(frozen=True)
class Target:
    """One weight to factor."""

    key: str  # the weight's key, <module>.weight
    module: str
    rank: int  # rows of lora_A (the rank asked for, clamped to the tensor)
    embedding: bool  # peft's lora_embedding_A/B, of the transposed delta


class _Memo:
    """The lora_B of the last SVD, until its key is computed (thread-safe; one pair at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: tuple[str, Any] | None = None

    def put(self, module: str, b: Array) -> None:
        with self._lock:
            self._held = (module, b)

    def take(self, module: str) -> Array | None:
        with self._lock:
            held, self._held = self._held, None
        return held[1] if held is not None and held[0] == module else None


@dataclass(frozen=True)
class ExtractPlan:
    """Output key -> (the weight, which factor); and the memo of the last lora_B."""

    outputs: dict[str, tuple[Target, Literal["A", "B"]]]
    memo: _Memo = field(default_factory=_Memo, compare=False, repr=False)


def _rank(params: ExtractLoraParams) -> int:
    if params.rank is None:
        raise MergerError(
            "extract_lora needs rank: the rank of each factor pair"
            + (", and with energy the largest" if params.energy is not None else ""),
            fix="give rank: (e.g. 16); with energy: the adapter's shapes are fixed before any tensor is"
            " read, so every pair gets rank rows, zero past the rank the energy needs",
        )
    return params.rank


def _is_embedding_table(key: str) -> bool:
    return is_input_embedding(key) or any(key == e or key.endswith("." + e) for e in OTHER_EMBEDDING_ENDINGS)


def _targets(inputs: InputSpecs, params: ExtractLoraParams, rank: int) -> list[Target]:
    base, tuned = inputs.specs
    include = compile_regex(params.include, "include") if params.include is not None else None
    exclude = compile_regex(params.exclude, "exclude") if params.exclude is not None else None
    found: list[Target] = []
    for key, spec in base.items():
        other = tuned.get(key)
        embedding, head = _is_embedding_table(key), is_lm_head(key)
        if (
            not key.endswith(".weight")
            or other is None
            or not (spec.is_float and other.is_float)
            or len(spec.shape) != 2
            or ((embedding or head) and not params.include_embeddings)
            or (include is not None and not include.search(key))
            or (exclude is not None and exclude.search(key))
        ):
            continue
        if other.shape != spec.shape:
            raise MergerError(
                f"'{shown(key)}' is {spec.describe()} in '{inputs.names[0]}' and {other.describe()} in"
                f" '{inputs.names[1]}': a LoRA adapter cannot change a weight's shape",
                fix="leave the key out with exclude: (a resized vocabulary is not a low-rank update)",
            )
        if min(spec.shape) < params.min_dim:
            continue
        if rank > min(spec.shape) and params.energy is None:
            raise MergerError(
                f"rank {rank} is more than '{shown(key)}' {spec.describe()} allows: a rank-{min(spec.shape)}"
                " pair already holds its whole difference",
                fix=f"give rank: {min(spec.shape)} or less; or skip smaller weights with min_dim: {rank + 1},"
                " or exclude: a pattern of their keys; with energy:, rank is a cap, cut to each weight",
            )
        found.append(Target(key, key.removesuffix(".weight"), min(rank, *spec.shape), embedding))
    return found


def _peft_config(inputs: InputSpecs, targets: list[Target]) -> dict[str, Any]:
    """The adapter_config.json of the extracted adapter (without base_model_name_or_path)."""
    ranks = {t.module: t.rank for t in targets}
    r = max(ranks.values())
    chosen = set(ranks)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in chosen})
    others = {k.rsplit(".", 1)[0] for k in inputs.specs[0] if "." in k} - chosen
    # peft takes a list entry as a module's whole path or its ending after a dot
    ambiguous = any(m == leaf or m.endswith("." + leaf) for m in others for leaf in leaves)
    different = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(chosen) if ambiguous else leaves,
        "rank_pattern": different,
        "alpha_pattern": different,
        "bias": "none",
        "task_type": None,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "modules_to_save": None,
    }


def _svd(delta: Array, xp: Backend) -> tuple[Array, Array, Array]:
    """U, S, Vh of a 2-D array, on the array's device (reduced: S has min(out, in) values); numpy
    arrays come back as numpy arrays."""
    if xp.name == "torch":
        import torch

        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u, s, vh
    import torch  # on the CPU too: LAPACK through torch is about twice numpy's speed here (gesdd both)

    u, s, vh = torch.linalg.svd(torch.from_numpy(delta), full_matrices=False)
    return u.numpy(), s.numpy(), vh.numpy()


def energy_rank(squares: list[float], energy: float) -> int:
    """The smallest k whose first k squared singular values hold `energy` of their sum (0 for a 0 delta)."""
    total = math.fsum(squares)
    if total <= 0.0:
        return 0
    running = 0.0
    for k, value in enumerate(squares, start=1):
        running += value
        if running >= energy * total * (1.0 - 1e-12):
            return k
    return len(squares)


class ExtractLora(Op[ExtractLoraParams, ExtractLoraParams, ExtractPlan]):
    """A PEFT LoRA adapter of base -> fine-tune, by truncated SVD of each weight's delta."""

    name = "extract_lora"
    params_model = ExtractLoraParams
    arity = Arity(2, 2)
    family_check = True
    summary = "a PEFT LoRA adapter of finetune - base (truncated SVD per weight; rank or energy)"

    def check(self, params: ExtractLoraParams, n_inputs: int) -> list[str]:
        _rank(params)
        return []

    def spec(self, inputs: InputSpecs, params: ExtractLoraParams) -> NodeSpec[ExtractPlan]:
        rank = _rank(params)
        targets = _targets(inputs, params, rank)
        if not targets:
            raise MergerError(
                f"no weight of '{inputs.names[0]}' is a 2-D float '.weight' both inputs have with one shape,"
                f" at least {params.min_dim} on each side, that the key rules select",
                fix="check include / exclude / min_dim, and that the inputs are a base and its fine-tune",
            )
        tensors: dict[str, TensorSpec] = {}
        outputs: dict[str, tuple[Target, Literal["A", "B"]]] = {}
        for t in targets:
            spec = inputs.specs[0][t.key]
            rows, columns = spec.shape[::-1] if t.embedding else spec.shape
            a_key, b_key = lora_keys(t.module, t.embedding)
            tensors[a_key] = TensorSpec(spec.dtype, (t.rank, columns))
            tensors[b_key] = TensorSpec(spec.dtype, (rows, t.rank))
            outputs[a_key], outputs[b_key] = (t, "A"), (t, "B")
        clamped = {t.module: t.rank for t in targets if t.rank < rank}
        chosen = {t.key for t in targets}
        lora: dict[str, Any] = {
            "modules": len(targets),
            "rank": rank,
            "not_extracted": sum(s.is_float and k not in chosen for k, s in inputs.specs[0].items()),
        }
        if params.energy is not None:
            lora["energy"] = params.energy
        if clamped:
            lora["clamped"] = clamped
        notes = {"peft": _peft_config(inputs, targets), "lora": lora}
        return NodeSpec(tensors=tensors, plan=ExtractPlan(outputs), notes=notes)

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: ExtractPlan) -> PieceMode:
        return "tensor"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: ExtractPlan) -> list[tuple[int, str]]:
        target, side = plan.outputs[key]
        return [(0, target.key), (1, target.key)] if side == "A" else []  # B: from the memo

    def tensor(self, key: str, inputs: TensorInputs[ExtractPlan], params: ExtractLoraParams, xp: Backend) -> Array:
        target, side = inputs.plan.outputs[key]
        if side == "B":
            held = inputs.plan.memo.take(target.module)
            return held if held is not None else self._factors(target, inputs, params, xp, note=False)[1]
        a, b = self._factors(target, inputs, params, xp, note=True)
        inputs.plan.memo.put(target.module, b)
        return a

    def _factors(
        self, target: Target, inputs: TensorInputs[ExtractPlan], params: ExtractLoraParams, xp: Backend, *, note: bool
    ) -> tuple[Array, Array]:
        delta = inputs.read(1, target.key) - inputs.read(0, target.key)
        if target.embedding:
            delta = delta.T
        u, s, vh = _svd(delta, xp)
        roots = s[: target.rank] ** 0.5  # a new array: zeroed past the energy's rank below
        rank = target.rank
        if params.energy is not None:
            rank = min(rank, energy_rank([v * v for v in s.tolist()], params.energy))
            roots[rank:] = 0.0
        a = vh[: target.rank] * roots[:, None]
        b = u[:, : target.rank] * roots[None, :]
        if note:
            residual = delta - b @ a
            inputs.note(RESIDUAL, xp.total(residual * residual))
            inputs.note(NORM, xp.total(delta * delta))
            inputs.note(RANK, rank)
        return a, b

    def summarise_notes(self, noted: Mapping[str, Mapping[str, float | None]]) -> dict[str, Any]:
        """Per module its relative error and rank, and the total error (see the module docstring)."""
        residuals, norms, ranks = (noted.get(name, {}) for name in (RESIDUAL, NORM, RANK))
        errors: dict[str, float | None] = {}
        for key, residual in residuals.items():
            norm = norms.get(key)
            module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
            errors[module] = None if residual is None or norm is None else math.sqrt(residual / norm) if norm else 0.0
        pairs = [(r, norms.get(k)) for k, r in residuals.items()]
        finite = [(r, n) for r, n in pairs if r is not None and n is not None]
        total_norm = math.fsum(n for _, n in finite)
        total = math.sqrt(math.fsum(r for r, _ in finite) / total_norm) if total_norm else 0.0
        by_module = {
            key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]: None if k is None else int(k)
            for key, k in ranks.items()
        }
        return {"lora": {"relative_error": errors, "total_relative_error": total, "ranks": by_module}}
