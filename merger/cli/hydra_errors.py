"""Hydra's composition errors, told as MergerErrors (what, where, fix).

Hydra reports these with a traceback and exit status 1; the pre-flight
catches them (they are user errors: a missing recipe, a misspelt override, a
YAML typo) and says what to do instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException, OverrideParseException

from merger.cli.recipe_source import RecipeFileError, available_recipes
from merger.errors import MergerError, did_you_mean, suggestion

MULTIRUN_HINT = "add -m (--multirun) to run one job per value, or quote the value: key='a,b'"
GRAMMAR_HINT = "write overrides as key=value, a sweep as -m key=a,b,c (see Hydra's override grammar)"
LAUNCHER_HINT = (
    "install the launcher plugin: pip install 'merger[parallel]' (hydra/launcher=joblib)"
    " or 'merger[slurm]' (hydra/launcher=submitit_local, submitit_slurm)"
)


def _cause_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _yaml_error(error: yaml.MarkedYAMLError) -> MergerError:
    mark = error.problem_mark or error.context_mark
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else None
    problem = error.problem or "syntax error"
    if error.context and error.context_mark:
        problem = f"{problem} ({error.context} that starts at line {error.context_mark.line + 1})"
    return MergerError(f"the recipe is not valid YAML: {problem}", where=where, fix="fix the YAML syntax there")


def _missing_config(error: MissingConfigException, launch_dir: Path) -> MergerError:
    missing = error.missing_cfg_file or ""
    group, _, name = missing.rpartition("/")
    if group == "recipe":
        recipes = available_recipes(launch_dir)
        return MergerError(
            f"recipe '{name}' not found",
            where=f"recipe={name} (looked for {launch_dir / 'recipes' / name}.yaml, then the built-in recipes)",
            fix=suggestion(name, recipes, kind="recipes"),
        )
    options = re.findall(r"^\t(\S+)$", str(error), flags=re.MULTILINE)
    fix = LAUNCHER_HINT if group.startswith("hydra/launcher") else suggestion(name, options, kind=f"{group} options")
    return MergerError(f"config '{missing}' not found", where=f"{group}={name} on the command line", fix=fix)


def _bad_override(overrides: list[str]) -> str | None:
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return None


def explain_hydra_error(
    error: BaseException, overrides: list[str], launch_dir: Path, known_keys: Callable[[], list[str]]
) -> MergerError:
    """A MergerError for an exception raised while Hydra composed the config.

    `known_keys` lists the recipe's top-level keys (for "did you mean"), when asked.
    """
    for item in _cause_chain(error):
        if isinstance(item, RecipeFileError):
            return item.error
        if isinstance(item, yaml.MarkedYAMLError):
            return _yaml_error(item)
        if isinstance(item, MissingConfigException):
            return _missing_config(item, launch_dir)
    message = str(error).strip()
    first_line = message.splitlines()[0] if message else type(error).__name__
    if isinstance(error, OverrideParseException):
        bad = _bad_override(overrides)
        return MergerError(
            f"cannot parse the override '{bad}'" if bad else f"cannot parse the overrides: {first_line}",
            where="the command line",
            fix=GRAMMAR_HINT,
        )
    found = re.search(r"Could not override '([^']+)'", message)
    if found:
        key = found.group(1)
        keys = known_keys()
        close = did_you_mean(key, keys)
        hint = f"did you mean '{close}'? " if close else ""
        return MergerError(
            f"'{key}' is not a key of the recipe, so it cannot be overridden",
            where=f"the command line: {next((o for o in overrides if o.startswith(key + '=')), key)}",
            fix=f"{hint}to add a new key use +{key}=..." + (f"; the recipe's keys: {', '.join(keys)}" if keys else ""),
        )
    found = re.search(r"In '(recipe/[^']+)': \w+ raised while composing config:\n(.+)", message)
    if found:
        return MergerError(
            f"the recipe cannot be merged into merger's config: {found.group(2).strip()}",
            where=f"{found.group(1)}.yaml",
            fix="sources, nodes and outputs are mappings of name: definition (not lists); check the recipe's keys",
        )
    found = re.search(r"Ambiguous value for argument '([^']+)'", message)
    if found:
        return MergerError(f"'{found.group(1)}' lists several values", where="the command line", fix=MULTIRUN_HINT)
    return MergerError(first_line, where="the command line or the recipe", fix=GRAMMAR_HINT)
