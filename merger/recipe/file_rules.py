"""A recipe file is data: what one may hold, checked as it is loaded.

Recipes are shared and kept in git, so a recipe from someone else must be as
safe to run as a safetensors file. Every file the `recipe` config group
serves (the recipe and the files its defaults list includes) is checked here
before Hydra sees it:

- size and shape: at most MAX_RECIPE_BYTES, at most MAX_ALIAS_EXPANSIONS
  YAML alias expansions and MAX_YAML_NODES nodes once expanded (a "billion
  laughs" is refused before it grows), no deeper nesting than Python parses;
- no code: no `_target_` (nor Hydra's other instantiation keys, nor logging's
  `()` factory) anywhere;
- no Hydra settings: the header is exactly `# @package _global_`; the defaults list names only
  other recipe files (no `hydra/...` groups, no `override`); a `hydra:`
  section may hold only the keys of SWEEP_KEYS, which shape a sweep, with
  plain values (numbers, strings, booleans, lists of them), so that a recipe
  cannot set the job's environment, its logging, its directories or its
  callbacks (those belong on the user's command line);
- no settings reserved for the command line (COMMAND_LINE_SETTINGS: where the
  cache lives, how far it is collected, whether the environment may be read);
- interpolations are plain references (`${alpha}`, `${nodes.a.alpha}`),
  `${now:...}`, or `${oc.env:...}` (which the job refuses unless the command
  line says `allow_env=true`); other resolvers are refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import yaml

from merger.core.limits import MAX_ALIAS_EXPANSIONS, MAX_RECIPE_BYTES, MAX_YAML_NODES
from merger.errors import Location, MergerError, shown

#: keys that make Hydra (or logging) call Python code, wherever they appear
CODE_KEYS = frozenset({"_target_", "_args_", "_partial_", "_convert_", "_recursive_", "()"})
#: run settings that only the command line may set: a recipe may not move the cache, collect it, or read the env
COMMAND_LINE_SETTINGS = ("allow_env", "allow_overwrite", "cache_dir", "cache_max_size")
#: top-level keys a recipe file may neither set nor sweep: those settings, and Hydra's group choice `recipe`
RESERVED_KEYS = (*COMMAND_LINE_SETTINGS, "recipe")
#: the hydra keys a recipe may set (they shape a sweep), and the plain type each holds
SWEEP_KEYS: dict[str, str] = {
    "hydra.sweeper.params": "mapping",
    "hydra.sweeper.n_trials": "int",
    "hydra.sweeper.n_jobs": "int",
    "hydra.sweeper.direction": "strings",
    "hydra.sweeper.sampler.seed": "int",
    "hydra.sweeper.max_batch_size": "int",
    "hydra.launcher.n_jobs": "int",
}
#: how many jobs a recipe may run at once (the command line may ask for more): each may hold a model
PARALLEL_KEYS = ("hydra.sweeper.n_jobs", "hydra.launcher.n_jobs")
MAX_RECIPE_PARALLEL = max(1, min(os.cpu_count() or 1, 16))
MAX_RECIPE_TRIALS = 10_000
ENV_RESOLVER = "oc.env"
_INTERPOLATION = re.compile(r"\$\{")
_PLAIN_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_.\-]*(\[\d+\])*\}")
_NOW = re.compile(r"\$\{now:[^${}]*\}")
_ENV = re.compile(r"\$\{oc\.env:[^${}]*\}")
_UNPLAIN = re.compile(r"[{}\[\]$\\]")
_SWEEP_PARAM = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][A-Za-z0-9_.\-]*$")
_DEFAULT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")
COMMAND_LINE_FIX = "set it on the command line (merger key=value); a recipe file may not"


def _refuse(what: str, label: str, place: str | None, fix: str) -> MergerError:
    return MergerError(what, where=Location(label, place), fix=fix)


def check_size(size: int, label: str) -> None:
    if size > MAX_RECIPE_BYTES:
        raise _refuse(
            f"the recipe file is {size} bytes, more than the limit of {MAX_RECIPE_BYTES}",
            label,
            None,
            "a recipe names models and ops; keep it small (split it with a defaults list)",
        )


def check_yaml_shape(root: yaml.Node | None, label: str) -> None:
    """Refuse YAML whose aliases would expand past the limits, before anything is built from it
    (`root`: the composed node graph, in which an alias is a second reference to one node)."""
    if root is None:
        return
    seen: set[int] = set()
    nodes = aliases = 0
    pending: list[yaml.Node] = [root]
    while pending:
        node = pending.pop()
        nodes += 1
        if id(node) in seen and isinstance(node, yaml.CollectionNode):
            aliases += 1
        seen.add(id(node))
        if aliases > MAX_ALIAS_EXPANSIONS or nodes > MAX_YAML_NODES:
            raise _refuse(
                f"the recipe's YAML aliases expand past the limit ({MAX_ALIAS_EXPANSIONS} alias expansions,"
                f" {MAX_YAML_NODES} nodes)",
                label,
                None,
                "write the values out, or use ${...} interpolations instead of deep *aliases",
            )
        if isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                pending.extend((key, value))


_HEADER_LINE = re.compile(r"^\s*#\s*@")


def check_header(text: str, label: str) -> dict[str, str | None]:
    """The file's header (its leading `# @key value` lines, read as Hydra reads them) must be exactly
    one `# @package _global_`: any other package, or a second header line, could place the file's keys
    under `hydra` (Hydra resolves `_global_.x._global_.hydra` to `hydra`). Returns the header to give Hydra."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not _HEADER_LINE.match(line):
            break
        lines.append(line.strip().lstrip("#").strip())
    if lines != ["@package _global_"]:
        said = f"its header says {', '.join(repr(shown(x)) for x in lines)}" if lines else "it has no package line"
        raise _refuse(
            f"a recipe file starts with exactly one line '# @package _global_', but {said}",
            label,
            None,
            "make '# @package _global_' the file's first line and remove other '# @' lines",
        )
    return {"package": "_global_"}


def _walk(value: Any) -> Iterator[tuple[str, Any, bool]]:
    """(dotted path, item, is_key) for every key and every leaf, iteratively (a file is untrusted)."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        place, item = pending.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                child_place = f"{place}.{key}" if place else str(key)
                yield child_place, key, True
                pending.append((child_place, child))
        elif isinstance(item, list):
            pending.extend((f"{place}[{i}]", v) for i, v in enumerate(item))
        else:
            yield place, item, False


def check_interpolation(text: str, label: str, place: str) -> None:
    """Only plain references, ${now:...} and ${oc.env:...} (the latter gated by allow_env, later)."""
    if "${" not in text:
        return
    stripped = _PLAIN_REFERENCE.sub("", _NOW.sub("", _ENV.sub("", text)))
    if _INTERPOLATION.search(stripped):
        raise _refuse(
            f"'{shown(text)}' uses an interpolation a recipe may not: only ${{name}} references,"
            " ${now:...} and ${oc.env:VAR} (with allow_env=true on the command line)",
            label,
            place,
            "refer to a variable of the recipe, e.g. ${alpha}",
        )


def _check_defaults(defaults: Any, label: str) -> None:
    entries = defaults if isinstance(defaults, list) else [defaults]
    for i, entry in enumerate(entries):
        if entry == "_self_" or (isinstance(entry, str) and _DEFAULT_NAME.match(entry) and "hydra" not in entry):
            continue
        raise _refuse(
            f"the defaults list may only name other recipe files, not '{shown(entry)}'",
            label,
            f"defaults[{i}]",
            "list recipe files of the same directory (e.g. - common, - _self_); Hydra groups such as"
            " hydra/launcher belong on the command line",
        )


def _check_sweep_value(kind: str, value: Any, label: str, place: str) -> None:
    def plain(item: Any) -> bool:
        """A number, or text of values and sweep functions: no `{ } [ ]` (Hydra would merge a mapping or
        list into the config), no `$` or `\\` (an escaped `$\\{...\\}` becomes an interpolation after this check)."""
        return isinstance(item, (int, float, str, bool)) and not (isinstance(item, str) and _UNPLAIN.search(item))

    ok = {
        "int": isinstance(value, int)
        and not isinstance(value, bool)
        and (place != "hydra.sweeper.max_batch_size" or value >= 1),
        "strings": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "mapping": isinstance(value, dict),
    }[kind] and (not isinstance(value, str) or plain(value))
    if kind == "mapping" and ok:
        for key, item in value.items():
            name = str(key).lstrip("+~")
            if not _SWEEP_PARAM.match(str(key)) or name.startswith("hydra") or name in RESERVED_KEYS:
                raise _refuse(
                    f"'{shown(key)}' cannot be swept from a recipe: sweep the recipe's own keys",
                    label,
                    f"{place}.{key}",
                    "sweep variables of the recipe (alpha: 0,0.5,1); Hydra's settings belong on the command line",
                )
            if not (plain(item) or (isinstance(item, list) and all(plain(v) for v in item))):
                raise _refuse(
                    f"the sweep of '{shown(key)}' must be a plain value or list, not {shown(item)!s}",
                    label,
                    f"{place}.{key}",
                    "write e.g. alpha: 0,0.5,1 or alpha: interval(0,1)",
                )
    if ok and place in PARALLEL_KEYS and not 1 <= value <= MAX_RECIPE_PARALLEL:
        raise _refuse(
            f"'{place}' is {value}: a recipe may ask for 1 to {MAX_RECIPE_PARALLEL} jobs at a time"
            " (each is a process that may hold a model)",
            label,
            place,
            f"give at most {MAX_RECIPE_PARALLEL}; more can be given on the command line, which is yours",
        )
    if ok and place == "hydra.sweeper.n_trials" and not 1 <= value <= MAX_RECIPE_TRIALS:
        raise _refuse(
            f"'{place}' is {value}: a search runs 1 to {MAX_RECIPE_TRIALS} trials", label, place, "give n_trials >= 1"
        )
    if not ok:
        raise _refuse(
            f"'{place}' must hold a plain {kind.rstrip('s')}, not {shown(value)!s}",
            label,
            place,
            "give a plain value, without interpolations",
        )


def _check_hydra(section: Any, label: str) -> None:
    allowed = ", ".join(SWEEP_KEYS)
    for place, value, is_key in _walk({"hydra": section}):
        if is_key or isinstance(value, dict):
            continue
        if not any(place == k or place.startswith((k + ".", k + "[")) for k in SWEEP_KEYS):
            raise _refuse(
                f"a recipe may not set Hydra's '{shown(place)}'",
                label,
                shown(place),
                f"put Hydra settings on the command line; a recipe may set only {allowed}",
            )


def check_recipe_data(data: Any, label: str) -> None:
    """Refuse code, Hydra settings and command-line settings in one loaded recipe file."""
    if not isinstance(data, dict):
        return
    for place, value, is_key in _walk(data):
        if is_key and value in CODE_KEYS:
            raise _refuse(
                f"recipes may not name code to run, but '{shown(place)}' does",
                label,
                shown(place),
                f"remove the {shown(value)} key: a recipe names models and ops, never Python objects",
            )
        if not is_key and isinstance(value, str):
            check_interpolation(value, label, shown(place))
    if "defaults" in data:
        _check_defaults(data["defaults"], label)
    for name in RESERVED_KEYS:
        if name in data:
            fix = (
                COMMAND_LINE_FIX
                if name != "recipe"
                else "rename the key: recipe=NAME is how the command line picks a recipe"
            )
            raise _refuse(f"a recipe file may not set '{name}'", label, name, fix)
    if "hydra" in data:
        _check_hydra(data["hydra"], label)
        for key, kind in SWEEP_KEYS.items():
            setting: Any = data
            for part in key.split("."):
                setting = setting.get(part) if isinstance(setting, dict) else None
            if setting is not None:
                _check_sweep_value(kind, setting, label, key)
