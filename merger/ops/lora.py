"""apply_lora: PEFT LoRA adapters merged into their base model, as peft's `merge_and_unload()` does.

    inputs: [base, adapter, ...]     # a model, then one or more PEFT adapter folders
    scale: 1                         # one number, or one per adapter (in the order of inputs)

For every weight an adapter targets: `W + sum_i scale_i * s_i * delta_i`, with

    delta_i = B_i @ A_i                    (lora_A [r, in], lora_B [out, r]; a conv's lora_B is 1x1)
              (B_i @ A_i)^T                with `fan_in_fan_out` (GPT-2's Conv1D), and for an
                                           embedding (lora_embedding_A [r, rows], _B [dim, r])
    s_i     = lora_alpha / r               (lora_alpha / sqrt(r) with `use_rslora`)

where r and lora_alpha are the adapter's, or its `rank_pattern` / `alpha_pattern` entry for the
module (the first pattern that matches the module path, as peft matches them). Tensors an adapter
stores whole replace the base's tensor, before any delta is added: `modules_to_save`, biases trained
with `bias: all`, and the embedding peft saves beside an embedding's factors
(`<module>.base_layer.weight`). Every other tensor is the base's, copied. Keys: an adapter's
`base_model.model.<module>.lora_A.weight` (also with peft's adapter name, `lora_A.default.weight`)
belongs to the base's `<module>.weight`. Everything is checked from the specs and the adapters'
`adapter_config.json` before a tensor is read: a module the base lacks, factors whose product is not
the base weight's shape, an input that is not a LoRA adapter, or a LoRA feature merged otherwise
(DoRA, `lora_bias`) is an error. Maths in float32 (or wider); the result has the base's dtypes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

from merger.core.specs import TensorSpec
from merger.errors import MergerError, shown
from merger.ops.base import Arity, InputSpecs, NodeSpec, Op, PieceMode, TensorInputs
from merger.ops.params import N, OpParams, Scheduled
from merger.ops.task_vectors import per_model

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

#: what peft puts before a module's path in an adapter's keys
PEFT_PREFIX = "base_model.model."
MAX_LISTED = 10
_FACTOR = re.compile(r"^(?P<module>.+?)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_FACTOR = re.compile(r"^(?P<module>.+?)\.lora_embedding_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?$")
#: a tensor stored whole: a module to save (older peft: with its adapter name), a wrapped layer's own
#: weight (peft saves an embedding's with its factors), or any other key of the base (a bias)
_SAVED_MODULE = re.compile(r"^(?P<path>.+?)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>.+)$")
_BASE_LAYER = re.compile(r"^(?P<path>.+?)\.base_layer\.(?P<param>[^.]+)$")
#: adapter config switches whose merge is not `W + s * B @ A`: refused, not approximated
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales the merged weight by a learnt magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication changes the model's layers",
}


def lora_keys(module: str, embedding: bool) -> tuple[str, str]:
    """peft's names of a module's A and B factors in a saved adapter."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


#: the patterns an adapter_config.json may hold (rank_pattern keys, a target_modules string): module
#: names, where `.` matches any character as in peft's regular expressions and `\.` a dot; no
#: repetition, groups or alternation, which a file from anywhere could make take hours to match
_PLAIN_PATTERN = re.compile(r"(?:[\w\-]|\\?\.)+")


def plain_pattern(pattern: str, name: str, field_name: str) -> str:
    """`pattern`, checked to be a plain module name (see _PLAIN_PATTERN); else a MergerError."""
    if not _PLAIN_PATTERN.fullmatch(pattern):
        raise MergerError(
            f"adapter '{name}': {field_name} '{shown(pattern)}' is a regular expression with operators merger"
            " does not run on a file from elsewhere (repetition, groups, alternation)",
            fix="write module names or paths there (e.g. q_proj, model.layers.0.self_attn.q_proj)",
        )
    return pattern


def pattern_value(patterns: Mapping[str, Any], module: str, default: float) -> float:
    """A module's entry in a rank_pattern / alpha_pattern, as peft finds it (the first pattern that
    matches the end of the module path after a dot, or all of it), else `default`. The patterns are
    plain (checked when the config is read), so matching them cannot backtrack for long."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return default


def targeted(targets: object, module: str) -> bool:
    """Whether peft's `target_modules` (a list of names matched as path endings, or one pattern
    matched whole) names `module`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return isinstance(targets, list) and any(module == t or module.endswith("." + str(t)) for t in targets)


class ApplyLoraParams(OpParams, Generic[N]):
    scale: N | list[N] = 1.0  # type: ignore[assignment]


@dataclass(frozen=True)
class Factors:
    """One adapter's low-rank update of one base tensor."""

    adapter: int  # the adapter's input index
    a: str
    b: str
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r)
    transpose: bool  # fan_in_fan_out, or an embedding


@dataclass(frozen=True)
class Patch:
    """What becomes of one base key: its starting tensor (the base's, or one an adapter stores
    whole) and the updates added to it."""

    start: tuple[int, str]
    factors: tuple[Factors, ...] = ()


#: the plan of apply_lora: the base keys an adapter changes (the others are copied from the base)
Patches = dict[str, Patch]


@dataclass(frozen=True)
class _Settings:
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]


def _settings(config: Mapping[str, Any] | None, name: str) -> _Settings:
    """The parts of an adapter_config.json the merge uses, checked."""
    if config is None:
        raise MergerError(
            f"input '{name}' is not a PEFT adapter folder (it has no adapter_config.json)",
            fix="list the base model first, then folders with adapter_config.json and adapter_model.safetensors",
        )
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise MergerError(
            f"input '{name}' is a PEFT adapter of type '{shown(peft_type)}', not LORA",
            fix="apply_lora merges LoRA adapters only; merge this one with peft's merge_and_unload()",
        )
    for field_name, why in _UNSUPPORTED.items():
        if config.get(field_name):
            raise MergerError(
                f"adapter '{name}' uses {field_name}: {why}, which apply_lora does not merge",
                fix="merge this adapter with peft's merge_and_unload()",
            )

    def typed(field_name: str, kinds: type | tuple[type, ...], default: Any) -> Any:
        value = config.get(field_name, default)
        value = default if value is None else value
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise MergerError(
                f"adapter '{name}': adapter_config.json gives {field_name} {shown(value)}",
                fix="re-save the adapter with peft (save_pretrained)",
            )
        return value

    patterns = {k: typed(k, dict, {}) for k in ("rank_pattern", "alpha_pattern")}
    for kind, pattern in patterns.items():
        for key, value in pattern.items():
            plain_pattern(key, name, f"{kind} key")
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 2**20:
                raise MergerError(
                    f"adapter '{name}': {kind} gives '{shown(key)}' {shown(value)}, not a positive number",
                    fix="re-save the adapter with peft (save_pretrained)",
                )
    targets = config.get("target_modules")
    if isinstance(targets, str):
        plain_pattern(targets, name, "target_modules")
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise MergerError(
            f"adapter '{name}': adapter_config.json gives target_modules {shown(targets)}",
            fix="re-save the adapter with peft (save_pretrained)",
        )
    return _Settings(
        typed("r", int, 8),
        float(typed("lora_alpha", (int, float), 8)),
        bool(typed("use_rslora", bool, False)),
        bool(typed("fan_in_fan_out", bool, False)),
        patterns["rank_pattern"],
        patterns["alpha_pattern"],
    )


def _listed(items: list[str]) -> str:
    shown_items = ", ".join(f"'{shown(i)}'" for i in items[:MAX_LISTED])
    return shown_items + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


class _Adapter:
    """One adapter's tensors sorted out: factor pairs per module, and tensors stored whole."""

    def __init__(self, index: int, name: str, spec: dict[str, TensorSpec], base: dict[str, TensorSpec]) -> None:
        self.index, self.name = index, name
        self.pairs: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key}
        self.embedding: set[str] = set()
        self.whole: dict[str, str] = {}  # base key -> adapter key
        names: set[str] = set()
        unknown: list[str] = []
        for key in spec:
            rest = key.removeprefix(PEFT_PREFIX)
            match = _FACTOR.match(rest) or _EMBEDDING_FACTOR.match(rest)
            saved = _SAVED_MODULE.match(rest) or _BASE_LAYER.match(rest)
            if not key.startswith(PEFT_PREFIX) or (".lora_" in rest and match is None):
                unknown.append(key)
            elif match is not None:
                self.pairs.setdefault(match["module"], {})[match["side"]] = key
                if match.re is _EMBEDDING_FACTOR:
                    self.embedding.add(match["module"])
                names.add(match["adapter"] or "")
            elif saved is not None:
                self.whole[f"{saved['path']}.{saved['param']}"] = key
            else:
                self.whole[rest] = key
        if unknown:
            raise MergerError(
                f"adapter '{name}' holds {len(unknown)} tensors that are not LoRA factors of a module:"
                f" {_listed(unknown)}",
                fix="apply_lora merges peft LoRA adapters (lora_A / lora_B); merge others with peft",
            )
        if len(names) > 1:
            raise MergerError(
                f"adapter '{name}' holds the factors of several adapters ({_listed(sorted(names))})",
                fix="save each adapter in a folder of its own and list them all in inputs",
            )
        if not self.pairs:
            raise MergerError(f"adapter '{name}' holds no LoRA factors (lora_A / lora_B)", fix="check the folder")
        halves = [m for m, pair in self.pairs.items() if len(pair) != 2]
        if halves:
            raise MergerError(f"adapter '{name}' has lora_A without lora_B or the reverse for {_listed(halves)}")
        missing = [f"{m}.weight" for m in self.pairs if f"{m}.weight" not in base]
        missing += [k for k in self.whole if k not in base]
        if missing:
            raise MergerError(
                f"adapter '{name}' targets {len(missing)} modules or tensors the base does not have:"
                f" {_listed(missing)} (looked for the adapter's keys without '{PEFT_PREFIX}')",
                fix="apply the adapter to the model it was trained on, listed first in inputs",
            )

    def factors(self, module: str, specs: dict[str, TensorSpec], base: TensorSpec, s: _Settings) -> Factors:
        a_key, b_key = self.pairs[module]["A"], self.pairs[module]["B"]
        a, b = specs[a_key].shape, specs[b_key].shape
        embedding = module in self.embedding
        transpose = embedding or s.fan_in_fan_out
        rank = a[0] if a else 0
        fits = len(a) >= 2 and len(b) >= 2 and b[1] == rank and all(d == 1 for d in b[2:])
        product = (b[0], *a[1:]) if fits else None
        if product is not None and transpose:
            product = product[::-1] if len(product) == 2 else None
        if product != base.shape or not base.is_float:
            raise MergerError(
                f"adapter '{self.name}': the factors of '{shown(module)}' (A {list(a)}, B {list(b)}) do not"
                f" make its base weight, {base.describe()}" + (" (with fan_in_fan_out)" if s.fan_in_fan_out else ""),
                fix="apply the adapter to the model it was trained on",
            )
        r = pattern_value(s.rank_pattern, module, s.r)
        if r != rank:
            raise MergerError(
                f"adapter '{self.name}': adapter_config.json gives '{shown(module)}' rank {r:g},"
                f" its lora_A has {rank} rows",
                fix="re-save the adapter with peft: its config and weights disagree",
            )
        alpha = pattern_value(s.alpha_pattern, module, s.alpha)
        scaling = alpha / math.sqrt(rank) if s.rslora else alpha / rank
        return Factors(self.index, a_key, b_key, rank, scaling, transpose)


class ApplyLora(Op[ApplyLoraParams[Scheduled], ApplyLoraParams[float], Patches]):
    """The base model with LoRA adapters merged in (peft's merge_and_unload)."""

    name = "apply_lora"
    params_model = ApplyLoraParams[Scheduled]
    arity = Arity(2, None)
    summary = "PEFT LoRA adapters merged into their base: W + scale * alpha/r * B @ A"

    def check(self, params: ApplyLoraParams[float], n_inputs: int) -> list[str]:
        per_model(params.scale, n_inputs - 1, "scale")
        return []

    def spec(self, inputs: InputSpecs, params: ApplyLoraParams[Scheduled]) -> NodeSpec[Patches]:
        base = inputs.specs[0]
        starts: dict[str, tuple[int, str]] = {}
        added: dict[str, list[Factors]] = {}
        notes: dict[str, Any] = {}
        for index in range(1, len(inputs)):
            name = inputs.names[index]
            settings = _settings(inputs.config(index), name)
            adapter = _Adapter(index, name, inputs.specs[index], base)
            for key, source in adapter.whole.items():
                if key in starts:
                    raise MergerError(
                        f"adapters '{inputs.names[starts[key][0]]}' and '{name}' both replace '{shown(key)}'",
                        fix="apply such adapters in separate nodes, in the order you mean",
                    )
                found, wanted = inputs.specs[index][source], base[key]
                if found.shape != wanted.shape:
                    raise MergerError(
                        f"adapter '{name}' replaces '{shown(key)}' with {found.describe()}, the base has"
                        f" {wanted.describe()}",
                        fix="apply the adapter to the model it was trained on (resized vocabularies are not merged)",
                    )
                starts[key] = (index, source)
            targets = (inputs.config(index) or {}).get("target_modules")
            untargeted = [m for m in adapter.pairs if targets is not None and not targeted(targets, m)]
            if untargeted:
                raise MergerError(
                    f"adapter '{name}' has factors for {_listed(untargeted)}, which its target_modules"
                    f" ({shown(targets)}) do not name",
                    fix="re-save the adapter with peft: its config and its weights disagree",
                )
            for module in adapter.pairs:
                key = f"{module}.weight"
                added.setdefault(key, []).append(adapter.factors(module, inputs.specs[index], base[key], settings))
            notes[name] = {"modules": len(adapter.pairs), "replaced": len(adapter.whole)}
        plan = {
            key: Patch(starts.get(key, (0, key)), tuple(added.get(key, ())))
            for key in base
            if key in starts or key in added
        }
        notes = {"adapters": notes, "patched": len(plan), "copied": len(base) - len(plan)}
        return NodeSpec(tensors=dict(base), plan=plan, notes=notes)

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Patches) -> PieceMode:
        patch = plan.get(key)
        if patch is None:
            return "copy"
        index, source = patch.start
        return "copy" if not patch.factors and specs[index][source] == specs[0][key] else "tensor"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Patches) -> list[tuple[int, str]]:
        patch = plan.get(key)
        if patch is None:
            return [(0, key)]
        return [patch.start, *((f.adapter, k) for f in patch.factors for k in (f.a, f.b))]

    def tensor(self, key: str, inputs: TensorInputs[Patches], params: ApplyLoraParams[float], xp: Backend) -> Array:
        patch = inputs.plan.get(key)
        if patch is None:
            return inputs.read(0, key)
        result = inputs.read(*patch.start)
        scales = per_model(params.scale, len(inputs.specs) - 1, "scale")
        for f in patch.factors:
            a, b = inputs.read(f.adapter, f.a), inputs.read(f.adapter, f.b)
            delta = b.reshape(b.shape[0], f.rank) @ a.reshape(f.rank, -1)
            if f.transpose:
                delta = delta.T
            result = result + delta.reshape(tuple(result.shape)) * (scales[f.adapter - 1] * f.scaling)
        return result
