"""From a composed Hydra config to plain, checked recipe data.

Done on the DictConfig while interpolations are still visible:
- every top-level key that is not a section or a run setting is a variable,
  and must be used by some interpolation: an unused one is almost always a
  typo (`node:` for `nodes:`), so it is an error with a "did you mean";
- `${oc.env:VAR}` reads the environment: refused in what a recipe file
  wrote unless the command line says `allow_env=true` (values the command
  line itself gives are the user's own and may read it);
- interpolations are resolved, and a failure names the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from merger.core.limits import MAX_YAML_NODES
from merger.errors import Location, MergerError, did_you_mean
from merger.recipe.model import SECTIONS, SETTINGS

_REFERENCE = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_-]*)(?=[\s.}\[])")


def _raw(config: DictConfig) -> Any:
    """The config as plain data, interpolations left unresolved (`${alpha}` stays a string)."""
    return OmegaConf.to_container(config, resolve=False)


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, raw value) for every leaf of plain config data, iteratively."""
    pending: list[tuple[str, Any]] = [(path, node)]
    while pending:
        place, item = pending.pop()
        if isinstance(item, dict):
            pending.extend((f"{place}.{k!s}" if place else str(k), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, list):
            pending.extend((f"{place}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        else:
            yield place, item


def referenced_names(config: DictConfig) -> set[str]:
    """Top-level names that some interpolation refers to (`${alpha}`, `${nodes.x.alpha}`)."""
    names: set[str] = set()
    for _, value in _walk(_raw(config), ""):
        if isinstance(value, str) and "${" in value:
            names.update(_REFERENCE.findall(value))
    return names


_WHOLE_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.\-]*(?:\[\d+\])*)\}")


def _structure(config: DictConfig) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(children of each container path, the references of each leaf path), without resolving."""
    children: dict[str, list[str]] = {}
    references: dict[str, list[str]] = {}
    pending: list[tuple[str, Any]] = [("", _raw(config))]
    while pending:
        path, node = pending.pop()
        if isinstance(node, dict | list):
            items = (
                [(f"{path}.{k!s}" if path else str(k), v) for k, v in node.items()]
                if isinstance(node, dict)
                else [(f"{path}[{i}]", v) for i, v in enumerate(node)]
            )
            children[path] = [p for p, _ in items]
            pending.extend(items)
        elif isinstance(node, str) and "${" in node:
            references[path] = _WHOLE_REFERENCE.findall(node)
    return children, references


def check_expansion(config: DictConfig, file: str) -> None:
    """Interpolations may refer to containers, so a few lines can expand to billions of values
    (`l1: ['${l0}', '${l0}', ...]`, `l2: ['${l1}', ...]`): refuse past MAX_YAML_NODES before resolving."""
    children, references = _structure(config)
    sizes: dict[str, int] = {}
    stack: list[tuple[str, bool]] = [("", False)]
    active: set[str] = set()
    while stack:
        path, expanded = stack.pop()
        if path in sizes:
            continue
        parts = children.get(path, references.get(path, []))
        if not expanded:
            if path in active:  # a cycle: OmegaConf reports it when it resolves
                sizes[path] = 1
                continue
            active.add(path)
            stack.append((path, True))
            stack.extend((p, False) for p in parts if p not in sizes and p not in active)
            continue
        active.discard(path)
        sizes[path] = min(1 + sum(sizes.get(p, 1) for p in parts), MAX_YAML_NODES + 1)
        if sizes[path] > MAX_YAML_NODES:
            raise MergerError(
                f"the recipe's interpolations expand to more than {MAX_YAML_NODES} values",
                where=Location(file, path or None),
                fix="refer to values, not to lists of references to lists (MAX_YAML_NODES)",
            )


def check_variables(config: DictConfig, file: str) -> None:
    """Every top-level key that is not a section or a setting must be a variable in use."""
    known = (*SECTIONS, *SETTINGS)
    used = referenced_names(config)
    for key in config:
        name = str(key)
        if name in known:
            continue
        if name not in used:
            close = did_you_mean(name, known)
            hint = f"did you mean '{close}'? " if close else ""
            raise MergerError(
                f"top-level key '{name}' is neither a section, a run setting nor a variable in use",
                where=Location(file, name),
                fix=f"{hint}sections: {', '.join(SECTIONS)}; settings: {', '.join(SETTINGS)};"
                f" a variable must be used as ${{{name}}} somewhere in the recipe",
            )


_ENV_READ = re.compile(r"\$\{\s*oc\.env\s*:\s*([^,}]*)")


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted config keys that command-line overrides set (`a.b=1`, `+c=2`, `~d`); not group
    choices such as `recipe=NAME` or `hydra/launcher=joblib`, which set no value of the recipe."""
    keys = {o.split("=", 1)[0].lstrip("+~").strip() for o in overrides}
    return {k for k in keys if k and "/" not in k and k != "recipe"}


def _given_on_command_line(path: str, keys: set[str]) -> bool:
    return any(path == key or path.startswith((key + ".", key + "[")) for key in keys)


def check_environment_reads(config: DictConfig, file: str, command_line: set[str]) -> None:
    """A recipe file reads the environment only where the user allowed it (allow_env=true)."""
    if config.get("allow_env") is True:
        return
    for path, value in _walk(_raw(config), ""):
        if isinstance(value, str) and _ENV_READ.search(value) and not _given_on_command_line(path, command_line):
            variable = _ENV_READ.search(value)
            name = variable.group(1).strip() if variable else "?"
            raise MergerError(
                f"'{value}' reads the environment variable {name}; a recipe may read the environment"
                " only when you allow it",
                where=Location(file, path),
                fix="if you trust this recipe, run with allow_env=true; or give the value on the command line",
            )


def resolve(config: DictConfig, file: str) -> dict[str, Any]:
    """Plain data with every interpolation resolved."""
    for path, value in _walk(_raw(config), ""):
        if isinstance(value, str) and "${" in value:
            try:
                OmegaConf.select(config, path, throw_on_missing=True)
            except OmegaConfBaseException as e:
                names = [str(k) for k in config]
                missing = [n for n in _REFERENCE.findall(value) if n not in names]
                close = did_you_mean(missing[0], names) if missing else None
                hint = f"did you mean '${{{close}}}'? " if close else ""
                raise MergerError(
                    f"cannot resolve '{value}': {str(e).splitlines()[0]}",
                    where=Location(file, path),
                    fix=f"{hint}define the variable at the top of the recipe (e.g. alpha: 0.5)",
                ) from None
    try:
        data = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise MergerError(
            f"the recipe has a value that is not set: {str(e).splitlines()[0]}",
            where=file,
            fix="give every ??? (missing) value, in the recipe or on the command line",
        ) from None
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def checked_recipe_data(
    config: DictConfig, file: str, command_line: set[str] | None = None, *, trusted: bool = False
) -> dict[str, Any]:
    """`command_line`: the keys the command line set (see `override_keys`); `trusted`: data of the
    user's own (a mapping given to merger.run), which may read the environment."""
    if not trusted:
        check_environment_reads(config, file, command_line or set())
    check_expansion(config, file)
    data = resolve(config, file)
    check_variables(config, file)
    return data
