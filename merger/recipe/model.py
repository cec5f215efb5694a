"""The Recipe: sources, nodes, outputs and run settings, validated and frozen.

Built from the resolved config (plain data) once, at the edge; everything
after works on these typed objects. Every error names the recipe file and the
dotted place in it (`nodes.blend.alpha`), and ends in a fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from merger.core.limits import MAX_RECIPE_NODES
from merger.core.sizes import parse_size
from merger.core.strict_model import StrictModel
from merger.errors import Location, MergerError, did_you_mean, has_control, shown
from merger.ops.base import AnyOp
from merger.ops.params import OpParams
from merger.ops.registry import OpRegistry
from merger.recipe.evaluate import Evaluation, Objective, build_evaluation, build_objectives

SECTIONS = ("sources", "nodes", "outputs")
SETTINGS = (
    "device",
    "cache_dir",
    "cache_max_size",
    "cache_verify",
    "allow_env",
    "allow_overwrite",
    "nonfinite",
    "sanity",
    "family",
    "seed",
    "progress",
    "preview",
    "preview_crop",
    "description",
    "evaluate",  # merger.recipe.evaluate
    "objective",
)
#: settings that are blocks of their own, not fields of Settings
SCORING = ("evaluate", "objective")

DEFAULT_SHARD_SIZE = 5 * 10**9  # as transformers' save_pretrained
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class SourceFileModel(StrictModel):
    path: str
    key: str | None = None


class SourceGlobModel(StrictModel):
    glob: str
    key: str | None = None


class OutputModel(StrictModel):
    node: str | None = None
    path: str | None = None
    dtype: Literal["keep", "float32", "float16", "bfloat16"] = "keep"
    layout: Literal["old", "new", "basicsr"] | None = None
    overwrite: bool = False  # replace an existing file that merger did not write
    shard_size: int | str | None = None  # a folder output's largest shard (5GB when not given)
    config_from: str | None = None  # a folder output's config and tokenizer: this source's
    wrap: Literal["params_ema", "params"] | None = None  # a .pth output's state dict inside this key


def check_policy(value: Any) -> Any:
    """`sanity:`/`family:` as YAML gives them: `off` (and `on`) are booleans in YAML 1.1."""
    if value is False:
        return "off"
    return "warn" if value is True else value


#: what a failed sanity or family check does: warn, error, or off (no check)
CheckPolicy = Annotated[Literal["warn", "error", "off"], BeforeValidator(check_policy)]


class Settings(StrictModel):
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    cache_dir: str | None = None  # None: $MERGER_CACHE_DIR, else outputs/cache
    cache_max_size: int | str | None = None  # collect the cache down to this size at the end of a run
    cache_verify: bool = False  # re-hash every cache entry the run uses
    allow_env: bool = False  # ${oc.env:...} in recipe files (the command line's to set)
    allow_overwrite: bool = False  # outputs' `overwrite: true` may replace files merger did not write (ditto)
    nonfinite: Literal["warn", "error"] = "warn"  # NaN/inf in inputs or outputs: a warning, or an error
    sanity: CheckPolicy = "warn"  # a merged image model run on grey and on the sample (merger.report.sanity)
    family: CheckPolicy = "warn"  # a merge whose inputs look unrelated (merger.engine.family)
    seed: int = 0
    progress: bool = True
    preview: bool | str | list[str] | None = None  # sample | image files | folders: image models upscale them
    preview_crop: list[int] | None = None  # [x, y, width, height] of each preview image (merger.report.preview_images)
    description: str | None = None


@dataclass(frozen=True)
class SourceDef:
    name: str
    path: str | None = None
    glob: str | None = None
    key: str | None = None


#: a node's (and the run's) `sanity:` and `family:` values: what a failed check does (neither is part of
#: the node's content key: they change no result)
CHECK_POLICIES = ("warn", "error", "off")
#: a node's `vocab:` values (None, the default: the inputs' vocabularies must match; see merger.ops.vocab)
VOCAB_POLICIES = (None, "first")


@dataclass(frozen=True)
class NodeDef:
    name: str
    op: str
    inputs: tuple[str, ...]
    params: OpParams
    refs: tuple[tuple[str, str], ...] = ()  # (parameter, name) for parameters naming a model: base
    nonfinite: str | None = None  # warn | error: this node's NaN/inf policy (None: the run's)
    vocab: str | None = None  # first: inputs' vocabularies may differ, the output has the first's (None: they may not)
    sanity: str | None = None  # warn | error | off: this node's sanity check (None: the run's, for merge nodes)
    family: str | None = None  # warn | error | off: this node's family check (None: the run's)

    @property
    def references(self) -> tuple[str, ...]:
        """Every source or node this node reads: its reference parameters', then its inputs."""
        return (*(name for _, name in self.refs), *self.inputs)


@dataclass(frozen=True)
class OutputDef:
    name: str
    node: str
    path: str
    dtype: str  # keep | float32 | float16 | bfloat16
    layout: str | None = None  # ESRGAN key layout: old | new | basicsr
    overwrite: bool = False  # may replace an existing file that merger did not write
    shard_size: int = DEFAULT_SHARD_SIZE  # folder outputs: the largest shard, in bytes
    config_from: str | None = None  # folder outputs: the source folder whose config and tokenizer it gets
    wrap: str | None = None  # .pth outputs: params_ema | params (BasicSR's and Real-ESRGAN's loaders)

    @property
    def format(self) -> str:
        """safetensors | pth | folder (a path without a file extension: a Hugging Face model folder)."""
        return output_format(self.path)

    @property
    def side_file(self) -> str | None:
        """The provenance file written beside a `.pth` output."""
        return os.path.splitext(self.path)[0] + ".json" if self.format == "pth" else None


def output_format(path: str) -> str:
    """What an output path writes: by its extension, and a folder when it has none (or only a number
    after its last dot, as a swept value gives: `merged_${alpha}`)."""
    lowered = path.lower().rstrip("/")
    if lowered.endswith(".pth"):
        return "pth"
    if lowered.endswith(".safetensors"):
        return "safetensors"
    extension = os.path.splitext(os.path.basename(lowered))[1]
    return "folder" if not extension or extension[1:].isdigit() else "unknown"  # merged_0.5: a folder


@dataclass(frozen=True)
class Recipe:
    file: str
    sources: dict[str, SourceDef]
    nodes: dict[str, NodeDef]
    outputs: dict[str, OutputDef]
    settings: Settings
    variables: dict[str, Any]
    evaluation: Evaluation | None = None  # what each output is measured on (merger.recipe.evaluate)
    objectives: tuple[Objective, ...] = ()  # what a job returns to Hydra's sweeper

    def where(self, place: str) -> Location:
        return Location(self.file, place)


def validation_error(error: ValidationError, model: type[BaseModel], *, where: Location, what: str) -> MergerError:
    """The first problem pydantic found, as a MergerError at `<where>.<field>`."""
    errors = error.errors()
    schedule_errors = [e for e in errors if {"Rules", "Gradient"} & {str(p) for p in e["loc"]}]
    # what the field was given: the input of its number branch (a schedule's errors carry inner values)
    given = next((e["input"] for e in errors if e["loc"] and str(e["loc"][-1]) == "float"), None)
    if schedule_errors and isinstance(given if given is not None else schedule_errors[0]["input"], dict):
        return _schedule_error(schedule_errors, where, given if isinstance(given, dict) else None)
    errors = [e for e in errors if e not in schedule_errors] or errors  # a plain value: say what a number needs
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(part) for part in first["loc"] if str(part) not in UNION_BRANCHES)
    place = where.at(loc) if loc else where
    fields = sorted(model.model_fields)
    if first["type"] == "extra_forbidden":
        name = str(first["loc"][-1])
        close = did_you_mean(name, fields)
        hint = f"did you mean '{close}'? " if close else ""
        return MergerError(
            f"unknown key '{name}' in {what}", where=place, fix=f"{hint}{what} takes: {', '.join(fields) or '(none)'}"
        )
    if first["type"] == "missing":
        return MergerError(f"{what} needs '{loc}'", where=place, fix=f"add {loc}: <value>")
    return MergerError(
        f"{first['msg'].lower()}, got {first['input']!r}", where=place, fix=f"set {loc} to a valid value"
    )


#: names pydantic puts in an error's location for the branch of a union it tried
UNION_BRANCHES = frozenset({"float", "int", "str", "bool", "Rules", "Gradient"})

SCHEDULE_FORMS = (
    "a number, a rule list {default: 0.5, rules: [{match: <regex>, value: 0.2}]}"
    " or a gradient {blocks: <regex with (\\d+)>, values: [0.0, 1.0], default: 0.5}"
)


def _schedule_error(schedule_errors: list[Any], where: Location, given: Any) -> MergerError:
    """A parameter that may be a number or a schedule, given neither well."""
    loc = schedule_errors[0]["loc"]
    cut = next(i for i, part in enumerate(loc) if str(part) in ("Rules", "Gradient"))
    field = ".".join(str(p) for p in loc[:cut] if str(p) != "float")
    given = given if given is not None else schedule_errors[0]["input"]
    branch = "Gradient" if isinstance(given, dict) and "blocks" in given else "Rules"
    detail = next((e for e in schedule_errors if branch in [str(p) for p in e["loc"]]), schedule_errors[0])
    inner = ".".join(str(p) for p in detail["loc"][detail["loc"].index(branch) + 1 :])
    problem = f"{detail['msg'].lower()}" + (f" at {inner}" if inner else "")
    return MergerError(f"'{field}' must be {SCHEDULE_FORMS}; {problem}", where=where.at(field), fix=f"fix {field}")


def _mapping(config: Mapping[str, Any], section: str, file: str) -> dict[str, Any]:
    value = config.get(section)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MergerError(
            f"'{section}' must be a mapping of name: definition, got {type(value).__name__}",
            where=Location(file, section),
            fix=f"write {section} as `name: ...` entries (a mapping lets recipes extend each other)",
        )
    for name in value:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise MergerError(
                f"'{name}' is not a valid name",
                where=Location(file, section),
                fix="names start with a letter or _ and use letters, digits, _, - and .",
            )
    return dict(value)


def _source(name: str, raw: Any, where: Location) -> SourceDef:
    if isinstance(raw, str):
        return SourceDef(name, path=raw)
    if isinstance(raw, Mapping) and "glob" in raw:
        try:
            glob_model = SourceGlobModel.model_validate(dict(raw))
        except ValidationError as e:
            raise validation_error(e, SourceGlobModel, where=where, what="a glob source") from None
        return SourceDef(name, glob=glob_model.glob, key=glob_model.key)
    if isinstance(raw, Mapping):
        try:
            file_model = SourceFileModel.model_validate(dict(raw))
        except ValidationError as e:
            raise validation_error(e, SourceFileModel, where=where, what="a source") from None
        return SourceDef(name, path=file_model.path, key=file_model.key)
    raise MergerError(
        f"source '{name}' must be a path or a mapping, got {raw!r}",
        where=where,
        fix="write `name: models/a.pth`, `name: {path: a.pth, key: params_ema}` or `name: {glob: 'zoo/*.pth'}`",
    )


def _node(name: str, raw: Any, registry: OpRegistry, where: Location) -> NodeDef:
    if not isinstance(raw, Mapping):
        raise MergerError(
            f"node '{name}' must be a mapping with op and inputs",
            where=where,
            fix="write `name: {op: lerp, inputs: [a, b], alpha: 0.5}`",
        )
    fields = dict(raw)
    op_name = fields.pop("op", None)
    if not isinstance(op_name, str):
        raise MergerError(f"node '{name}' has no op", where=where, fix=f"add op: one of {', '.join(registry.names())}")
    try:
        op = registry.get(op_name)
    except MergerError as e:
        raise MergerError(e.what, where=where.at("op"), fix=e.fix) from None
    inputs = fields.pop("inputs", None)
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise MergerError(
            f"node '{name}' needs inputs: a non-empty list of source or node names, got {inputs!r}",
            where=where.at("inputs"),
            fix="write inputs: [a, b] with the names of sources or other nodes",
        )
    nonfinite = fields.pop("nonfinite", None)
    if nonfinite not in (None, "warn", "error"):
        raise MergerError(
            f"nonfinite must be warn or error, got {nonfinite!r}",
            where=where.at("nonfinite"),
            fix="nonfinite: error fails the run when the node's inputs or output hold NaN or inf",
        )
    vocab = fields.pop("vocab", None)
    if vocab not in VOCAB_POLICIES:
        raise MergerError(
            f"vocab must be first, got {vocab!r}",
            where=where.at("vocab"),
            fix="vocab: first merges the token rows every input has and gives the output the first input's"
            " vocabulary (its other rows as they are); leave vocab out when the inputs share one tokenizer",
        )
    sanity = _check_policy(
        "sanity",
        fields.pop("sanity", None),
        where,
        "sanity: error fails the run when the merged image model's output on a grey image or on the sample is"
        " constant, black or not finite; off skips the check",
    )
    family = _check_policy(
        "family",
        fields.pop("family", None),
        where,
        "family: error fails the run when the node's inputs look unrelated; off skips the check",
    )
    if family is not None and not op.family_check:
        raise MergerError(
            f"op '{op_name}' has no family check (it does not merge its inputs key by key), so family: does nothing",
            where=where.at("family"),
            fix="remove family from this node",
        )
    params = _params(op, fields, where)
    refs = tuple((p, getattr(params, p)) for p in op.references if getattr(params, p, None) is not None)
    return NodeDef(name, op_name, tuple(inputs), params, refs, nonfinite, vocab, sanity, family)


def _check_policy(setting: str, value: Any, where: Location, fix: str) -> str | None:
    """A node's `sanity:` or `family:`: warn, error or off; None when not given (the run's setting holds)."""
    value = check_policy(value)
    if value is None:
        return None
    if value not in CHECK_POLICIES:
        raise MergerError(f"{setting} must be warn, error or off, got {value!r}", where=where.at(setting), fix=fix)
    return str(value)


def _params(op: AnyOp, fields: dict[str, Any], where: Location) -> OpParams:
    try:
        return op.params_model.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e, op.params_model, where=where, what=f"op '{op.name}'") from None


def _output(name: str, raw: Any, where: Location) -> OutputDef:
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, Mapping):
        raise MergerError(
            f"output '{name}' must be a mapping",
            where=where,
            fix="write `name: {node: blend, path: blend.safetensors}`",
        )
    try:
        model = OutputModel.model_validate(dict(raw))
    except ValidationError as e:
        raise validation_error(e, OutputModel, where=where, what="an output") from None
    path = model.path or f"{name}.safetensors"
    if has_control(path) or not path.strip():
        raise MergerError(
            f"output path {path!r} is empty or holds a control character (NUL, a line break, ...)",
            where=where.at("path"),
            fix="give a plain file name such as blend.safetensors",
        )
    fmt = output_format(path)
    if fmt == "unknown":
        raise MergerError(
            f"output path '{path}' has an unknown format",
            where=where.at("path"),
            fix="end the path in .safetensors (recommended) or .pth, or give no extension for a model folder",
        )
    for field_name, value, allowed in (
        ("shard_size", model.shard_size, "folder"),
        ("config_from", model.config_from, "folder"),
        ("wrap", model.wrap, "pth"),
    ):
        if value is not None and fmt != allowed:
            kind = "a model folder (a path with no extension)" if allowed == "folder" else "a .pth output"
            raise MergerError(
                f"output '{name}' sets {field_name}, which applies only to {kind}, not to '{path}'",
                where=where.at(field_name),
                fix=f"remove {field_name}, or write the output as {kind}",
            )
    shard_size = DEFAULT_SHARD_SIZE
    if model.shard_size is not None:
        try:
            shard_size = parse_size(model.shard_size)
        except MergerError as e:
            raise e.located(where.at("shard_size")) from None
        if shard_size <= 0:
            raise MergerError(
                f"shard_size must be more than 0 bytes, not {shown(model.shard_size)}",
                where=where.at("shard_size"),
                fix="give a size such as 2GB or 500MB (the default is 5GB)",
            )
    return OutputDef(
        name,
        model.node or name,
        path,
        model.dtype,
        model.layout,
        model.overwrite,
        shard_size,
        model.config_from,
        model.wrap,
    )


RESERVED_FILES = ("merge_report.json", "merger.log", "sweep_report.json", "report.html", "report_files", "best.yaml")


def _check_output_paths(outputs: dict[str, OutputDef], file: str) -> None:
    """Two outputs (or an output and a .pth's provenance .json, or the run report) may not share a file."""
    taken: dict[str, str] = {name: "merger's own run files" for name in RESERVED_FILES}
    for output in outputs.values():
        paths = [os.path.normpath(p) for p in (output.path, output.side_file) if p is not None]
        for path in paths:
            other = taken.get(path)
            if os.path.basename(path) in RESERVED_FILES:  # in any folder: a sweep reads every job's report
                other = "merger's own run files"
            if other is not None or path.startswith(".hydra" + os.sep):
                raise MergerError(
                    f"output '{output.name}' would write '{path}', which {other or 'Hydra'} already writes",
                    where=Location(file, f"outputs.{output.name}.path"),
                    fix="give each output its own path",
                )
            taken[path] = f"output '{output.name}'"


def build_recipe(config: Mapping[str, Any], registry: OpRegistry, *, file: str) -> Recipe:
    """Validate resolved config data into a Recipe (references are checked by the graph)."""
    for section in SECTIONS:
        entries = config.get(section)
        if isinstance(entries, Mapping) and len(entries) > MAX_RECIPE_NODES:
            raise MergerError(
                f"'{section}' has {len(entries)} entries, more than the limit of {MAX_RECIPE_NODES}",
                where=Location(file, section),
                fix="split the work into several recipes (a glob source counts as one entry)",
            )
    sources = {
        n: _source(n, raw, Location(file, f"sources.{n}")) for n, raw in _mapping(config, "sources", file).items()
    }
    nodes = {
        n: _node(n, raw, registry, Location(file, f"nodes.{n}")) for n, raw in _mapping(config, "nodes", file).items()
    }
    outputs = {
        n: _output(n, raw, Location(file, f"outputs.{n}")) for n, raw in _mapping(config, "outputs", file).items()
    }
    if not outputs:
        raise MergerError(
            "the recipe has no outputs, so there is nothing to compute",
            where=Location(file),
            fix="add an outputs section, e.g. outputs: {blend: {node: blend}}",
        )
    _check_output_paths(outputs, file)
    clash = sorted(set(sources) & set(nodes))
    if clash:
        raise MergerError(
            f"'{clash[0]}' is both a source and a node",
            where=Location(file, f"nodes.{clash[0]}"),
            fix="give the node another name",
        )
    try:
        settings = Settings.model_validate(
            {k: config[k] for k in SETTINGS if k in config and config[k] is not None and k not in SCORING}
        )
    except ValidationError as e:
        raise validation_error(e, Settings, where=Location(file), what="the run settings") from None
    evaluation = build_evaluation(config.get("evaluate"), outputs, Location(file, "evaluate"))
    objectives = build_objectives(config.get("objective"), evaluation, outputs, Location(file, "objective"))
    variables = {k: v for k, v in config.items() if k not in SECTIONS and k not in SETTINGS}
    return Recipe(file, sources, nodes, outputs, settings, variables, evaluation, objectives)
